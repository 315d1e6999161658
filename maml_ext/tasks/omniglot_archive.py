"""Reading Omniglot's official archives and shrinking each drawing to the 28x28 image the model
sees (:func:`omniglot_image`). PIL, from the optional ``experiments`` extra, decodes the PNGs; it is
imported only when a drawing is decoded, so cached data loads without it.
"""

import hashlib
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from maml_ext._optional import require

from ._data_errors import DatasetError, PathLike, file_signature

if TYPE_CHECKING:  # PIL is optional (the experiments extra)
    import PIL.Image

__all__ = ["omniglot_image", "OMNIGLOT_IMAGE_SIZE"]

OMNIGLOT_IMAGE_SIZE = 28

_ARCHIVE_PREFIXES = ("images_background", "images_evaluation")
_EXPECTED_LAYOUT = "<archive>/<Alphabet>/<characterNN>/<drawing>.png"

CharacterKey = tuple[str, str]  # (alphabet, character folder)


def _pil_image():
    """PIL's Image module (``experiments`` extra), imported when a drawing is decoded."""
    return require("PIL.Image", "decoding Omniglot drawings")


# --------------------------------------------------------------------------------------------
# Preprocessing


def omniglot_image(image: Union[PathLike, "PIL.Image.Image", io.IOBase]) -> torch.Tensor:
    """One drawing as the model sees it: a float32 tensor ``[1, 28, 28]``, ink 1 and paper 0.

    ``image`` is a path, an open binary file, or a PIL image; any mode is accepted, with dark
    strokes on a light (or transparent) background, as Omniglot's PNGs and most drawing programs
    produce. Steps: transparent pixels become white paper; the image becomes 8-bit greyscale;
    a non-square image is padded with paper to a centred square (so strokes keep their shape);
    PIL's LANCZOS filter shrinks it to 28x28; and ``1 - grey / 255`` makes the ink 1.

    The greyscale conversion comes before the resize on purpose: PIL resizes one-bit images
    (Omniglot's mode ``"1"``) with nearest-neighbour whatever filter is asked for, which is what
    the MAML paper's own preprocessing script silently got; converting first gives the LANCZOS
    filter the paper names, with anti-aliased stroke edges.
    """
    Image = _pil_image()
    if isinstance(image, Image.Image):
        ink = _ink(image)
    else:
        with Image.open(image) as opened:
            ink = _ink(opened)
    return ink_to_float(ink)


def _ink(image: "PIL.Image.Image") -> np.ndarray:
    """The 28x28 uint8 ink map of a drawing (255 where the pen was): what the cache stores."""
    Image = _pil_image()
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    grey = image.convert("L")
    width, height = grey.size
    if width != height:
        side = max(width, height)
        square = Image.new("L", (side, side), 255)
        square.paste(grey, ((side - width) // 2, (side - height) // 2))
        grey = square
    size = (OMNIGLOT_IMAGE_SIZE, OMNIGLOT_IMAGE_SIZE)
    small = grey.resize(size, Image.Resampling.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def ink_to_float(ink: np.ndarray) -> torch.Tensor:
    """uint8 ink ``[..., 28, 28]`` to float32 in [0, 1] with a channel axis ``[..., 1, 28, 28]``."""
    return torch.from_numpy(np.ascontiguousarray(ink)).float().div_(255).unsqueeze(-3)


# --------------------------------------------------------------------------------------------
# Reading the archives


class Archive:
    """One official archive: a zip file, or the folder it unpacks to."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        self._zip: zipfile.ZipFile | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def signature(self) -> list:
        """What identifies this archive's content for the cache: names, sizes and mtimes."""
        if self.is_zip:
            return list(file_signature(self.path))
        listing = hashlib.sha1()
        for file in sorted(self._folder_files()):
            listing.update(repr(file_signature(file, relative_to=self.path)).encode())
        return [self.name, listing.hexdigest()]

    def _folder_files(self) -> list[Path]:
        return [p for p in self.path.rglob("*") if p.is_file()]

    def __enter__(self) -> "Archive":
        if self.is_zip:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DatasetError(f"{self.path} is not a readable zip archive: {exc}") from exc
        return self

    def __exit__(self, *exc_info) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def location(self, member: str) -> str:
        """A drawing's place, for messages: ``archive.zip:member`` or the file's path."""
        return f"{self.path}:{member}" if self.is_zip else str(self.path.parent / member)

    def drawings(self) -> dict[CharacterKey, list[str]]:
        """The archive's members (paths below its parent folder) per character, layout checked."""
        if self.is_zip:
            members = [info.filename for info in self._zip.infolist() if not info.is_dir()]
        else:
            members = [p.relative_to(self.path.parent).as_posix() for p in self._folder_files()]
        by_character: dict[CharacterKey, list[str]] = {}
        for member in members:
            parts = PurePosixPath(member).parts
            # Skip what archivers and desktops add (__MACOSX/, .DS_Store) and non-image files.
            if any(part.startswith(".") or part == "__MACOSX" for part in parts):
                continue
            if not parts[-1].lower().endswith(".png"):
                continue
            if len(parts) != 4:
                raise DatasetError(
                    f"{self.location(member)}: a drawing at the wrong depth; "
                    f"expected {_EXPECTED_LAYOUT}"
                )
            _, alphabet, character, _ = parts
            by_character.setdefault((alphabet, character), []).append(member)
        if not by_character:
            raise DatasetError(f"{self.path} holds no PNG drawings; expected {_EXPECTED_LAYOUT}")
        return {key: sorted(files) for key, files in by_character.items()}

    def read(self, member: str) -> bytes:
        try:
            if self.is_zip:
                return self._zip.read(member)
            return (self.path.parent / member).read_bytes()
        except (zipfile.BadZipFile, OSError) as exc:  # zipfile reports bad CRCs as BadZipFile
            raise DatasetError(f"{self.location(member)}: cannot be read: {exc}") from exc


def find_archives(root: Path, names: Sequence[str] | None) -> list[Archive]:
    """The archives to read: ``root`` itself, the ones named, or every official one in ``root``."""
    expected = (
        "expected a folder holding images_background*.zip / images_evaluation*.zip "
        f"or their unpacked folders ({_EXPECTED_LAYOUT})"
    )
    if not root.exists():
        raise FileNotFoundError(f"Omniglot root {root} does not exist; {expected}")
    if root.is_file() or root.name.startswith(_ARCHIVE_PREFIXES):
        if root.is_file() and root.suffix.lower() != ".zip":
            raise DatasetError(f"{root} is not a zip archive; {expected}")
        return [Archive(root)]
    if names is not None:
        archives = []
        for name in names:
            stem = name[:-4] if name.lower().endswith(".zip") else name
            zip_path, folder = root / f"{stem}.zip", root / stem
            if zip_path.is_file():
                archives.append(Archive(zip_path))
            elif folder.is_dir():
                archives.append(Archive(folder))
            else:
                raise FileNotFoundError(
                    f"no Omniglot archive {name!r} in {root}: looked for {zip_path} and {folder}/"
                )
        return archives
    # A zip and the folder it was unpacked to hold the same drawings: read the zip only.
    by_stem: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if not path.name.startswith(_ARCHIVE_PREFIXES):
            continue
        if path.is_file() and path.suffix.lower() == ".zip":
            by_stem[path.stem] = path
        elif path.is_dir():
            by_stem.setdefault(path.name, path)
    if not by_stem:
        raise FileNotFoundError(f"no Omniglot archives in {root}; {expected}")
    return [Archive(by_stem[stem]) for stem in sorted(by_stem)]


def _decode_drawing(archive: Archive, member: str, data: bytes) -> np.ndarray:
    Image = _pil_image()  # outside the try: a missing extra is not a damaged file
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _ink(image)
    except Exception as exc:  # PIL raises many types for damaged files
        raise DatasetError(f"{archive.location(member)}: not a readable PNG image: {exc}") from exc


def _content_digest(archive: Archive, members: Sequence[str]) -> tuple[str, list[bytes]]:
    """A character's drawings (names and bytes) as one hash, to tell identical copies apart."""
    digest = hashlib.sha1()
    contents = []
    for member in members:
        data = archive.read(member)
        digest.update(PurePosixPath(member).name.encode() + b"\0" + data)
        contents.append(data)
    return digest.hexdigest(), contents


def decode_archive(archive: Archive) -> dict[str, np.ndarray]:
    """Every drawing of one archive, characters in sorted order: the arrays its cache holds."""
    with archive:
        by_character = archive.drawings()
        keys = sorted(by_character)
        ink, image_character, members, digests = [], [], [], []
        for index, key in enumerate(keys):
            digest, contents = _content_digest(archive, by_character[key])
            digests.append(digest)
            for member, data in zip(by_character[key], contents):
                ink.append(_decode_drawing(archive, member, data))
                members.append(member)
                image_character.append(index)
    return {
        "ink": np.stack(ink),
        "image_character": np.asarray(image_character, dtype=np.int64),
        "alphabet_names": np.asarray([alphabet for alphabet, _ in keys], dtype=str),
        "character_names": np.asarray([character for _, character in keys], dtype=str),
        "character_digests": np.asarray(digests, dtype=str),
        "members": np.asarray(members, dtype=str),
    }


def merge_archives(
    archives: Sequence[Archive], decoded: Sequence[dict[str, np.ndarray]]
) -> tuple[list[CharacterKey], np.ndarray, np.ndarray, list[str], list[str]]:
    """All archives' characters, each once, sorted: ``(characters, ink, image_character,
    drawings, duplicate characters)``. Copies of a character must be identical."""
    first_copy: dict[CharacterKey, tuple[Archive, str]] = {}
    duplicates: list[str] = []
    ink_parts, character_parts, drawings = [], [], []
    for archive, arrays in zip(archives, decoded):
        keys = list(zip(arrays["alphabet_names"].tolist(), arrays["character_names"].tolist()))
        is_new = np.ones(len(keys), dtype=bool)
        for index, (key, digest) in enumerate(zip(keys, arrays["character_digests"].tolist())):
            if key not in first_copy:
                first_copy[key] = (archive, digest)
                continue
            other_archive, other_digest = first_copy[key]
            if digest != other_digest:
                raise DatasetError(
                    f"character {key[0]}/{key[1]} differs between {other_archive.path} and "
                    f"{archive.path}; read only one of them (archives=[...])"
                )
            duplicates.append(f"{key[0]}/{key[1]}")
            is_new[index] = False
        keep = is_new[arrays["image_character"]]
        ink_parts.append(arrays["ink"][keep])
        character_parts.append([keys[i] for i in arrays["image_character"][keep]])
        drawings += [archive.location(member) for member in arrays["members"][keep].tolist()]

    characters = sorted(first_copy)
    index_of = {key: index for index, key in enumerate(characters)}
    image_character = np.asarray(
        [index_of[key] for part in character_parts for key in part], dtype=np.int64
    )
    # Group the images by character (stable, so each character's drawings keep their order).
    order = np.argsort(image_character, kind="stable")
    ink = np.concatenate(ink_parts)[order]
    drawings = [drawings[i] for i in order]
    return characters, ink, image_character[order], drawings, sorted(set(duplicates))

"""Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015) as the MAML paper uses it.

The official archives hold 105x105 one-bit PNGs laid out as
``images_background/<Alphabet>/<characterNN>/<drawer>_<nn>.png`` (20 drawings of every character).
:class:`Omniglot` reads the zip files or their unpacked folders, shrinks every drawing to 28x28 with
:func:`omniglot_image`, caches the result, splits the characters into meta-train / meta-validation
/ meta-test, and counts each character's 90/180/270-degree rotations as further classes (Santoro
et al. 2016, as the MAML paper does). The rotated images are not stored: :class:`TaskSampler`
makes them with ``torch.rot90`` when a rotated class is drawn.
"""
import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ._data_errors import (
    DatasetError,
    PathLike,
    cache_file,
    file_signature,
    load_cached_arrays,
    save_cached_arrays,
)

__all__ = ["Omniglot", "omniglot_image", "OMNIGLOT_IMAGE_SIZE", "PAPER_SPLIT_SIZES", "SPLITS"]

OMNIGLOT_IMAGE_SIZE = 28
# The MAML code's split of all 1623 characters: 1200 for meta-training, of which 100 are held out
# for meta-validation, and the remaining 423 for meta-testing. Other sets are split in proportion.
PAPER_SPLIT_SIZES = (1100, 100, 423)
SPLITS = ("train", "val", "test")
ROTATION_DEGREES = (0, 90, 180, 270)

_ARCHIVE_PREFIXES = ("images_background", "images_evaluation")
_EXPECTED_LAYOUT = "<archive>/<Alphabet>/<characterNN>/<drawing>.png"

CharacterKey = Tuple[str, str]  # (alphabet, character folder)


# --------------------------------------------------------------------------------------------
# Preprocessing


def omniglot_image(image: Union[PathLike, Image.Image, io.IOBase]) -> torch.Tensor:
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
    if isinstance(image, Image.Image):
        ink = _ink(image)
    else:
        with Image.open(image) as opened:
            ink = _ink(opened)
    return _ink_to_float(ink)


def _ink(image: Image.Image) -> np.ndarray:
    """The 28x28 uint8 ink map of a drawing (255 where the pen was): what the cache stores."""
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


def _ink_to_float(ink: np.ndarray) -> torch.Tensor:
    """uint8 ink ``[..., 28, 28]`` to float32 in [0, 1] with a channel axis ``[..., 1, 28, 28]``."""
    return torch.from_numpy(np.ascontiguousarray(ink)).float().div_(255).unsqueeze(-3)


# --------------------------------------------------------------------------------------------
# Reading the archives


class _Archive:
    """One official archive: a zip file, or the folder it unpacks to."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        self._zip: Optional[zipfile.ZipFile] = None

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

    def _folder_files(self) -> List[Path]:
        return [p for p in self.path.rglob("*") if p.is_file()]

    def __enter__(self) -> "_Archive":
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

    def drawings(self) -> Dict[CharacterKey, List[str]]:
        """The archive's members (paths below its parent folder) per character, layout checked."""
        if self.is_zip:
            members = [info.filename for info in self._zip.infolist() if not info.is_dir()]
        else:
            members = [p.relative_to(self.path.parent).as_posix() for p in self._folder_files()]
        by_character: Dict[CharacterKey, List[str]] = {}
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


def _find_archives(root: Path, names: Optional[Sequence[str]]) -> List[_Archive]:
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
        return [_Archive(root)]
    if names is not None:
        archives = []
        for name in names:
            stem = name[:-4] if name.lower().endswith(".zip") else name
            zip_path, folder = root / f"{stem}.zip", root / stem
            if zip_path.is_file():
                archives.append(_Archive(zip_path))
            elif folder.is_dir():
                archives.append(_Archive(folder))
            else:
                raise FileNotFoundError(
                    f"no Omniglot archive {name!r} in {root}: looked for {zip_path} and {folder}/"
                )
        return archives
    # A zip and the folder it was unpacked to hold the same drawings: read the zip only.
    by_stem: Dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if not path.name.startswith(_ARCHIVE_PREFIXES):
            continue
        if path.is_file() and path.suffix.lower() == ".zip":
            by_stem[path.stem] = path
        elif path.is_dir():
            by_stem.setdefault(path.name, path)
    if not by_stem:
        raise FileNotFoundError(f"no Omniglot archives in {root}; {expected}")
    return [_Archive(by_stem[stem]) for stem in sorted(by_stem)]


def _decode_drawing(archive: _Archive, member: str, data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _ink(image)
    except Exception as exc:  # PIL raises many types for damaged files
        raise DatasetError(f"{archive.location(member)}: not a readable PNG image: {exc}") from exc


def _content_digest(archive: _Archive, members: Sequence[str]) -> Tuple[str, List[bytes]]:
    """A character's drawings (names and bytes) as one hash, to tell identical copies apart."""
    digest = hashlib.sha1()
    contents = []
    for member in members:
        data = archive.read(member)
        digest.update(PurePosixPath(member).name.encode() + b"\0" + data)
        contents.append(data)
    return digest.hexdigest(), contents


def _decode_archive(archive: _Archive) -> Dict[str, np.ndarray]:
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


def _merge_archives(
    archives: Sequence[_Archive], decoded: Sequence[Dict[str, np.ndarray]]
) -> Tuple[List[CharacterKey], np.ndarray, np.ndarray, List[str], List[str]]:
    """All archives' characters, each once, sorted: ``(characters, ink, image_character,
    drawings, duplicate characters)``. Copies of a character must be identical."""
    first_copy: Dict[CharacterKey, Tuple[_Archive, str]] = {}
    duplicates: List[str] = []
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


# --------------------------------------------------------------------------------------------
# Splits


def _split_counts(total: int, fractions: Sequence[float]) -> Tuple[int, int, int]:
    """``total`` items cut in the ratio of ``fractions`` (largest remainders get the leftovers)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            f"fractions must be three non-negative (train, val, test) sizes with a positive sum, "
            f"got {tuple(fractions)!r}"
        )
    weight_sum = sum(fractions)
    exact = [total * f / weight_sum for f in fractions]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def _seeded_order(count: int, seed: int) -> List[int]:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(count, generator=generator).tolist()


def _check_alphabet_lists(
    alphabets: Mapping[str, Sequence[str]], available: Sequence[str]
) -> Dict[str, set]:
    unknown_splits = set(alphabets) - set(SPLITS)
    if unknown_splits:
        raise ValueError(f"alphabets has keys {sorted(unknown_splits)}; allowed: {list(SPLITS)}")
    owner: Dict[str, str] = {}
    for split_name, names in alphabets.items():
        if isinstance(names, str):
            raise ValueError(f"alphabets[{split_name!r}] must be a list of names, not a string")
        for name in names:
            if name not in available:
                raise ValueError(
                    f"alphabets[{split_name!r}] names {name!r}, which is not in the archives read; "
                    f"available: {', '.join(available)}"
                )
            if owner.setdefault(name, split_name) != split_name:
                raise ValueError(f"alphabet {name!r} is listed for both {owner[name]!r} and "
                                 f"{split_name!r}; splits must not share alphabets")
    return {split_name: set(names) for split_name, names in alphabets.items()}


def _select_characters(
    keys: Sequence[CharacterKey],
    split: str,
    split_by: str,
    fractions: Sequence[float],
    seed: int,
    alphabets: Optional[Mapping[str, Sequence[str]]],
) -> List[int]:
    """Indices into ``keys`` (sorted) of the characters in ``split``."""
    if split == "all":
        return list(range(len(keys)))
    split_index = SPLITS.index(split)
    if split_by == "character":
        counts = _split_counts(len(keys), fractions)
        start = sum(counts[:split_index])
        chosen = _seeded_order(len(keys), seed)[start : start + counts[split_index]]
        how = f"{len(keys)} characters cut {counts} by fractions {tuple(fractions)}"
    else:
        available = sorted({alphabet for alphabet, _ in keys})
        if alphabets is not None:
            split_alphabets = _check_alphabet_lists(alphabets, available).get(split, set())
            how = f"alphabets given for {sorted(alphabets)}"
        else:
            counts = _split_counts(len(available), fractions)
            start = sum(counts[:split_index])
            order = _seeded_order(len(available), seed)[start : start + counts[split_index]]
            split_alphabets = {available[i] for i in order}
            how = f"{len(available)} alphabets cut {counts} by fractions {tuple(fractions)}"
        chosen = [i for i, (alphabet, _) in enumerate(keys) if alphabet in split_alphabets]
    if not chosen:
        raise ValueError(f"the {split!r} split is empty ({how}); choose other fractions or lists")
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# The dataset


class Omniglot:
    """The characters of one meta-learning split of Omniglot, as 28x28 images.

    Args:
        root: a folder holding the official archives (``images_background.zip``,
            ``images_evaluation.zip``, ``images_background_small1.zip``, ... and/or the folders they
            unpack to), or one archive or unpacked folder itself. A character present in several
            archives (the two minimal splits share Greek and Latin) is counted once; copies must be
            identical, else :class:`DatasetError`. Where both ``X.zip`` and its folder ``X/``
            exist, the zip is read.
        split: ``"train"``, ``"val"``, ``"test"``, or ``"all"`` (every character, no split).
        split_by: ``"character"``: all characters are shuffled with ``seed`` and cut in the ratio
            ``fractions``. ``"alphabet"``: whole alphabets go to one split, either as listed in
            ``alphabets`` or shuffled with ``seed`` and cut by ``fractions`` (counting alphabets).
            Default: ``"alphabet"`` when ``alphabets`` is given, else ``"character"``.
        fractions: relative ``(train, val, test)`` sizes; ``(0.8, 0.1, 0.1)`` and ``(8, 1, 1)`` mean
            the same. Default :data:`PAPER_SPLIT_SIZES`, ``(1100, 100, 423)``: on the full
            1623-character set exactly the MAML code's split, on smaller sets the same proportions.
            Counts are rounded by largest remainder, so the three splits always cover everything.
        seed: seeds the split's shuffle (not the task sampling): the same seed and archives give
            the same split.
        alphabets: explicit alphabet lists per split, e.g. ``{"train": [...], "test": [...]}``;
            alphabets listed nowhere are left out.
        rotations: count the 90/180/270-degree rotations of each character as three more classes.
        archives: names of the archives (or folders) in ``root`` to read, with or without
            ``.zip``; default: every ``images_background*`` and ``images_evaluation*`` one.
        cache_dir: where the decoded images are cached, one file per archive; default
            ``$MAML_EXT_CACHE_DIR``, else ``<root>/.maml_ext_cache`` when ``root`` is writable,
            else ``~/.cache/maml_ext``.
        cache: set False to decode the PNGs without reading or writing a cache.

    Attributes:
        images: float32 ``[num_images, 1, 28, 28]``, ink 1, the unrotated drawings.
        labels: int64 ``[num_images]``, the character index (into ``characters``) of each image.
        characters: ``(alphabet, character)`` of each character index, sorted.
        rotations: rotated copies per character (4 or 1); class ``c`` is character
            ``c // rotations`` turned by ``torch.rot90(image, c % rotations, dims=(-2, -1))``.
        drawings: where each image came from (``archive.zip:member`` or a file path).
        duplicate_characters: ``"Alphabet/character"`` of each character found in several archives
            (over all archives read, before the split).
        cache_paths, from_cache: the cache files, one per archive (none when ``cache=False``),
            and whether every archive was loaded from its cache file.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        split_by: Optional[str] = None,
        fractions: Sequence[float] = PAPER_SPLIT_SIZES,
        seed: int = 0,
        alphabets: Optional[Mapping[str, Sequence[str]]] = None,
        rotations: bool = True,
        archives: Optional[Sequence[str]] = None,
        cache_dir: Optional[PathLike] = None,
        cache: bool = True,
    ):
        if split not in SPLITS + ("all",):
            raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
        if split_by is None:
            split_by = "alphabet" if alphabets is not None else "character"
        if split_by not in ("character", "alphabet"):
            raise ValueError(f"split_by must be 'character' or 'alphabet', got {split_by!r}")
        if alphabets is not None and split_by != "alphabet":
            raise ValueError("alphabets lists split by alphabet; drop split_by='character'")
        _split_counts(1, fractions)  # validates fractions before the (slow) decoding

        self.root = Path(root)
        self.split = split
        self.split_by = split_by
        self.fractions = tuple(fractions)
        self.seed = seed
        self.rotations = len(ROTATION_DEGREES) if rotations else 1

        found = _find_archives(self.root, archives)
        self.archives = [archive.path for archive in found]
        self.cache_paths: List[Path] = []
        decoded, loaded_from_cache = [], []
        for archive in found:
            arrays, cache_path, hit = self._load_archive(archive, cache_dir, cache)
            decoded.append(arrays)
            loaded_from_cache.append(hit)
            if cache_path is not None:
                self.cache_paths.append(cache_path)
        self.from_cache = all(loaded_from_cache)
        keys, ink, image_character, drawings, duplicates = _merge_archives(found, decoded)

        selected = _select_characters(keys, split, split_by, self.fractions, seed, alphabets)
        label_of_character = np.full(len(keys), -1, dtype=np.int64)
        label_of_character[selected] = np.arange(len(selected))
        labels = label_of_character[image_character]
        keep = labels >= 0

        self.characters: List[CharacterKey] = [keys[i] for i in selected]
        self.images = _ink_to_float(ink[keep])
        self.labels = torch.from_numpy(labels[keep])
        self.drawings: List[str] = [d for d, kept in zip(drawings, keep.tolist()) if kept]
        self.duplicate_characters: List[str] = duplicates

    def _load_archive(
        self, archive: _Archive, cache_dir: Optional[PathLike], use_cache: bool
    ) -> Tuple[Dict[str, np.ndarray], Optional[Path], bool]:
        """One archive's decoded arrays, from its cache file when that is current."""
        if not use_cache:
            return _decode_archive(archive), None, False
        description = {
            "dataset": "omniglot",
            "image_size": OMNIGLOT_IMAGE_SIZE,
            "archive": archive.signature(),
        }
        path, key = cache_file(f"omniglot-{archive.path.stem}", description, self.root, cache_dir)
        arrays = load_cached_arrays(path, key)
        if arrays is not None:
            return arrays, path, True
        arrays = _decode_archive(archive)
        save_cached_arrays(path, key, arrays)
        return arrays, path, False

    @property
    def alphabets(self) -> List[str]:
        """The alphabets with characters in this split, sorted."""
        return sorted({alphabet for alphabet, _ in self.characters})

    @property
    def num_characters(self) -> int:
        return len(self.characters)

    @property
    def num_classes(self) -> int:
        """Characters times rotations: the classes a task's ways are drawn from."""
        return self.num_characters * self.rotations

    def class_name(self, class_id: int) -> str:
        """``"Alphabet/characterNN"``, with ``" rotated 90°"`` (etc.) for a rotated class."""
        if not 0 <= class_id < self.num_classes:
            raise IndexError(f"class {class_id} out of range; there are {self.num_classes}")
        alphabet, character = self.characters[class_id // self.rotations]
        degrees = ROTATION_DEGREES[class_id % self.rotations]
        return f"{alphabet}/{character}" + (f" rotated {degrees}°" if degrees else "")

    def __len__(self) -> int:
        """Images counting rotated copies: ``rotations * num_images``."""
        return self.rotations * self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        """``(image [1, 28, 28], class id)``; indices past ``num_images`` are rotated copies."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        rotation, image_index = divmod(index % len(self), self.images.shape[0])
        image = torch.rot90(self.images[image_index], rotation, dims=(-2, -1))
        return image, int(self.labels[image_index]) * self.rotations + rotation

    def __repr__(self) -> str:
        return (
            f"Omniglot(split={self.split!r}, split_by={self.split_by!r}, "
            f"alphabets={len(self.alphabets)}, characters={self.num_characters}, "
            f"images={self.images.shape[0]}, rotations={self.rotations})"
        )

"""Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015) as the MAML paper uses it.

The official archives hold 105x105 one-bit PNGs laid out as
``images_background/<Alphabet>/<characterNN>/<drawer>_<nn>.png`` (20 drawings of every character).
:class:`Omniglot` reads the zip files or their unpacked folders, shrinks every drawing to 28x28 with
:func:`omniglot_image`, caches the result, splits the characters into meta-train / meta-validation
/ meta-test, and counts each character's 90/180/270-degree rotations as further classes (Santoro
et al. 2016, as the MAML paper does). The rotated images are not stored: :class:`TaskSampler`
makes them with ``torch.rot90`` when a rotated class is drawn.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ._data_errors import PathLike, cache_file, load_cached_arrays, save_cached_arrays
from .omniglot_archive import (
    OMNIGLOT_IMAGE_SIZE,
    Archive,
    CharacterKey,
    decode_archive,
    find_archives,
    ink_to_float,
    merge_archives,
    omniglot_image,
)

__all__ = ["Omniglot", "omniglot_image", "OMNIGLOT_IMAGE_SIZE", "PAPER_SPLIT_SIZES", "SPLITS"]

# The MAML code's split of all 1623 characters: 1200 for meta-training, of which 100 are held out
# for meta-validation, and the remaining 423 for meta-testing. Other sets are split in proportion.
PAPER_SPLIT_SIZES = (1100, 100, 423)
SPLITS = ("train", "val", "test")
ROTATION_DEGREES = (0, 90, 180, 270)


# --------------------------------------------------------------------------------------------
# Splits


def split_counts(total: int, fractions: Sequence[float]) -> tuple[int, int, int]:
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


def _seeded_order(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(count, generator=generator).tolist()


def _check_alphabet_lists(
    alphabets: Mapping[str, Sequence[str]],
    available: Sequence[str],
    argument: str = "alphabets",
    unit: str = "alphabet",
) -> dict[str, set]:
    # argument/unit: how messages name the lists and their items (ImageFolderTasks: groups).
    source = "archives" if argument == "alphabets" else "folders"
    unknown_splits = set(alphabets) - set(SPLITS)
    if unknown_splits:
        raise ValueError(f"{argument} has keys {sorted(unknown_splits)}; allowed: {list(SPLITS)}")
    owner: dict[str, str] = {}
    for split_name, names in alphabets.items():
        if isinstance(names, str):
            raise ValueError(f"{argument}[{split_name!r}] must be a list of names, not a string")
        for name in names:
            if name not in available:
                raise ValueError(
                    f"{argument}[{split_name!r}] names {name!r}, which is not in the {source} "
                    f"read; available: {', '.join(available)}"
                )
            if owner.setdefault(name, split_name) != split_name:
                raise ValueError(
                    f"{unit} {name!r} is listed for both {owner[name]!r} and "
                    f"{split_name!r}; splits must not share {unit}s"
                )
    return {split_name: set(names) for split_name, names in alphabets.items()}


def _select_characters(
    keys: Sequence[CharacterKey],
    split: str,
    split_by: str,
    fractions: Sequence[float],
    seed: int,
    alphabets: Mapping[str, Sequence[str]] | None,
    words: tuple[str, str, str] = ("character", "alphabet", "alphabets"),
) -> list[int]:
    """Indices into ``keys`` (sorted) of the characters in ``split``.

    ``split_by`` is ``words[0]`` (items) or ``words[1]`` (their groups, ``key[0]``); ``words[2]``
    is the argument that lists groups. :class:`ImageFolderTasks` says class, group and groups.
    """
    item, group, argument = words
    if split == "all":
        return list(range(len(keys)))
    split_index = SPLITS.index(split)
    if split_by == item:
        counts = split_counts(len(keys), fractions)
        start = sum(counts[:split_index])
        chosen = _seeded_order(len(keys), seed)[start : start + counts[split_index]]
        how = f"{len(keys)} {item}s cut {counts} by fractions {tuple(fractions)}"
    else:
        available = sorted({alphabet for alphabet, _ in keys})
        if alphabets is not None:
            split_alphabets = _check_alphabet_lists(alphabets, available, argument, group).get(
                split, set()
            )
            how = f"{argument} given for {sorted(alphabets)}"
        else:
            counts = split_counts(len(available), fractions)
            start = sum(counts[:split_index])
            order = _seeded_order(len(available), seed)[start : start + counts[split_index]]
            split_alphabets = {available[i] for i in order}
            how = f"{len(available)} {group}s cut {counts} by fractions {tuple(fractions)}"
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
        split_by: str | None = None,
        fractions: Sequence[float] = PAPER_SPLIT_SIZES,
        seed: int = 0,
        alphabets: Mapping[str, Sequence[str]] | None = None,
        rotations: bool = True,
        archives: Sequence[str] | None = None,
        cache_dir: PathLike | None = None,
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
        split_counts(1, fractions)  # validates fractions before the (slow) decoding

        self.root = Path(root)
        self.split = split
        self.split_by = split_by
        self.fractions = tuple(fractions)
        self.seed = seed
        self.rotations = len(ROTATION_DEGREES) if rotations else 1

        found = find_archives(self.root, archives)
        self.archives = [archive.path for archive in found]
        self.cache_paths: list[Path] = []
        decoded, loaded_from_cache = [], []
        for archive in found:
            arrays, cache_path, hit = self._load_archive(archive, cache_dir, cache)
            decoded.append(arrays)
            loaded_from_cache.append(hit)
            if cache_path is not None:
                self.cache_paths.append(cache_path)
        self.from_cache = all(loaded_from_cache)
        keys, ink, image_character, drawings, duplicates = merge_archives(found, decoded)

        selected = _select_characters(keys, split, split_by, self.fractions, seed, alphabets)
        label_of_character = np.full(len(keys), -1, dtype=np.int64)
        label_of_character[selected] = np.arange(len(selected))
        labels = label_of_character[image_character]
        keep = labels >= 0

        self.characters: list[CharacterKey] = [keys[i] for i in selected]
        self.images = ink_to_float(ink[keep])
        self.labels = torch.from_numpy(labels[keep])
        self.drawings: list[str] = [d for d, kept in zip(drawings, keep.tolist()) if kept]
        self.duplicate_characters: list[str] = duplicates

    def _load_archive(
        self, archive: Archive, cache_dir: PathLike | None, use_cache: bool
    ) -> tuple[dict[str, np.ndarray], Path | None, bool]:
        """One archive's decoded arrays, from its cache file when that is current."""
        if not use_cache:
            return decode_archive(archive), None, False
        description = {
            "dataset": "omniglot",
            "image_size": OMNIGLOT_IMAGE_SIZE,
            "archive": archive.signature(),
        }
        path, key = cache_file(f"omniglot-{archive.path.stem}", description, self.root, cache_dir)
        arrays = load_cached_arrays(path, key)
        if arrays is not None:
            return arrays, path, True
        arrays = decode_archive(archive)
        save_cached_arrays(path, key, arrays)
        return arrays, path, False

    @property
    def alphabets(self) -> list[str]:
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
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

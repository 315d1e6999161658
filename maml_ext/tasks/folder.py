"""Your own images as few-shot classes: a folder of class folders, at any depth of grouping.

A class is a folder that holds image files directly; the folders above it group classes, e.g.::

    root/                       root/
      cat/ 001.jpg 002.png ...    Latin/ a/ 01.png ...  b/ ...
      dog/ ...                    Greek/ alpha/ ...     beta/ ...

The class's name is its path below ``root`` (``Latin/a``), its group the first folder of that
path (``Latin``; a class straight under ``root`` is its own group). Any file whose extension
Pillow can open is an image; other files, and names starting with ``.``, are skipped. Every image
is decoded once, resized to ``image_size`` x ``image_size`` (aspect ratio not kept) and cached with
the same machinery as :class:`Omniglot` (``.npz`` keyed by the files' names, sizes and mtimes,
beside the data when writable, else elsewhere); the split is made in memory from the cache, with
:class:`Omniglot`'s split rules, so every split of one tree shares one cache file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from maml_ext._optional import require

from ._data_errors import (
    DatasetError,
    PathLike,
    cache_file,
    file_signature,
    load_cached_arrays,
    save_cached_arrays,
)
from .omniglot import ROTATION_DEGREES, SPLITS, _select_characters, split_counts

__all__ = ["ImageFolderTasks", "FOLDER_SPLIT_FRACTIONS"]

# miniImageNet's 64 / 16 / 20 classes, as fractions.
FOLDER_SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
# PIL modes whose pixels are one value: decoded as one channel when ``channels`` is automatic.
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _pil_image():
    return require("PIL.Image", "reading image folders (ImageFolderTasks)")


def _image_suffixes() -> set[str]:
    """The extensions Pillow can open, lower case with the dot (``.png``, ``.jpg``, ...)."""
    Image = _pil_image()
    Image.init()  # registers every plugin, not only the common ones
    return {
        suffix.lower()
        for suffix, name in Image.registered_extensions().items()
        if name in Image.OPEN
    }


def find_classes(root: Path) -> list[tuple[tuple[str, ...], list[Path]]]:
    """``(class path parts, sorted image files)`` of every class folder under ``root``, sorted."""
    suffixes = _image_suffixes()
    classes = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        images = sorted(
            Path(folder) / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes
        )
        if not images:
            continue
        parts = Path(folder).relative_to(root).parts
        if not parts:
            raise DatasetError(
                f"{root} holds images itself ({images[0].name}, ...); put each class's images "
                f"in a folder of its own under it"
            )
        if subfolders:
            raise DatasetError(
                f"{folder} holds both images ({images[0].name}, ...) and folders "
                f"({', '.join(subfolders[:3])}); a class folder must hold only images"
            )
        classes.append((parts, images))
    if not classes:
        raise DatasetError(
            f"no images found under {root}: expected class folders of image files "
            f"({', '.join(sorted(suffixes & {'.png', '.jpg', '.jpeg', '.bmp', '.gif'}))}, ...)"
        )
    return sorted(classes)


def _decode(path: Path, size: int, channels: int | None) -> np.ndarray:
    """uint8 ``[size, size]`` (one channel) or ``[size, size, 3]``; ``channels`` None keeps a
    grayscale image in one channel."""
    Image = _pil_image()  # outside the try: a missing extra is not a damaged file
    try:
        with Image.open(path) as image:
            gray = channels == 1 or (channels is None and image.mode in _GRAY_MODES)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit/float: scale first
                image = Image.fromarray(_to_uint8(np.asarray(image)))
            converted = image.convert("L" if gray else "RGB")
            if converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(converted, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for damaged files
        raise DatasetError(f"{path}: not a readable image: {exc}") from exc


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((pixels - low) * scale).astype(np.uint8)


def _decode_all(paths: Sequence[Path], size: int, channels: int | None) -> np.ndarray:
    """uint8 ``[N, C, size, size]``; with ``channels`` None, C is 3 if any image has colour."""
    _pil_image()  # a missing extra fails once, here, rather than in every thread
    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up.
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda path: _decode(path, size, channels), paths))
    colour = any(pixels.ndim == 3 for pixels in decoded)
    if colour:
        decoded = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=-1) for p in decoded]
        return np.stack(decoded).transpose(0, 3, 1, 2).copy()
    return np.stack(decoded)[:, None]


class ImageFolderTasks:
    """The classes of one meta-learning split of an image-folder tree, held in memory as uint8.

    Pass it to :class:`TaskSampler` for N-way K-shot meta-batches (``TaskSampler(data, ways=5,
    shots=1, queries=15, meta_batch=4)``).

    Args:
        root: the tree's top folder (see the module docstring); may be read-only.
        image_size: the side every image is resized to.
        split: ``"train"``, ``"val"``, ``"test"``, or ``"all"`` (every class).
        split_by: ``"class"``: all classes are shuffled with ``seed`` and cut in the ratio
            ``fractions``; ``"group"``: whole top-level groups go to one split, listed in
            ``groups`` or shuffled with ``seed`` and cut by ``fractions`` (counting groups).
            Default: ``"group"`` when ``groups`` is given, else ``"class"``. As
            :class:`Omniglot`'s ``split_by`` (character, alphabet), which it shares its rules with.
        fractions: relative ``(train, val, test)`` sizes; default :data:`FOLDER_SPLIT_FRACTIONS`
            (miniImageNet's 64 : 16 : 20). Rounded by largest remainder.
        seed: seeds the split's shuffle: the same seed and tree give the same split.
        groups: explicit group lists per split, ``{"train": [...], "test": [...]}``.
        channels: 1 (grayscale), 3 (RGB), or None: 1 when every image is grayscale, else 3.
        rotations: count each class's 90/180/270-degree rotations as three more classes (as
            :class:`Omniglot` does); the rotated images are made by :class:`TaskSampler`.
        min_images: when given, :class:`DatasetError` before anything else uses the data if a
            class of the split has fewer images (e.g. ``shots + queries``), naming every such
            class; see :meth:`require_images_per_class`.
        cache_dir: where the decoded images are cached; default ``$MAML_EXT_CACHE_DIR``, else
            ``<root>/.maml_ext_cache`` when ``root`` is writable, else ``~/.cache/maml_ext``.
        cache: set False to decode without reading or writing a cache.

    Raises:
        DatasetError: no class folders, a folder holding both images and folders, or an image
            Pillow cannot read (the message names the file).

    Attributes:
        images: uint8 ``[num_images, channels, image_size, image_size]``, the split's images.
        labels: int64 ``[num_images]``, the class index (into ``class_names``) of each image.
        class_names: the split's classes as paths below ``root`` (``"Latin/a"``), sorted.
        groups: the split's top-level groups, sorted. ``files``: the source of each image.
        channels, rotations: as above (``rotations`` is 4 or 1, for :class:`TaskSampler`).
        cache_path, from_cache: the cache file (None with ``cache=False``), whether it was read.
    """

    def __init__(
        self,
        root: PathLike,
        image_size: int,
        split: str = "train",
        *,
        split_by: str | None = None,
        fractions: Sequence[float] = FOLDER_SPLIT_FRACTIONS,
        seed: int = 0,
        groups: Mapping[str, Sequence[str]] | None = None,
        channels: int | None = None,
        rotations: bool = False,
        min_images: int | None = None,
        cache_dir: PathLike | None = None,
        cache: bool = True,
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
        if split not in SPLITS + ("all",):
            raise ValueError(f"split: expected one of {SPLITS + ('all',)}, got {split!r}")
        if split_by is None:
            split_by = "group" if groups is not None else "class"
        if split_by not in ("class", "group"):
            raise ValueError(f"split_by: expected 'class' or 'group', got {split_by!r}")
        if groups is not None and split_by != "group":
            raise ValueError("groups lists split by group; drop split_by='class'")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels: expected 1, 3 or None (automatic), got {channels!r}")
        split_counts(1, fractions)  # validates fractions before the (slow) decoding
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {self.root} is not a folder")
        self.image_size, self.split, self.split_by = image_size, split, split_by
        self.fractions, self.seed = tuple(fractions), seed
        self.rotations = len(ROTATION_DEGREES) if rotations else 1

        found = find_classes(self.root)
        paths = [path for _, files in found for path in files]
        pixels, self.cache_path, self.from_cache = self._load(paths, channels, cache_dir, cache)
        self.channels = int(pixels.shape[1])
        counts = [len(files) for _, files in found]
        class_of_image = np.repeat(np.arange(len(found)), counts)

        # Omniglot's split rules on (group, class) keys: a class straight under root is a group.
        keys = [(parts[0], "/".join(parts)) for parts, _ in found]
        try:
            chosen = _select_characters(
                keys, split, split_by, fractions, seed, groups, ("class", "group", "groups")
            )
        except ValueError as error:
            raise DatasetError(f"{self.root}: {error}") from error
        self.class_names = [keys[i][1] for i in chosen]
        self.groups = sorted({keys[i][0] for i in chosen})
        new_index = np.full(len(found), -1)
        new_index[chosen] = np.arange(len(chosen))
        keep = new_index[class_of_image] >= 0
        self.images = torch.from_numpy(pixels[keep])
        self.labels = torch.from_numpy(new_index[class_of_image][keep]).to(torch.int64)
        self.files = [str(path) for path, kept in zip(paths, keep) if kept]
        if min_images is not None:
            self.require_images_per_class(min_images)

    def _load(self, paths, channels, cache_dir, use_cache) -> tuple[np.ndarray, Path | None, bool]:
        if not use_cache:
            return _decode_all(paths, self.image_size, channels), None, False
        signatures = [list(file_signature(path, relative_to=self.root)) for path in paths]

        def cache_for(requested):
            description = {
                "dataset": "image-folder",
                "image_size": self.image_size,
                "channels": requested,
                "images": signatures,
            }
            return cache_file("folder", description, self.root, cache_dir)

        path, key = cache_for(None)
        if channels is not None:
            # A run fixes the channels it found automatically; its cache file still serves.
            cached = load_cached_arrays(path, key)
            if cached is not None and cached["images"].shape[1] == channels:
                return cached["images"], path, True
            path, key = cache_for(channels)
        cached = load_cached_arrays(path, key)
        if cached is not None:
            return cached["images"], path, True
        pixels = _decode_all(paths, self.image_size, channels)
        save_cached_arrays(path, key, {"images": pixels})
        return pixels, path, False

    @property
    def num_classes(self) -> int:
        """Classes of the split, rotations not counted."""
        return len(self.class_names)

    def images_per_class(self) -> dict[str, int]:
        """``{class name: number of images}`` of the split."""
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return dict(zip(self.class_names, counts))

    def require_images_per_class(self, count: int, why: str | None = None) -> None:
        """:class:`DatasetError` naming every class of the split with fewer than ``count`` images
        (``why``: what needs them, e.g. ``"1 shot + 15 queries"``), so that a run fails before
        training rather than when such a class is first drawn."""
        short = {name: n for name, n in self.images_per_class().items() if n < count}
        if short:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(short.items()))
            reason = f" for {why}" if why else ""
            raise DatasetError(
                f"{len(short)} of {self.num_classes} classes of the {self.split!r} split of "
                f"{self.root} have fewer than the {count} images needed{reason}: {listed}; add "
                f"images, remove those classes, or ask for fewer shots or queries"
            )

    def class_name(self, class_id: int) -> str:
        """The name of sampler class ``class_id`` (rotations included: ``"Latin/a (90°)"``)."""
        name = self.class_names[class_id // self.rotations]
        turn = class_id % self.rotations
        return f"{name} ({ROTATION_DEGREES[turn]}°)" if turn else name

    def prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., C, H, W]`` to contiguous float32 in [0, 1]."""
        return images.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255)

    def __len__(self) -> int:
        return self.images.shape[0] * self.rotations

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(float image [C, H, W], class)``; as :class:`Omniglot`, rotations follow the
        unrotated images."""
        rotation, image_index = divmod(index, self.images.shape[0])
        image = torch.rot90(self.images[image_index], rotation, dims=(-2, -1))
        return self.prepare_batch(image), int(self.labels[image_index]) * self.rotations + rotation

    def __repr__(self) -> str:
        return (
            f"ImageFolderTasks(root={str(self.root)!r}, split={self.split!r}, "
            f"split_by={self.split_by!r}, classes={self.num_classes}, images={len(self.labels)}, "
            f"image_size={self.image_size}, channels={self.channels}, rotations={self.rotations})"
        )

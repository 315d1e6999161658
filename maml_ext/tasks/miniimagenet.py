"""miniImageNet (Vinyals et al. 2016) in the split of Ravi and Larochelle (2017): 64 / 16 / 20
classes of 600 images, 84x84 RGB.

The images cannot be downloaded here; :class:`MiniImageNet` reads the two layouts in which people
have them:

- ``"csv"``: Ravi and Larochelle's ``train.csv`` / ``val.csv`` / ``test.csv`` (header
  ``filename,label``) beside an ``images/`` folder of JPEGs. Images that are not 84x84 are resized
  (PIL LANCZOS, aspect ratio not kept, as their script does). The decoded arrays are cached.
- ``"pickle"``: the cache files learn2learn and others distribute,
  ``mini-imagenet-cache-{train,validation,test}.pkl``, each a pickled dict with ``image_data``
  (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (class name -> list of row indices). Unpickling runs
  code named in the file: only read files from a source you trust.
"""

import csv
import os
import pickle
from collections.abc import Sequence
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

__all__ = ["MiniImageNet", "MINI_IMAGENET_MEAN", "MINI_IMAGENET_STD", "MINI_IMAGENET_IMAGE_SIZE"]

MINI_IMAGENET_IMAGE_SIZE = 84
# Per-channel (R, G, B) mean and standard deviation of the miniImageNet training images, scaled to
# [0, 1] units: the constants MetaOptNet and RFS normalise with.
MINI_IMAGENET_MEAN = tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
MINI_IMAGENET_STD = tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))

SPLITS = ("train", "val", "test")
_PICKLE_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
_CSV_HEADER = ["filename", "label"]


def _csv_path(root: Path, split: str) -> Path:
    return root / f"{split}.csv"


def _pickle_path(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{_PICKLE_SPLIT_NAMES[split]}.pkl"


# --------------------------------------------------------------------------------------------
# The CSV layout


def _read_split_csv(csv_path: Path) -> tuple[list[str], list[str]]:
    """The ``(filenames, labels)`` rows of one of Ravi and Larochelle's split files."""
    try:
        with open(csv_path, newline="") as file:
            rows = list(csv.reader(file))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path} is not a text CSV file: {exc}") from exc
    if not rows or [cell.strip() for cell in rows[0]] != _CSV_HEADER:
        found = rows[0] if rows else "an empty file"
        raise DatasetError(f"{csv_path}: expected the header 'filename,label', found {found!r}")
    filenames, labels = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(
                f"{csv_path}, line {line_number}: expected 'filename,label', "
                f"found {','.join(row)!r}"
            )
        filenames.append(row[0].strip())
        labels.append(row[1].strip())
    if not filenames:
        raise DatasetError(f"{csv_path} lists no images")
    return filenames, labels


def _pil_image():
    """PIL's Image module (``experiments`` extra), imported when an image is decoded."""
    return require("PIL.Image", "decoding miniImageNet images")


def _decode_jpeg(path: Path) -> np.ndarray:
    """uint8 ``[84, 84, 3]``."""
    Image = _pil_image()  # outside the try: a missing extra is not a damaged file
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except Exception as exc:  # PIL raises many types for damaged files
        raise DatasetError(f"{path}: not a readable image: {exc}") from exc
    size = (MINI_IMAGENET_IMAGE_SIZE, MINI_IMAGENET_IMAGE_SIZE)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _load_csv_split(
    root: Path, split: str, cache_dir: PathLike | None, use_cache: bool
) -> tuple[np.ndarray, list[str], Path | None, bool]:
    """``(images [N, 84, 84, 3], label of each image, cache path, from cache)``."""
    csv_path = _csv_path(root, split)
    filenames, labels = _read_split_csv(csv_path)
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{image_dir} is missing: {csv_path.name} lists images expected "
            f"in an images/ folder beside it"
        )
    paths = [image_dir / name for name in filenames]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images listed in {csv_path} are missing, e.g. "
            f"{', '.join(str(path) for path in missing[:3])}"
        )

    if not use_cache:
        return _decode_all(paths), labels, None, False
    description = {
        "dataset": "miniimagenet-csv",
        "image_size": MINI_IMAGENET_IMAGE_SIZE,
        "csv": list(file_signature(csv_path)),
        "images": [list(file_signature(path, relative_to=root)) for path in paths],
    }
    cache_path, key = cache_file(f"miniimagenet-{split}", description, root, cache_dir)
    cached = load_cached_arrays(cache_path, key)
    if cached is not None:
        return cached["images"], labels, cache_path, True
    images = _decode_all(paths)
    save_cached_arrays(cache_path, key, {"images": images})
    return images, labels, cache_path, False


def _decode_all(paths: Sequence[Path]) -> np.ndarray:
    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up.
    _pil_image()  # a missing extra fails once, here, rather than in every thread
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(_decode_jpeg, paths, chunksize=64)))


# --------------------------------------------------------------------------------------------
# The pickle layout


def _load_pickle_split(pickle_path: Path) -> tuple[np.ndarray, list[str], list[int]]:
    """``(images [N, 84, 84, 3], class names, class index of each image)``; rows in no class are
    dropped."""
    try:
        with open(pickle_path, "rb") as file:
            try:
                content = pickle.load(file)
            except UnicodeDecodeError:  # pickles written by Python 2
                file.seek(0)
                content = pickle.load(file, encoding="latin1")
    except Exception as exc:  # unpickling damaged bytes raises many types
        raise DatasetError(f"{pickle_path} is not a readable pickle: {exc}") from exc

    expected = (
        "expected a dict with 'image_data' (uint8 [N, 84, 84, 3]) and 'class_dict' "
        "(class name -> list of indices)"
    )
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatasetError(f"{pickle_path}: {expected}; found {found}")
    image_data, class_dict = content["image_data"], content["class_dict"]
    size = MINI_IMAGENET_IMAGE_SIZE
    if (
        not isinstance(image_data, np.ndarray)
        or image_data.dtype != np.uint8
        or image_data.ndim != 4
        or image_data.shape[1:] != (size, size, 3)
    ):
        found = (
            f"{image_data.dtype} {image_data.shape}"
            if isinstance(image_data, np.ndarray)
            else type(image_data).__name__
        )
        raise DatasetError(f"{pickle_path}: 'image_data' is {found}; {expected}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DatasetError(f"{pickle_path}: 'class_dict' is empty or not a dict; {expected}")

    class_names = sorted(class_dict)
    rows, row_class = [], []
    for class_index, name in enumerate(class_names):
        indices = np.asarray(class_dict[name]).reshape(-1)
        if indices.size and (
            not np.issubdtype(indices.dtype, np.integer)
            or indices.min() < 0
            or indices.max() >= len(image_data)
        ):
            raise DatasetError(
                f"{pickle_path}: class_dict[{name!r}] holds indices outside "
                f"0..{len(image_data) - 1} (image_data has {len(image_data)} rows)"
            )
        rows.extend(indices.tolist())
        row_class.extend([class_index] * indices.size)
    if len(set(rows)) != len(rows):
        raise DatasetError(f"{pickle_path}: class_dict lists some images under several classes")
    # Rows already grouped by class in order need no copy (the usual case for these files).
    if rows != list(range(len(image_data))):
        image_data = image_data[rows]
    return image_data, class_names, row_class


# --------------------------------------------------------------------------------------------
# The dataset


class MiniImageNet:
    """One split of miniImageNet, held in memory as uint8 and normalised batch by batch.

    Args:
        root: the folder holding either layout (see the module docstring).
        split: ``"train"``, ``"val"`` or ``"test"``.
        layout: ``"csv"`` or ``"pickle"``; default: the CSV layout when ``<split>.csv`` exists,
            else the pickle.
        normalize: subtract ``mean`` and divide by ``std`` per channel after scaling to [0, 1];
            False: only scale to [0, 1].
        mean, std: per-channel (R, G, B) constants; default the miniImageNet training-set
            statistics :data:`MINI_IMAGENET_MEAN` and :data:`MINI_IMAGENET_STD`.
        cache_dir, cache: where the decoded CSV-layout images are cached (default
            ``$MAML_EXT_CACHE_DIR``, else ``<root>/.maml_ext_cache`` when writable, else
            ``~/.cache/maml_ext``), and whether to use a cache at all. Pickles need none.

    Attributes:
        images: uint8 ``[num_images, 3, 84, 84]`` raw pixels (possibly a strided view);
            :meth:`prepare_batch` or indexing gives the float model input.
        labels: int64 ``[num_images]``, the class index (into ``class_names``) of each image.
        class_names: the class labels (WordNet ids) of the split, sorted.
        rotations: always 1 (no rotated classes), for :class:`TaskSampler`.
        cache_path, from_cache: the cache file used (None for pickles or ``cache=False``) and
            whether the images came from it.
    """

    rotations = 1

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        layout: str | None = None,
        normalize: bool = True,
        mean: Sequence[float] = MINI_IMAGENET_MEAN,
        std: Sequence[float] = MINI_IMAGENET_STD,
        cache_dir: PathLike | None = None,
        cache: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if layout not in (None, "csv", "pickle"):
            raise ValueError(f"layout must be 'csv', 'pickle' or None, got {layout!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"miniImageNet root {self.root} is not a folder")

        csv_path, pickle_path = _csv_path(self.root, split), _pickle_path(self.root, split)
        if layout is None:
            if csv_path.is_file():
                layout = "csv"
            elif pickle_path.is_file():
                layout = "pickle"
            else:
                raise FileNotFoundError(
                    f"no miniImageNet {split!r} split in {self.root}: expected {csv_path.name} "
                    f"with an images/ folder, or {pickle_path.name}"
                )
        self.layout = layout
        self.cache_path: Path | None = None
        self.from_cache = False

        if layout == "csv":
            if not csv_path.is_file():
                raise FileNotFoundError(f"{csv_path} is missing (layout='csv')")
            pixels, image_classes, self.cache_path, self.from_cache = _load_csv_split(
                self.root, split, cache_dir, cache
            )
            self.class_names: list[str] = sorted(set(image_classes))
            index_of = {name: i for i, name in enumerate(self.class_names)}
            labels = [index_of[name] for name in image_classes]
        else:
            if not pickle_path.is_file():
                raise FileNotFoundError(f"{pickle_path} is missing (layout='pickle')")
            pixels, self.class_names, labels = _load_pickle_split(pickle_path)

        # A channels-first view of the [N, H, W, 3] pixels: copying 38,400 training images
        # would double the memory for nothing, as batches are made contiguous when prepared.
        self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.normalize = normalize
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_name(self, class_id: int) -> str:
        return self.class_names[class_id]

    def prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` to contiguous float32: ``(x / 255 - mean) / std``, or
        ``x / 255`` without normalisation."""
        x = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255)
        if self.normalize:
            x = x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        return x

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(float image [3, 84, 84], class index)``."""
        return self.prepare_batch(self.images[index]), int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"MiniImageNet(split={self.split!r}, layout={self.layout!r}, "
            f"classes={self.num_classes}, images={len(self)})"
        )

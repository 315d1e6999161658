"""What the image loaders share: the error they raise for bad files, and their decoded-array cache.

Decoding thousands of PNGs or JPEGs takes seconds to minutes; the loaders therefore keep the
decoded arrays in one ``.npz`` file per input (an Omniglot archive, a miniImageNet split), named
after a key made of the input files' names, sizes and modification times, so that any change to
the inputs makes a fresh file.
"""

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..types import PathLike

__all__ = [
    "DatasetError",
    "cache_file",
    "file_signature",
    "load_cached_arrays",
    "save_cached_arrays",
]


# Bump when the cached arrays' meaning changes (preprocessing, field names): old files are ignored.
CACHE_FORMAT_VERSION = 1
_KEY_FIELD = "cache_key"


class DatasetError(ValueError):
    """A dataset file is corrupt or not laid out as the loader expects; the message names it."""


def file_signature(path: Path, relative_to: Path | None = None) -> tuple[str, int, int]:
    """``(name, size, mtime_ns)`` of a file: what the cache key is made of."""
    stat = path.stat()
    name = path.relative_to(relative_to).as_posix() if relative_to else path.name
    return name, stat.st_size, stat.st_mtime_ns


def _cache_key(description: object) -> str:
    text = json.dumps([CACHE_FORMAT_VERSION, description], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _default_cache_dir(root: Path) -> Path:
    """``$MAML_EXT_CACHE_DIR``, else a folder beside the data, else the user's cache folder.

    The data folder is often read-only (a shared mount), hence the fallback.
    """
    configured = os.environ.get("MAML_EXT_CACHE_DIR")
    if configured:
        return Path(configured)
    data_dir = root if root.is_dir() else root.parent
    if os.access(data_dir, os.W_OK):
        return data_dir / ".maml_ext_cache"
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "maml_ext"


def cache_file(
    prefix: str, description: object, root: Path, cache_dir: PathLike | None
) -> tuple[Path, str]:
    """Where the arrays described by ``description`` (JSON-able) are cached, and their key."""
    key = _cache_key(description)
    directory = Path(cache_dir) if cache_dir is not None else _default_cache_dir(root)
    return directory / f"{prefix}-{key[:20]}.npz", key


def load_cached_arrays(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays saved under ``key``, or None when the file is absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # a truncated or foreign file: rebuild it rather than fail
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None
    if str(arrays.pop(_KEY_FIELD, "")) != key:
        return None
    return arrays


def save_cached_arrays(path: Path, key: str, arrays: dict[str, np.ndarray]) -> bool:
    """Writes the arrays atomically; warns and returns False when the folder is not writable."""
    # Written under a temporary name and then renamed, so that a reader never sees half a file;
    # the name ends in .npz so that numpy does not append another suffix.
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(partial, **arrays, **{_KEY_FIELD: np.array(key)})
        os.replace(partial, path)
        return True
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        warnings.warn(f"could not write the cache file {path}: {exc}", stacklevel=3)
        return False

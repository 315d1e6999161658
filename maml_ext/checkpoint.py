"""Atomic file writes for checkpoints, logs and reports.

:func:`write_atomic` is the one mechanism: the bytes go to a temporary file in the target's
folder, are flushed and fsync'ed, and ``os.replace`` renames the file over the target. The
few-shot checkpoint format built on it lives with the presets, in
:mod:`maml_ext.experiments.fewshot.checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .types import PathLike

__all__ = [
    "write_atomic",
    "save_atomic",
    "write_text_atomic",
    "remove_stale_temporaries",
    "load_checkpoint",
]

_TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write(handle)`` on a binary file that becomes ``path`` only once it is complete.

    The data goes to a temporary file in the same folder, is flushed and fsync'ed, and then
    ``os.replace`` renames it over ``path`` (atomic on POSIX and Windows within one file system);
    the folder is fsync'ed too, so the rename survives a power cut. A crash at any moment leaves
    either the previous file or the new one at ``path``, never a partial one (at worst a stray
    ``.NAME.*.tmp`` beside it, which :func:`remove_stale_temporaries` deletes).
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(
        prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=folder
    )
    try:
        # mkstemp makes the file private (0600); give it the mode open() would have given it.
        os.chmod(temp_name, _new_file_mode())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_folder(folder)
    return path


@functools.cache
def _new_file_mode() -> int:
    # The umask can only be read by setting it; done once, then restored at once.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomic(obj, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` so that ``path`` always holds a complete file
    (:func:`write_atomic`)."""
    return write_atomic(path, lambda handle: torch.save(obj, handle))


def write_text_atomic(path: PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` so that ``path`` always holds a complete file
    (:func:`write_atomic`)."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def _fsync_folder(folder: Path) -> None:
    # Durability of the rename itself; not possible on every platform (Windows), so best effort.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove_stale_temporaries(path: PathLike) -> list:
    """Deletes temporary files a killed :func:`write_atomic` left beside ``path``; returns them.
    Call it only when no other process is saving to ``path``."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for candidate in path.parent.glob(_temp_prefix(path) + "*" + _TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def load_checkpoint(path: PathLike, **kwargs):
    """Any training checkpoint of ``python -m maml_ext train``: a meta-RL one gives an object
    whose ``.policy`` is the meta-learned :class:`maml_ext.rl.GaussianPolicy` (``.pretrained``:
    the baseline); a few-shot one gives :func:`maml_ext.experiments.load_checkpoint`'s
    MetaOptimizer. ``kwargs`` go to that loader."""
    from maml_ext.rl.train import is_rl_checkpoint

    if is_rl_checkpoint(path):
        from maml_ext.rl.train import load_rl_checkpoint

        return load_rl_checkpoint(path, **kwargs)
    from maml_ext.experiments import load_checkpoint as load_fewshot

    return load_fewshot(path, **kwargs)

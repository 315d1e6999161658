"""The report's cache of long runs: each run is stored under a key made from its settings, and
re-used while they are unchanged.

A run is one call of a ``compute(folder) -> dict`` function with a settings dict. Its folder is
``ROOT/NAME-KEY`` (KEY: the first 16 hex digits of the SHA-256 of the settings as sorted JSON);
``result.json`` in it holds the settings and the result, written atomically when ``compute``
returns, so an interrupted run leaves no result and runs again (a few-shot run resumes from its
own checkpoint there). Changing any setting changes the key: the old folder is simply not used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from maml_ext.checkpoint import write_text_atomic

from ..types import PathLike

__all__ = ["RunCache", "settings_key"]

# Part of every key: bump it when a run's result format changes, so old results are not read.
CACHE_FORMAT = "maml_ext.report/1"


def settings_key(settings: dict) -> str:
    """The first 16 hex digits of the SHA-256 of ``settings`` (JSON, keys sorted)."""
    text = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunCache:
    """Runs keyed by their settings under ``root``; ``root=None`` reuses nothing (every run is
    computed, in a folder under ``scratch``, which the caller removes)."""

    def __init__(self, root: PathLike | None, scratch: PathLike | None = None):
        self.root = Path(root) if root is not None else None
        self.scratch = Path(scratch) if scratch is not None else None
        self.hits: list[str] = []  # names of the runs read from the cache, for the report
        self.records: list[tuple[str, Path]] = []  # every run's name and folder, in order

    def folder(self, name: str, settings: dict) -> Path:
        base = self.root if self.root is not None else self.scratch
        if base is None:
            raise ValueError("RunCache needs a root or a scratch folder")
        return base / f"{name}-{settings_key(settings)}"

    def run(self, name: str, settings: dict, compute: Callable[[Path], dict]) -> dict:
        """The result of ``compute(folder)`` for ``settings``: read from ``folder/result.json``
        when a run with the same settings finished before, else computed and stored."""
        folder = self.folder(name, settings)
        self.records.append((name, folder))
        result_file = folder / "result.json"
        if self.root is not None and result_file.exists():
            stored = json.loads(result_file.read_text())
            if stored.get("settings") == json.loads(json.dumps(settings, default=str)):
                self.hits.append(name)
                return stored["result"]
        if self.root is None and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        result = compute(folder)
        record = {"name": name, "settings": settings, "result": result}
        write_text_atomic(result_file, json.dumps(record, indent=1, default=str))
        return json.loads(json.dumps(result, default=str))

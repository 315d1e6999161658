"""Atomic checkpoint writes and maml_ext.experiments.load_checkpoint (no data needed)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from maml_ext import MetaOptimizer
from maml_ext.checkpoint import remove_stale_temporaries, save_atomic
from maml_ext.experiments.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    build_meta_optimizer,
    load_checkpoint,
    read_checkpoint,
)
from maml_ext.experiments.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def _stray_files(folder: Path, name: str):
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_save_atomic_round_trip_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.pt"
    save_atomic({"x": torch.arange(5), "note": "first"}, target)
    save_atomic({"x": torch.arange(7), "note": "second"}, target)
    loaded = torch.load(target, weights_only=True)
    assert loaded["note"] == "second" and torch.equal(loaded["x"], torch.arange(7))
    assert _stray_files(target.parent, "state.pt") == []


def test_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    save_atomic({"version": 1, "x": torch.ones(1000)}, target)
    real_save = torch.save

    def save_half_then_fail(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # half the bytes are on disk
        handle.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_atomic({"version": 2, "x": torch.zeros(1000)}, target)
    monkeypatch.undo()
    loaded = torch.load(target, weights_only=True)
    assert loaded["version"] == 1 and torch.equal(loaded["x"], torch.ones(1000))
    assert _stray_files(tmp_path, "checkpoint.pt") == []  # the partial temporary was removed


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from maml_ext.checkpoint import save_atomic

    target = sys.argv[1]
    save_atomic({"version": 1, "x": torch.full((250_000,), 1.0)}, target)
    real_save = torch.save

    def stall_half_way(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)
        handle.flush()
        print("MID-WRITE", flush=True)
        time.sleep(60)  # killed here, in the middle of writing version 2

    torch.save = stall_half_way
    save_atomic({"version": 2, "x": torch.full((250_000,), 2.0)}, target)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "MID-WRITE", child.stderr.read()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    # The half-written temporary is still there; the checkpoint itself is version 1, complete.
    strays = _stray_files(tmp_path, "checkpoint.pt")
    assert (
        len(strays) == 1 and strays[0].startswith(".checkpoint.pt.") and strays[0].endswith(".tmp")
    )
    loaded = torch.load(target, weights_only=True)
    assert loaded["version"] == 1 and torch.equal(loaded["x"], torch.full((250_000,), 1.0))
    assert [p.name for p in remove_stale_temporaries(target)] == strays
    assert _stray_files(tmp_path, "checkpoint.pt") == []


def _checkpoint(preset, meta_optimizer) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "maml",
        "preset": preset.to_dict(),
        "meta_optimizer": meta_optimizer.state_dict(),
        "settings": {},
        "iteration": 3,
    }


def test_load_checkpoint_gives_a_ready_meta_optimizer(tmp_path):
    preset = PRESETS["omniglot-5w1s"].with_overrides(filters=8)
    torch.manual_seed(0)
    trained = build_meta_optimizer(preset, backend="reference")
    # Take one real outer step so that weights and Adam state are not the initial ones.
    x = torch.rand(2, 5, 1, 28, 28)
    y = torch.arange(5).repeat(2, 1)
    trained.step(
        x, y, torch.rand(2, 10, 1, 28, 28), torch.arange(5).repeat_interleave(2).repeat(2, 1)
    )
    path = tmp_path / "checkpoint.pt"
    save_atomic(_checkpoint(preset, trained), path)

    meta = load_checkpoint(path, backend="reference")
    assert isinstance(meta, MetaOptimizer)
    assert meta.inner_steps == 1 and meta.inner_lr.init == 0.4 and meta.backend == "reference"
    for (name, mine), (_, theirs) in zip(
        meta.model.state_dict().items(), trained.model.state_dict().items()
    ):
        assert torch.equal(mine, theirs), name
    saved_adam = trained.outer_optimizer.state_dict()["state"]
    loaded_adam = meta.outer_optimizer.state_dict()["state"]
    assert all(torch.equal(saved_adam[i]["exp_avg"], loaded_adam[i]["exp_avg"]) for i in saved_adam)

    adapted = meta.adapt(x, y, steps=2)
    logits = meta.predict(adapted, torch.rand(2, 7, 1, 28, 28))
    assert logits.shape == (2, 7, 5) and torch.isfinite(logits).all()
    expected = trained.predict(trained.adapt(x, y, steps=2), torch.zeros(2, 1, 1, 28, 28))
    torch.testing.assert_close(meta.predict(adapted, torch.zeros(2, 1, 1, 28, 28)), expected)

    without_adam = load_checkpoint(path, backend="reference", outer_optimizer=False)
    assert without_adam.outer_optimizer is None


def test_read_checkpoint_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a maml_ext few-shot checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "garbage.pt")

"""What every experiment does the same way: CPU threads, the device, RNG states, checks of
counts, and the per-task weights of zero adaptation steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from maml_ext.experiments.presets import ConfigurationError

__all__ = [
    "intra_op_threads",
    "default_device",
    "rng_state",
    "set_rng_state",
    "check_count",
    "weights_per_task",
]


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Sets torch's intra-op thread count for the block (None: unchanged), then restores it.

    The experiments' networks are too small to gain from intra-op parallelism; on a busy 2-core
    machine two threads made the reference backend several times slower (bench/NOTES.md).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rng_state() -> dict:
    """torch's global CPU generator state, and the CUDA ones once CUDA is in use."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores :func:`rng_state`'s states (CUDA ones only onto as many devices as saved them)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def check_count(name: str, value, allow_zero: bool = False) -> int:
    """``value`` if it is an integer >= 1 (>= 0 with ``allow_zero``), else ConfigurationError."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def weights_per_task(model: torch.nn.Module, tasks: int) -> dict[str, torch.Tensor]:
    """The model's trainable parameters, detached and repeated ``[tasks, *shape]``: every task's
    weights after zero adaptation steps, in the layout ``MetaOptimizer.adapt`` returns."""
    return {
        name: p.detach().unsqueeze(0).expand(tasks, *p.shape).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }

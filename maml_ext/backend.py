"""Backend choice: 'fused' where the compiled program can run the model, else 'reference'."""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from ._extension import _load_error, compiled_ops_available, cuda_kernels_compiled
from .losses import TaskLoss
from .program import LayerProgram, UnsupportedModelError, compile_program

BACKENDS = ("auto", "reference", "fused")


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    name: str                       # "fused" or "reference"
    program: LayerProgram | None    # the compiled program when fused
    reason: str | None = None       # why not fused, when auto fell back


def fused_obstacle(model: nn.Module, loss: TaskLoss, device: torch.device,
                   dtype: torch.dtype) -> tuple[LayerProgram | None, str | None]:
    """(program, None) when the fused backend can run, else (None, the reason it cannot).
    A model the fused backend cannot run raises UnsupportedModelError (naming the layer)."""
    if not compiled_ops_available():
        return None, f"maml_ext._C is not available ({_load_error})"
    if not loss.builtin:
        return None, "a custom loss callable (fused supports 'cross_entropy' and 'mse')"
    if device.type not in ("cpu", "cuda"):
        return None, f"device {device} (fused runs on cpu and cuda)"
    if device.type == "cuda" and not cuda_kernels_compiled():
        return None, "maml_ext._C was built without CUDA kernels"
    if dtype not in (torch.float32, torch.float64):
        return None, f"dtype {dtype} (fused runs float32 and float64)"
    return compile_program(model), None


def choose_backend(requested: str, model: nn.Module, loss: TaskLoss, device: torch.device,
                   dtype: torch.dtype, *, warn: bool = True) -> BackendChoice:
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return BackendChoice("reference", None)
    try:
        program, reason = fused_obstacle(model, loss, device, dtype)
    except UnsupportedModelError as error:
        if requested == "fused":
            raise
        program, reason = None, str(error)
    if program is not None:
        return BackendChoice("fused", program)
    if requested == "fused":
        raise ValueError(f"backend='fused' cannot run here: {reason}")
    if warn:
        warnings.warn(f"maml_ext: backend='auto' uses the reference backend: {reason}", stacklevel=3)
    return BackendChoice("reference", None, reason)

"""Task losses: the built-in names and user callables, as one small description."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TaskLoss:
    """``fn(outputs [N, ...], targets [N, ...]) -> scalar`` mean loss of one task."""

    name: str  # "cross_entropy", "mse" or "custom"
    fn: LossFn

    @property
    def is_classification(self) -> bool:
        return self.name == "cross_entropy"

    @property
    def builtin(self) -> bool:
        return self.name != "custom"


def resolve_loss(loss: str | LossFn) -> TaskLoss:
    if callable(loss):
        return TaskLoss("custom", loss)
    if loss == "cross_entropy":
        return TaskLoss("cross_entropy", F.cross_entropy)
    if loss == "mse":
        return TaskLoss("mse", F.mse_loss)
    raise ValueError(f"loss: expected 'cross_entropy', 'mse' or a callable, got {loss!r}")


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose argmax is the target, over the last dim of outputs [..., C]."""
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean(dim=-1)

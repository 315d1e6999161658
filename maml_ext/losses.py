"""Task losses: the built-in names and user callables, as one small description."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TaskLoss:
    """``fn(outputs [N, ...], targets [N, ...]) -> scalar`` mean loss of one task."""

    name: str  # "cross_entropy", "mse", "gaussian_nll" or "custom"
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
    if loss == "gaussian_nll":
        return TaskLoss("gaussian_nll", gaussian_nll)
    raise ValueError(
        f"loss: expected 'cross_entropy', 'mse', 'gaussian_nll' or a callable, got {loss!r}"
    )


def gaussian_nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weighted Gaussian negative log-likelihood of one task, the fused engine's ``"gaussian_nll"``.

    ``outputs [N, 2A]`` are means then log-stds, ``targets [N, 2A]`` values then weights; the loss
    is ``(1/N) Σ_{n,d} w_nd · (½ ((a_nd − μ_nd) / σ_nd)² + log σ_nd + ½ log 2π)``: with unit
    weights the mean over rows of −log N(a | μ, σ²) summed over the A dimensions (heteroscedastic
    regression); with each row's weight its advantage, the policy-gradient loss −mean(Â log π)."""
    if outputs.dim() != 2 or outputs.shape[-1] % 2:
        raise ValueError(
            "gaussian_nll: expected outputs [N, 2A] (means, then log-stds), got shape "
            f"{list(outputs.shape)}"
        )
    if targets.shape != outputs.shape:
        raise ValueError(
            f"gaussian_nll: expected targets [N, 2A] (values, then weights) shaped like the "
            f"outputs {list(outputs.shape)}, got {list(targets.shape)}"
        )
    mean, log_std = outputs.chunk(2, dim=-1)
    value, weight = targets.chunk(2, dim=-1)
    standardised = (value - mean) * torch.exp(-log_std)
    per_element = 0.5 * standardised**2 + log_std + 0.5 * math.log(2 * math.pi)
    return (weight * per_element).sum() / outputs.shape[0]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose argmax is the target, over the last dim of outputs [..., C]."""
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean(dim=-1)

"""The linear feature baseline (rllab's ``LinearFeatureBaseline``), fitted per task, batched.

Features per time step: ``[clip(o, ±10), o², t/100, (t/100)², (t/100)³, 1]``. The weights solve the
ridge-regularised normal equations ``(XᵀX + r I) w = Xᵀ R`` over the task's valid steps (padded
steps of episodes that ended early are zero rows), for every task at once with ``torch.linalg``.
``r`` starts at 1e-5 and is raised ×10 for a task whose system fails (Cholesky fails or the
solution is not finite), up to 5 tries.
"""

from __future__ import annotations

import torch

__all__ = ["baseline_features", "fit_linear_baseline"]


def baseline_features(observations: torch.Tensor) -> torch.Tensor:
    """Features ``[..., H, 2·O + 4]`` of observations ``[..., H, O]`` (time = position in H)."""
    horizon = observations.shape[-2]
    time = torch.arange(horizon, dtype=observations.dtype, device=observations.device) / 100.0
    time = time.unsqueeze(-1).expand(*observations.shape[:-1], 1)
    clipped = observations.clamp(-10.0, 10.0)
    return torch.cat(
        [clipped, clipped * clipped, time, time**2, time**3, torch.ones_like(time)], dim=-1
    )


def fit_linear_baseline(
    observations: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    ridge: float = 1e-5,
    tries: int = 5,
) -> torch.Tensor:
    """Per-task fitted values ``[T, K, H]``: observations ``[T, K, H, O]``, returns and the
    validity mask ``[T, K, H]``. Invalid steps get 0."""
    if observations.dim() != 4 or returns.shape != observations.shape[:3]:
        raise ValueError(
            f"observations/returns: expected [T, K, H, O] and [T, K, H], got "
            f"{list(observations.shape)} and {list(returns.shape)}"
        )
    if mask.shape != returns.shape:
        raise ValueError(f"mask: expected shape {list(returns.shape)}, got {list(mask.shape)}")
    weight = mask.to(observations.dtype)
    # torch.where, not a product: padding may hold anything, even NaN.
    features = torch.where(mask.unsqueeze(-1), baseline_features(observations), 0.0)
    tasks = features.shape[0]
    x = features.reshape(tasks, -1, features.shape[-1])
    y = torch.where(mask, returns, 0.0).reshape(tasks, -1, 1)
    gram, moment = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    regulariser = torch.full((tasks,), ridge, dtype=gram.dtype, device=gram.device)
    solution = torch.zeros_like(moment)
    pending = torch.ones(tasks, dtype=torch.bool, device=gram.device)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + regulariser[:, None, None] * eye)
        attempt = torch.cholesky_solve(moment, factor)
        good = (info == 0) & torch.isfinite(attempt).all(dim=(1, 2))
        accept = pending & good
        solution = torch.where(accept[:, None, None], attempt, solution)
        pending = pending & ~good
        if not bool(pending.any()):
            break
        regulariser = torch.where(pending, regulariser * 10.0, regulariser)
    else:
        failed = pending.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"baseline: the ridge fit failed for task(s) {failed} even with ridge "
            f"{ridge * 10 ** (tries - 1):g}; are the observations or returns finite?"
        )
    return (features @ solution.unsqueeze(1)).squeeze(-1) * weight

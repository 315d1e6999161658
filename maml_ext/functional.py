"""Stand-alone functions of the meta-learning toolkit that need no MetaOptimizer."""

from __future__ import annotations

import torch
from torch import nn

from .backend import choose_backend
from .losses import LossFn, resolve_loss
from .validation import check_inputs, check_targets, check_tensor


def hvp(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v: dict[str, torch.Tensor],
    *,
    loss: str | LossFn = "cross_entropy",
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Task-batched Hessian-vector products: for every task t, H_t v_t where H_t is the Hessian of
    the task's loss on (x[t], y[t]) at weights params[name][t]. ``params`` and ``v`` map the
    model's parameter names to [T, *shape] tensors (the layout ``MetaOptimizer.adapt`` returns)."""
    task_loss = resolve_loss(loss)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for label, given in (("params", params), ("v", v)):
        if not isinstance(given, dict) or sorted(given) != sorted(names):
            raise ValueError(
                f"{label}: expected a dict with the model's parameter names {sorted(names)}"
            )
    first = params[names[0]]
    tasks = first.shape[0] if first.dim() else 0
    shapes = dict(model.named_parameters())
    for label, given in (("params", params), ("v", v)):
        for name in names:
            check_tensor(f"{label}['{name}']", given[name], dtype=first.dtype, device=first.device)
            if tuple(given[name].shape) != (tasks, *shapes[name].shape):
                raise ValueError(
                    f"{label}['{name}']: expected shape "
                    f"[{tasks}, {', '.join(map(str, shapes[name].shape))}], got "
                    f"[{', '.join(map(str, given[name].shape))}]"
                )
    check_inputs("x", x, tasks=tasks, dtype=first.dtype, device=first.device)
    check_targets(
        "y",
        y,
        x,
        classification=task_loss.is_classification,
        num_classes=None,
        output_shape=None,
        dtype=first.dtype,
        device=first.device,
    )
    return choose_backend(backend, model, task_loss, first.device, first.dtype).hvp(params, x, y, v)

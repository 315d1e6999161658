"""The reference backend: MAML in plain PyTorch for any ``nn.Module``, one task at a time.

Inner steps run through ``torch.func.functional_call`` with autograd: second order keeps the graph
of every inner gradient (``create_graph=True``), first order detaches them. This is what
learn2learn and higher do, and it is the oracle the fused backend is tested against.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.func import functional_call

from .inner_lr import InnerLearningRates
from .losses import TaskLoss, accuracy
from .program import running_stats_message

Params = dict[str, torch.Tensor]


def check_batch_norm(model: nn.Module) -> None:
    """MAML normalises each task with its own batch statistics; running statistics would leak
    across tasks and change under the inner loop, so such layers are rejected."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ValueError(f"model: {running_stats_message(name)}")


@dataclasses.dataclass
class MetaLoss:
    loss: torch.Tensor  # mean query loss over tasks, differentiable
    query_loss: torch.Tensor  # [T], detached
    query_accuracy: torch.Tensor | None  # [T] for classification
    support_loss: torch.Tensor  # [T] before adaptation, detached


def _inner_step(
    model,
    params: Params,
    rates: InnerLearningRates,
    step: int,
    x,
    y,
    loss: TaskLoss,
    create_graph: bool,
    detach_grads: bool,
):
    support_loss = loss.fn(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(support_loss, list(params.values()), create_graph=create_graph)
    if detach_grads:
        grads = [g.detach() for g in grads]
    updated = {name: p - rates.rate(step, name) * g for (name, p), g in zip(params.items(), grads)}
    return updated, support_loss


def meta_loss(
    model: nn.Module,
    params: Params,
    rates: InnerLearningRates,
    support_x,
    support_y,
    query_x,
    query_y,
    *,
    steps: int,
    first_order: bool,
    loss: TaskLoss,
) -> MetaLoss:
    """Mean over tasks of the query loss after ``steps`` inner SGD steps on each task's support
    set."""
    task_losses, accuracies, support_losses = [], [], []
    for t in range(support_x.shape[0]):
        adapted = params
        for step in range(steps):
            adapted, support = _inner_step(
                model,
                adapted,
                rates,
                step,
                support_x[t],
                support_y[t],
                loss,
                create_graph=not first_order,
                detach_grads=first_order,
            )
            if step == 0:
                support_losses.append(support.detach())
        outputs = functional_call(model, adapted, (query_x[t],))
        task_losses.append(loss.fn(outputs, query_y[t]))
        if loss.is_classification:
            accuracies.append(accuracy(outputs.detach(), query_y[t]))
    per_task = torch.stack(task_losses)
    return MetaLoss(
        loss=per_task.mean(),
        query_loss=per_task.detach(),
        query_accuracy=torch.stack(accuracies) if accuracies else None,
        support_loss=torch.stack(support_losses),
    )


def adapt(
    model: nn.Module,
    params: Params,
    rates: InnerLearningRates,
    support_x,
    support_y,
    *,
    steps: int,
    loss: TaskLoss,
) -> Params:
    """Per-task adapted weights {name: [T, *shape]}, no graph kept."""
    per_task: list[Params] = []
    for t in range(support_x.shape[0]):
        adapted = {name: p.detach().requires_grad_() for name, p in params.items()}
        for step in range(steps):
            with torch.enable_grad():
                adapted, _ = _inner_step(
                    model,
                    adapted,
                    rates,
                    step,
                    support_x[t],
                    support_y[t],
                    loss,
                    create_graph=False,
                    detach_grads=True,
                )
            adapted = {name: p.detach().requires_grad_() for name, p in adapted.items()}
        per_task.append({name: p.detach() for name, p in adapted.items()})
    return {name: torch.stack([task[name] for task in per_task]) for name in params}


def predict(model: nn.Module, adapted: Params, x: torch.Tensor) -> torch.Tensor:
    """Per-task outputs [T, N, ...] of the model at per-task weights {name: [T, *shape]}."""
    with torch.no_grad():
        return torch.stack(
            [
                functional_call(model, {name: p[t] for name, p in adapted.items()}, (x[t],))
                for t in range(x.shape[0])
            ]
        )


def hvp(model: nn.Module, params: Params, x, y, v: Params, *, loss: TaskLoss) -> Params:
    """Per-task Hessian-vector products of the loss at per-task weights, by double backward."""
    results: list[Params] = []
    for t in range(x.shape[0]):
        task_params = {name: p[t].detach().requires_grad_() for name, p in params.items()}
        with torch.enable_grad():
            task_loss = loss.fn(functional_call(model, task_params, (x[t],)), y[t])
            grads = torch.autograd.grad(task_loss, list(task_params.values()), create_graph=True)
            dot = sum((g * v[name][t]).sum() for name, g in zip(task_params, grads))
            products = torch.autograd.grad(dot, list(task_params.values()), allow_unused=True)
        results.append(
            {
                name: (hp if hp is not None else torch.zeros_like(task_params[name])).detach()
                for name, hp in zip(task_params, products)
            }
        )
    return {name: torch.stack([r[name] for r in results]) for name in params}

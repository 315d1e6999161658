"""The reference backend: MAML in plain PyTorch for any ``nn.Module``, one task at a time.

Inner steps run through ``torch.func.functional_call`` with autograd: second order keeps the graph
of every inner gradient (``create_graph=True``), first order detaches them. This is what
learn2learn and higher do, and it is the oracle the fused backend is tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .inner_lr import InnerLearningRates
from .losses import TaskLoss, accuracy
from .program import running_stats_message
from .variants import Variant

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


def _with_step_batch_norm(params: Params, base: Params, batch_norm, step: int) -> Params:
    """``params`` with the per-step batch-norm parameters of inner step ``step`` (MAML++)."""
    if batch_norm is None:
        return params
    return {**params, **{name: batch_norm.value(base, name, step) for name in batch_norm.names}}


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
    call_params: Params | None = None,
):
    """One SGD step of the adapted parameters (all, or ``rates.adapted``: ANIL), the forward at
    ``call_params`` (``params`` with step-specific overrides) where given."""
    support_loss = loss.fn(functional_call(model, call_params or params, (x,)), y)
    names = [n for n in params if rates.adapted is None or n in rates.adapted]
    grads = torch.autograd.grad(support_loss, [params[n] for n in names], create_graph=create_graph)
    if detach_grads:
        grads = [g.detach() for g in grads]
    updated = dict(params)
    for name, g in zip(names, grads):
        updated[name] = params[name] - rates.rate(step, name) * g
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
    variant: Variant | None = None,
) -> MetaLoss:
    """Mean over tasks of the query loss after ``steps`` inner SGD steps on each task's support
    set; with ``variant.query_weights`` (MAML++'s multi-step loss), the weighted sum over steps of
    the mean query losses after each step (``query_loss`` stays the last step's)."""
    weights = variant.query_weights if variant is not None else None
    batch_norm = variant.batch_norm if variant is not None else None
    task_losses, objectives, accuracies, support_losses = [], [], [], []
    for t in range(support_x.shape[0]):
        adapted = params
        objective = 0.0
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
                call_params=_with_step_batch_norm(adapted, params, batch_norm, step),
            )
            if step == 0:
                support_losses.append(support.detach())
            if weights is not None and step < steps - 1:
                at_step = _with_step_batch_norm(adapted, params, batch_norm, step)
                outputs = functional_call(model, at_step, (query_x[t],))
                objective = objective + weights[step] * loss.fn(outputs, query_y[t])
        at_end = _with_step_batch_norm(adapted, params, batch_norm, steps - 1)
        outputs = functional_call(model, at_end, (query_x[t],))
        final = loss.fn(outputs, query_y[t])
        task_losses.append(final)
        objectives.append(final if weights is None else objective + weights[steps - 1] * final)
        if loss.is_classification:
            accuracies.append(accuracy(outputs.detach(), query_y[t]))
    per_task = torch.stack(task_losses)
    return MetaLoss(
        loss=torch.stack(objectives).mean(),
        query_loss=per_task.detach(),
        query_accuracy=torch.stack(accuracies) if accuracies else None,
        support_loss=torch.stack(support_losses),
    )


def adapt_steps(
    model: nn.Module,
    params: Params,
    rates: InnerLearningRates,
    support_x,
    support_y,
    *,
    steps: Sequence[int],
    loss: TaskLoss,
    variant: Variant | None = None,
) -> Iterator[tuple[int, Params]]:
    """``(k, per-task adapted weights {name: [T, *shape]})`` after k inner steps for each k in
    ``steps`` (increasing, >= 1), from one inner loop per task; no graph kept. With per-step batch
    norm, the batch-norm entries are the parameters of the last step taken (which the query pass
    uses)."""
    batch_norm = variant.batch_norm if variant is not None else None
    tasks = support_x.shape[0]
    per_task = [{name: p.detach() for name, p in params.items()} for _ in range(tasks)]
    done = 0
    for count in steps:
        for step in range(done, count):
            for t in range(tasks):
                adapted = {name: p.requires_grad_() for name, p in per_task[t].items()}
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
                        call_params=_with_step_batch_norm(adapted, params, batch_norm, step),
                    )
                per_task[t] = {name: p.detach() for name, p in adapted.items()}
        done = count
        yield (
            count,
            {
                name: torch.stack(
                    [
                        _with_step_batch_norm(task, params, batch_norm, count - 1)[name].detach()
                        for task in per_task
                    ]
                )
                for name in params
            },
        )


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

"""An independent per-task autograd loop for the MAML family's options (ANIL's adapted subset,
MAML++'s multi-step loss and per-step batch norm, first order), written here from the papers'
definitions rather than from maml_ext/reference.py, for test_anil.py and test_mamlpp.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def task_loss(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if name == "cross_entropy":
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets)


def rate_of(opt, name: str, step: int):
    """α of parameter ``name`` at inner step ``step``, read from the optimiser's rate leaves."""
    rates = opt.inner_lr
    key = name.replace(".", "-")
    if rates.learn is None:
        return rates.init
    if rates.learn == "scalar":
        return rates.scalar
    if rates.learn == "per_parameter":
        return rates.tensors[key]
    return rates.tensors[key][min(step, rates.steps - 1)]


def batch_norm_of(opt, params, name: str, step: int):
    """Inner step ``step``'s batch-norm parameter ``name`` (MAML++): the model's own at step 0."""
    step = min(step, opt.inner_steps - 1)
    if step == 0:
        return params[name]
    return opt.per_step_batch_norm.extra[name.replace(".", "-")][step - 1]


def objective(
    opt,
    batch,
    *,
    adapted: list[str],
    first_order: bool,
    weights: list[float] | None = None,
    per_step_bn: list[str] = (),
    loss: str = "cross_entropy",
) -> torch.Tensor:
    """The mean over tasks of Σ_k w_k L_Q(after step k) (or the final query loss), with only
    ``adapted`` taking inner steps and ``per_step_bn`` replaced by each step's own values."""
    model = opt.model
    params = dict(model.named_parameters())
    support_x, support_y, query_x, query_y = batch
    steps = opt.inner_steps
    total = 0.0
    for t in range(support_x.shape[0]):

        def at_step(weights_now, step):
            overrides = {n: batch_norm_of(opt, params, n, step) for n in per_step_bn}
            return {**weights_now, **overrides}

        def query_loss(weights_now, step, t=t):
            out = functional_call(model, at_step(weights_now, step), (query_x[t],))
            return task_loss(loss, out, query_y[t])

        current = dict(params)
        task_objective = 0.0
        for step in range(steps):
            out = functional_call(model, at_step(current, step), (support_x[t],))
            support = task_loss(loss, out, support_y[t])
            grads = torch.autograd.grad(
                support, [current[n] for n in adapted], create_graph=not first_order
            )
            if first_order:
                grads = [g.detach() for g in grads]
            current = dict(current)
            for name, g in zip(adapted, grads):
                current[name] = current[name] - rate_of(opt, name, step) * g
            if weights is not None:
                task_objective = task_objective + weights[step] * query_loss(current, step)
        if weights is None:
            task_objective = query_loss(current, steps - 1)
        total = total + task_objective
    return total / support_x.shape[0]


def leaves(opt) -> list[torch.Tensor]:
    """Every tensor the meta-step differentiates: parameters, learned rates, per-step BN."""
    tensors = list(opt.model.parameters()) + list(opt.inner_lr.parameters())
    if opt.per_step_batch_norm is not None:
        tensors += list(opt.per_step_batch_norm.parameters())
    return tensors


def oracle_gradient(opt, batch, **kwargs) -> torch.Tensor:
    """The gradient of ``objective`` with respect to ``leaves(opt)``, flattened."""
    tensors = leaves(opt)
    with torch.enable_grad():
        value = objective(opt, batch, **kwargs)
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(t) if g is None else g).reshape(-1) for t, g in zip(tensors, grads)]
    )


def optimizer_gradient(opt) -> torch.Tensor:
    return torch.cat([t.grad.reshape(-1) for t in leaves(opt)])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))

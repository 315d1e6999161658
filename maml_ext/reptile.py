"""Reptile (Nichol, Achiam & Schulman 2018), task-batched on either backend.

Each task t starts from θ and takes ``inner_steps`` steps of its own optimiser on its support set
(full batch), reaching φ_t; then θ ← θ + ε · mean_t(φ_t − θ). The inner optimiser is plain SGD
(the backends' ``adapt`` path: one op for all tasks on the fused engine) or Adam with per-task
moments (fresh for each task and meta-step, torch.optim.Adam's update rule, over the per-task
gradients of :class:`~maml_ext.per_task.TaskOps`). The authors' linear annealing of ε is an
option: ε goes linearly from ``outer_lr`` to ``final_outer_lr`` over ``anneal`` meta-steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backend import final_weights
from .implicit import TaskBatchedAlgorithm, _positive_number
from .losses import LossFn
from .optimizer import MetaStepResult
from .per_task import TaskOps
from .validation import check_steps

__all__ = ["Reptile", "INNER_OPTIMIZERS"]

INNER_OPTIMIZERS = ("sgd", "adam")


class Reptile(TaskBatchedAlgorithm):
    """Reptile for ``model``; see the module docstring.

    Args:
        model, loss, backend: as for :class:`maml_ext.MetaOptimizer`.
        inner_lr: the inner optimiser's learning rate.
        inner_steps: inner steps per task (also ``adapt``'s default).
        outer_lr: ε, the interpolation step toward the adapted weights' mean (1: move to it).
        inner_optimizer: "sgd" or "adam" (per-task Adam moments).
        inner_betas, inner_eps: the inner Adam's (β1, β2) and ε; the default β1 = 0 is the
            authors' setting for few-shot classification.
        anneal: None (or False): constant ε; a positive int N: after i meta-steps
            ε = outer_lr + min(i / N, 1) · (final_outer_lr − outer_lr), the authors' schedule.
        final_outer_lr: ε at the end of the annealing (the authors' default 0).

    ``step(support_x, support_y, query_x, query_y)`` adapts on the support sets, moves θ and
    reports the query loss and accuracy of the adapted weights (before the move);
    ``meta_gradient`` accumulates the Reptile direction θ − mean_t(φ_t) into ``.grad`` without
    moving θ (an outer SGD with lr ε on it is Reptile's update); ``adapt / predict /
    state_dict / load_state_dict`` as MetaOptimizer's.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        outer_lr: float,
        inner_optimizer: str = "sgd",
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_eps: float = 1e-8,
        anneal: int | None = None,
        final_outer_lr: float = 0.0,
        loss: str | LossFn = "cross_entropy",
        backend: str = "auto",
    ):
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"inner_optimizer: expected one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}"
            )
        self.inner_optimizer = inner_optimizer
        self.outer_lr = _positive_number("outer_lr", outer_lr)
        self.final_outer_lr = _positive_number("final_outer_lr", final_outer_lr, allow_zero=True)
        if anneal is False or anneal is None:
            self.anneal = None
        else:
            self.anneal = check_steps("anneal", anneal)
        if (
            not isinstance(inner_betas, (tuple, list))
            or len(inner_betas) != 2
            or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                for b in inner_betas
            )
        ):
            raise ValueError(
                f"inner_betas: expected two numbers in [0, 1) (Adam's β1, β2), got {inner_betas!r}"
            )
        self.inner_betas = (float(inner_betas[0]), float(inner_betas[1]))
        self.inner_eps = _positive_number("inner_eps", inner_eps)
        self.meta_steps = 0  # meta-steps taken, for the annealing of ε
        super().__init__(
            model, None, inner_lr=inner_lr, inner_steps=inner_steps, loss=loss, backend=backend
        )

    @property
    def current_outer_lr(self) -> float:
        """ε for the next meta-step (annealed when ``anneal`` is set)."""
        if self.anneal is None:
            return self.outer_lr
        done = min(self.meta_steps / self.anneal, 1.0)
        return self.outer_lr + done * (self.final_outer_lr - self.outer_lr)

    def step(self, support_x, support_y, query_x, query_y) -> MetaStepResult:
        """θ ← θ + ε · mean_t(φ_t − θ). Raises (changing nothing) on bad input or non-finite
        adapted weights or query loss."""
        result, params, direction = self._direction(support_x, support_y, query_x, query_y)
        epsilon = self.current_outer_lr
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(epsilon * d)
        self.meta_steps += 1
        return result

    def meta_gradient(self, support_x, support_y, query_x, query_y) -> MetaStepResult:
        """Accumulates θ − mean_t(φ_t) into ``.grad`` of the model's parameters; θ stays."""
        result, params, direction = self._direction(support_x, support_y, query_x, query_y)
        for p, d in zip(params, direction):
            p.grad = d if p.grad is None else p.grad + d
        return result

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["reptile"] = {"meta_steps": self.meta_steps}
        return state

    def load_state_dict(self, state: dict) -> None:
        """As MetaOptimizer's, plus the meta-step count of the annealing; checks all first."""
        saved = state.get("reptile") if isinstance(state, dict) else None
        steps = saved.get("meta_steps") if isinstance(saved, dict) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                "state: expected a dict from Reptile.state_dict() (with reptile.meta_steps)"
            )
        super().load_state_dict(state)
        self.meta_steps = steps

    # ---- internals --------------------------------------------------------------------------

    def _config(self) -> dict:
        config = super()._config()
        config.update(
            algorithm="reptile",
            outer_lr=self.outer_lr,
            inner_optimizer=self.inner_optimizer,
            inner_betas=list(self.inner_betas),
            inner_eps=self.inner_eps,
            anneal=self.anneal,
            final_outer_lr=self.final_outer_lr,
        )
        return config

    def _adapt_trajectory(self, params, support_x, support_y, counts):
        """``adapt``'s inner loop: SGD (the backends'), or Adam with per-task moments."""
        if self.inner_optimizer == "sgd":
            return super()._adapt_trajectory(params, support_x, support_y, counts)
        return self._flat_trajectory(self._adam, params, support_x, support_y, counts)

    def _adam(self, ops: TaskOps, theta, support_x, support_y, counts: list[int]):
        """``(k, φ [T, P])`` after k Adam steps per task from θ (torch.optim.Adam's update) for
        each k in ``counts`` (increasing, >= 1)."""
        beta1, beta2 = self.inner_betas
        lr, eps = self.inner_lr.init, self.inner_eps
        tasks = support_x.shape[0]
        phi = theta.expand(tasks, -1)
        first = theta.new_zeros((tasks, theta.shape[-1]))
        second = torch.zeros_like(first)
        done = 0
        for count in counts:
            with torch.no_grad():
                for k in range(done + 1, count + 1):
                    _, grads = ops.gradient(phi, support_x, support_y)
                    first.mul_(beta1).add_(grads, alpha=1 - beta1)
                    second.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
                    denominator = (second.sqrt() / math.sqrt(1 - beta2**k)).add_(eps)
                    phi = phi - (lr / (1 - beta1**k)) * first / denominator
            done = count
            yield count, phi  # outside no_grad: the caller runs in its own grad mode

    def _direction(self, support_x, support_y, query_x, query_y):
        """(result, the model's parameters, θ − mean_t φ_t per parameter)."""
        self._check_step(support_x, support_y, query_x, query_y)
        params, ops = self._ops()
        with torch.no_grad():
            theta = ops.flatten({name: p.detach() for name, p in params.items()})
            support_loss = self._mean_loss(ops.forward(theta, support_x), support_y)
            if self.inner_optimizer == "sgd":
                backend = ops.backend
                adapted = backend.adapt(
                    params, self.inner_lr, support_x, support_y, steps=self.inner_steps
                )
                phi = ops.flatten(adapted, task_dims=1)
            else:
                phi = final_weights(
                    self._adam(ops, theta, support_x, support_y, [self.inner_steps])
                )
            outputs = ops.forward(phi, query_x)
            query_loss = self._mean_loss(outputs, query_y)
            direction = theta - phi.mean(0)
        if not bool(torch.isfinite(query_loss) & torch.isfinite(direction).all()):
            self._raise_non_finite("Reptile step", query_loss)
        result = MetaStepResult(
            query_loss=query_loss,
            query_accuracy=self._accuracy(outputs, query_y),
            support_loss=support_loss,
            backend=ops.backend.name,
        )
        pieces = ops.unflatten(direction)
        return result, list(params.values()), [pieces[name] for name in params]

"""iMAML (Rajeswaran et al. 2019): the implicit meta-gradient, task-batched on either backend.

Per task t the inner loop approximately minimises the proximal objective

    L_S,t(φ) + λ/2 ‖φ − θ‖²

by ``inner_steps`` steps of gradient descent with step α from φ = θ (the paper's GD solver):
φ ← φ − α (∇L_S,t(φ) + λ (φ − θ)), i.e. one plain SGD step of the backend minus α λ (φ − θ).
At the minimiser the adapted weights' Jacobian is (I + H_t/λ)⁻¹ (H_t the support loss's Hessian
at φ_t), so the meta-gradient of task t is the solution x_t of

    ((1 + cg_damping) I + H_t/λ) x_t = ∇L_Q,t(φ_t),

found by ``cg_steps`` iterations of conjugate gradients over the engine's exact HVP; all tasks'
CG iterations run in lockstep (one batched HVP call per iteration, per-task step sizes). Nothing
of the inner loop's path is kept, so memory does not grow with ``inner_steps``. The meta-gradient
of θ is the mean of x_t over tasks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backend import final_weights
from .losses import LossFn
from .optimizer import MetaOptimizer, MetaStepResult
from .per_task import TaskOps
from .validation import check_steps

__all__ = ["ImplicitMetaOptimizer"]


def _positive_number(name: str, value, *, allow_zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}: expected a {kind} finite number, got {value!r}")
    return float(value)


class TaskBatchedAlgorithm(MetaOptimizer):
    """What iMAML and Reptile share on top of MetaOptimizer: input checks of a meta-step, the
    per-task primitives (:class:`~maml_ext.per_task.TaskOps`) of the current backend, and
    per-task mean losses and accuracies."""

    def _ops(self) -> tuple[dict[str, torch.Tensor], TaskOps]:
        params = self._params(self.model)
        first = next(iter(params.values()))
        backend = self._backend_for(first.device, first.dtype)
        cache = self.__dict__.setdefault("_task_ops", {})
        ops = cache.get(id(backend))
        if ops is None:
            ops = cache[id(backend)] = TaskOps(backend, params)
        return params, ops

    def _flat_trajectory(self, inner_loop, params, support_x, support_y, counts):
        """``inner_loop(ops, θ [P], support_x, support_y, counts)``'s ``(k, φ [T, P])`` items as
        ``(k, {name: [T, *shape]})``: ``adapt_steps``' form."""
        _, ops = self._ops()
        theta = ops.flatten({name: p.detach() for name, p in params.items()})
        trajectory = inner_loop(ops, theta, support_x, support_y, counts)
        return ((k, ops.unflatten(phi)) for k, phi in trajectory)

    def _check_step(self, support_x, support_y, query_x, query_y) -> None:
        """The checks of MetaOptimizer.step, every one before anything is computed."""
        first = next(iter(self._params(self.model).values()))
        self._check_batch(support_x, support_y, query_x, query_y, first)

    def _mean_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over tasks of each task's loss, outputs [T, N, ...]."""
        with torch.no_grad():
            return torch.stack([self.loss.fn(outputs[t], y[t]) for t in range(len(y))]).mean()

    def _accuracy(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self.loss.is_classification:
            return None
        return (outputs.argmax(-1) == y).to(outputs.dtype).mean()

    @staticmethod
    def _raise_non_finite(what: str, loss: torch.Tensor) -> None:
        raise FloatingPointError(
            f"maml_ext: non-finite {what} (query loss {loss.item():.4g}); nothing was applied"
        )


class ImplicitMetaOptimizer(TaskBatchedAlgorithm):
    """Implicit MAML (iMAML, Rajeswaran et al. 2019) for ``model``; see the module docstring.

    Args:
        model, outer_optimizer, loss, backend: as for :class:`maml_ext.MetaOptimizer`.
        inner_lr: α, the step of the inner gradient descent on the proximal objective.
        inner_steps: its number of steps (also ``adapt``'s default).
        lam: λ > 0, the proximal regularisation strength.
        cg_steps: conjugate-gradient iterations (each one batched HVP over all tasks).
        cg_damping: δ >= 0, solving ((1 + δ) I + H/λ) x = ∇L_Q (0: the paper's system).

    ``step / meta_gradient / adapt / predict / state_dict / load_state_dict`` behave as
    MetaOptimizer's; ``adapt`` runs the proximal inner loop.
    """

    def __init__(
        self,
        model: nn.Module,
        outer_optimizer: torch.optim.Optimizer | None,
        *,
        inner_lr: float,
        inner_steps: int,
        lam: float,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        loss: str | LossFn = "cross_entropy",
        backend: str = "auto",
    ):
        self.lam = _positive_number("lam", lam)
        self.cg_steps = check_steps("cg_steps", cg_steps)
        self.cg_damping = _positive_number("cg_damping", cg_damping, allow_zero=True)
        super().__init__(
            model,
            outer_optimizer,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            loss=loss,
            backend=backend,
        )

    def step(self, support_x, support_y, query_x, query_y) -> MetaStepResult:
        """One meta-update with the implicit meta-gradient. Raises (changing nothing) on bad input
        or a non-finite loss or gradient."""
        if self.outer_optimizer is None:
            raise RuntimeError("step() needs an outer optimiser; use meta_gradient() without one")
        result, tensors, grads = self._implicit_gradient(support_x, support_y, query_x, query_y)
        self.outer_optimizer.zero_grad(set_to_none=True)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = grad
        self.outer_optimizer.step()
        return result

    def meta_gradient(self, support_x, support_y, query_x, query_y) -> MetaStepResult:
        """Accumulates the implicit meta-gradient into ``.grad`` of the model's parameters."""
        result, tensors, grads = self._implicit_gradient(support_x, support_y, query_x, query_y)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = grad if tensor.grad is None else tensor.grad + grad
        return result

    # ---- internals --------------------------------------------------------------------------

    def _config(self) -> dict:
        config = super()._config()
        config.update(
            algorithm="imaml", lam=self.lam, cg_steps=self.cg_steps, cg_damping=self.cg_damping
        )
        return config

    def _adapt_trajectory(self, params, support_x, support_y, counts):
        """``adapt``'s inner loop: the proximal gradient descent."""
        return self._flat_trajectory(self._proximal_descent, params, support_x, support_y, counts)

    def _proximal_descent(self, ops: TaskOps, theta, support_x, support_y, counts: list[int]):
        """``(k, φ [T, P])`` after k steps φ ← φ − α (∇L_S(φ) + λ (φ − θ)) from φ = θ, for each k
        in ``counts`` (increasing, >= 1)."""
        alpha = self.inner_lr.init
        phi, done = theta, 0
        for count in counts:
            with torch.no_grad():
                for k in range(done, count):
                    step = ops.sgd_step(phi, alpha, support_x, support_y)
                    # The proximal term is 0 at θ, so the first step is plain SGD.
                    phi = step if k == 0 else step - (alpha * self.lam) * (phi - theta)
            done = count
            yield count, phi  # outside no_grad: the caller runs in its own grad mode

    def _system_product(self, ops: TaskOps, phi, support_x, support_y, v):
        """((1 + δ) I + H_t/λ) v_t for every task t, H_t the support loss's Hessian at φ_t."""
        hessian_product = ops.hvp(phi, support_x, support_y, v)
        return (1.0 + self.cg_damping) * v + (1.0 / self.lam) * hessian_product

    def _conjugate_gradient(self, ops: TaskOps, phi, support_x, support_y, b):
        """x [T, P] from ``cg_steps`` CG iterations on ((1 + δ) I + H_t/λ) x_t = b_t from x = 0,
        every task with its own step sizes, all tasks in one HVP call per iteration."""
        x = torch.zeros_like(b)
        residual = b.clone()
        direction = residual.clone()
        squared = (residual * residual).sum(1, keepdim=True)
        zero = torch.zeros_like(squared)
        for _ in range(self.cg_steps):
            product = self._system_product(ops, phi, support_x, support_y, direction)
            curvature = (direction * product).sum(1, keepdim=True)
            # A task whose residual reached 0 exactly has a zero direction: it stops moving
            # instead of dividing 0 by 0 (no host synchronisation: per-task selects).
            step = torch.where(curvature != 0, squared / curvature, zero)
            x.add_(step * direction)
            residual.sub_(step * product)
            new_squared = (residual * residual).sum(1, keepdim=True)
            ratio = torch.where(squared != 0, new_squared / squared, zero)
            direction = residual + ratio * direction
            squared = new_squared
        return x

    def _implicit_gradient(self, support_x, support_y, query_x, query_y):
        self._check_step(support_x, support_y, query_x, query_y)
        params, ops = self._ops()
        with torch.no_grad():
            theta = ops.flatten({name: p.detach() for name, p in params.items()})
            support_loss = self._mean_loss(ops.forward(theta, support_x), support_y)
            phi = final_weights(
                self._proximal_descent(ops, theta, support_x, support_y, [self.inner_steps])
            )
            query_losses, query_grads = ops.gradient(phi, query_x, query_y)
            query_loss = query_losses.mean()
            accuracy = None
            if self.loss.is_classification:
                accuracy = self._accuracy(ops.forward(phi, query_x), query_y)
            solution = self._conjugate_gradient(ops, phi, support_x, support_y, query_grads)
            meta_grad = solution.mean(0)
        if not bool(torch.isfinite(query_loss) & torch.isfinite(meta_grad).all()):
            self._raise_non_finite("iMAML meta-step", query_loss)
        grads = ops.unflatten(meta_grad)
        result = MetaStepResult(
            query_loss=query_loss,
            query_accuracy=accuracy,
            support_loss=support_loss,
            backend=ops.backend.name,
        )
        return result, list(params.values()), [grads[name] for name in params]

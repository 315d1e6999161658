"""MAML for reinforcement learning: the REINFORCE inner step, exact meta-gradients and Fisher-vector
products through it, and the outer optimisers (:class:`MetaTRPO`, :class:`MetaAdam`).

Everything is task-batched over a ``[T, P]`` block of flat parameters (one row per task; see
:class:`maml_ext.rl.policy.PolicyLayout`): a sum over tasks of per-task losses has the per-task
gradients as the rows of its gradient, so ``torch.func.grad``/``jvp``/``vjp`` of that sum give every
task's gradient, Hessian-vector product and Fisher-vector product at once, with no per-task Python.

For task t with inner rollouts ``D_t`` and post-adaptation (query) rollouts ``D'_t``:

- inner loss ``L_t(θ)``: the mean over the valid steps of ``D_t`` of ``-log π_θ(a|s) · Â``
  (log π summed over action dimensions); adapted parameters ``θ'_t = θ - α ∇L_t(θ)`` (log_std too);
- surrogate ``S_t(θ) = mean over D'_t of π_θ'_t(a|s) / π_old(a|s) · Â`` (π_old: the policy that
  sampled D'_t) and ``KL_t(θ) = mean over D'_t of KL(π_old ‖ π_θ'_t)``; ``S``, ``KL``: task means;
- ``∂θ'_t/∂θ = J_t = I - α H_t`` with ``H_t = ∇²L_t`` (symmetric, so ``J_tᵀ = J_t``): the
  meta-gradient is ``mean_t J_t ∇S_t(θ'_t)`` and the Fisher-vector product
  ``mean_t J_t F_t J_t v`` (``F_t`` = the Gaussian's Fisher at ``θ'_t``, exactly the Hessian of
  ``KL`` at θ_old): two Hessian-vector
  products of the inner loss and one Fisher-vector product, each a backward pass over a graph
  built once per outer step (:class:`InnerCurvature`, :class:`FisherAt`). First order: ``J = I``.

Inner-loss estimators (``inner_estimator``): the Hessian ``H_t`` above is that of the sampled inner
loss, which leaves out how the inner rollouts' distribution depends on θ: a biased estimate of the
Hessian of the expected return (Rothfuss et al. 2019, ProMP; Foerster et al. 2018, DiCE).
``"reinforce"`` (the paper's) keeps it; ``"lvc"`` is ProMP's low-variance curvature estimator:
the inner loss ``-mean(π_θ(a|s) / ⊥π_θ(a|s) · Â)`` (⊥: a constant copy), whose value is not
used and whose gradient equals REINFORCE's at every θ, but whose Hessian adds
``-mean(Â · ∇log π ∇log πᵀ)``, the per-step part of the sampling distribution's curvature. The
adapted parameters, surrogate and Fisher are the same under both.

Engines (``engine``): ``"torch"`` runs these products on torch/``torch.func`` (kept graphs,
reverse-over-reverse); ``"fused"`` on the layer-program engine (:mod:`maml_ext.rl.fused`: the
policy as a program ending in ``AppendLogStd``, its loss the engine's ``gaussian_nll``), the same
numbers to rounding, for the paper's estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad

from . import fused
from .policy import PolicyLayout, gaussian_kl, gaussian_log_prob
from .sampler import Rollouts

__all__ = [
    "INNER_ESTIMATORS",
    "TaskData",
    "inner_losses",
    "adapt",
    "inner_hvp",
    "meta_gradient",
    "fisher_vector_product",
    "MetaTRPO",
    "MetaAdam",
    "conjugate_gradient",
]


@dataclass
class TaskData:
    """Flat task-batched rollouts: ``observations [T, N, O]``, ``actions [T, N, A]``,
    ``advantages [T, N]``, ``weights [T, N]`` (mask / valid steps: a per-task mean)."""

    observations: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of(cls, batch: Rollouts | TaskData) -> TaskData:
        if isinstance(batch, TaskData):
            return batch
        return cls(*batch.flat())

    @property
    def tasks(self) -> int:
        return self.observations.shape[0]

    def check(self, name: str, layout: PolicyLayout) -> None:
        """Clear errors for inconsistent shapes or non-finite values (before anything changes)."""
        t, n = self.advantages.shape[:2] if self.advantages.dim() == 2 else (None, None)
        if t is None or self.observations.shape[:2] != (t, n) or self.actions.shape[:2] != (t, n):
            raise ValueError(
                f"{name}: expected observations [T, N, O], actions [T, N, A], advantages [T, N]; "
                f"got {list(self.observations.shape)}, {list(self.actions.shape)}, "
                f"{list(self.advantages.shape)}"
            )
        sizes = (layout.shapes[0][-1], layout.shapes[-1][0])
        if (self.observations.shape[-1], self.actions.shape[-1]) != sizes:
            raise ValueError(
                f"{name}: the policy takes {sizes[0]} observation and {sizes[1]} action "
                f"dimensions; got observations {list(self.observations.shape)} and actions "
                f"{list(self.actions.shape)}"
            )
        if self.weights.shape != (t, n):
            raise ValueError(
                f"{name}: weights: expected [{t}, {n}], got {list(self.weights.shape)}"
            )
        for field in ("observations", "actions", "advantages"):
            values = getattr(self, field)
            bad = ~torch.isfinite(values)
            if values.dim() == 3:
                bad = bad.any(-1)
            bad = bad & (self.weights > 0)
            if bool(bad.any()):
                task, step = (int(i) for i in bad.nonzero()[0])
                raise FloatingPointError(
                    f"{name}: non-finite {field} in task {task} at flat step {step}; "
                    "no parameter was changed"
                )


def _expand(theta: torch.Tensor, tasks: int) -> torch.Tensor:
    return theta.expand(tasks, -1) if theta.dim() == 1 else theta


INNER_ESTIMATORS = ("reinforce", "lvc")
ENGINES = ("torch", "fused")


def check_inner_estimator(estimator: str) -> str:
    if estimator not in INNER_ESTIMATORS:
        raise ValueError(f"inner_estimator: expected one of {INNER_ESTIMATORS}, got {estimator!r}")
    return estimator


def inner_losses(
    layout: PolicyLayout, params: torch.Tensor, data: TaskData, estimator: str = "reinforce"
) -> torch.Tensor:
    """Per-task inner losses ``[T]``: mean over valid steps of ``-log π(a|s) · Â``
    (``"reinforce"``) or of ``-π(a|s)/⊥π(a|s) · Â`` (``"lvc"``: same gradient, ProMP's Hessian;
    see the module docstring)."""
    mean, log_std = layout.mean_log_std(_expand(params, data.tasks), data.observations)
    log_prob = gaussian_log_prob(mean, log_std.unsqueeze(-2), data.actions)
    if estimator == "lvc":
        log_prob = torch.exp(log_prob - log_prob.detach())
    return -(log_prob * data.advantages * data.weights).sum(-1)


def _inner_gradient(layout, data):
    return grad(lambda p: inner_losses(layout, p, data).sum())


def adapt(
    layout: PolicyLayout, theta: torch.Tensor, data: TaskData, inner_lr: float
) -> torch.Tensor:
    """Adapted parameters ``θ'_t = θ - α ∇L_t(θ)``, ``[T, P]`` (θ: ``[P]`` or ``[T, P]``)."""
    params = _expand(theta, data.tasks).contiguous()
    if inner_lr == 0:
        return params
    return params - inner_lr * _inner_gradient(layout, data)(params)


class InnerCurvature:
    """The inner loss's gradient at θ with its graph kept, so that each Hessian-vector product
    ``H_t v_t`` (all tasks at once) is one backward pass of that graph (reverse-over-reverse),
    without recomputing the forward: TRPO's conjugate gradient needs two per iteration at one θ.
    ``inner=None`` (no adaptation): ``J = I``. ``estimator``: whose Hessian (module docstring).
    """

    def __init__(
        self,
        layout,
        theta,
        inner: TaskData | None,
        inner_lr: float,
        first_order=False,
        estimator: str = "reinforce",
    ):
        self.inner_lr = 0.0 if inner is None else float(inner_lr)
        self.identity = first_order or self.inner_lr == 0
        self.tasks = None if inner is None else inner.tasks
        if inner is None:
            self.adapted = theta.detach()
            return
        self._build(layout, theta, inner, estimator)

    def _build(self, layout, theta, inner: TaskData, estimator: str) -> None:
        """Sets ``adapted`` and whatever ``_hvp`` needs."""
        self.params = _expand(theta.detach(), inner.tasks).clone().requires_grad_()
        with torch.enable_grad():
            loss = inner_losses(layout, self.params, inner, check_inner_estimator(estimator))
            loss = loss.sum()
            self.gradient = torch.autograd.grad(loss, self.params, create_graph=not self.identity)[
                0
            ]
        self.adapted = (self.params - self.inner_lr * self.gradient).detach()

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H_t v_t``, ``[T, P]`` (``vectors``: ``[P]`` or ``[T, P]``)."""
        if self.tasks is None or self.identity:
            raise ValueError("hvp: this curvature was built without the second-order term")
        return self._hvp(_expand(vectors, self.tasks))

    def _hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.gradient, self.params, vectors, retain_graph=True)[0]

    def jacobian(self, vectors: torch.Tensor) -> torch.Tensor:
        """``J_t v_t = v_t - α H_t v_t`` (J_t symmetric, so also ``J_tᵀ v_t``)."""
        if self.identity:
            return vectors
        return _expand(vectors, self.tasks) - self.inner_lr * self.hvp(vectors)


class FusedInnerCurvature(InnerCurvature):
    """:class:`InnerCurvature` on the fused engine (:mod:`maml_ext.rl.fused`): the paper's inner
    Hessian only, each product one ``loss_hvp`` call (the engine keeps no graph between calls)."""

    def _build(self, layout, theta, inner: TaskData, estimator: str) -> None:
        if estimator != "reinforce":
            raise ValueError(f"estimator: the fused engine has only 'reinforce', got {estimator!r}")
        self.layout = layout
        self.theta = theta.detach()
        self.observations = inner.observations.contiguous()
        self.targets = fused.policy_loss_targets(inner)
        self.adapted = fused.fused_adapt(layout, self.theta, inner, self.inner_lr)

    def _hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        return fused.loss_hvp(
            self.layout, self.theta, self.observations, self.targets, vectors.contiguous()
        )[2]


class FisherAt:
    """The Gaussian policy's Fisher information at each task's adapted parameters on ``outer``
    (the Hessian of the mean KL there): ``F_t u_t = Jμᵀ (w/σ²) Jμ u_t + 2 Σw u_logstd`` with
    ``Jμ u`` by the double-VJP trick on a kept graph, so a product costs backward passes only."""

    def __init__(self, layout: PolicyLayout, adapted: torch.Tensor, outer: TaskData):
        self.params = adapted.detach().clone().requires_grad_()
        self.action_size = layout.shapes[-1][0]
        with torch.enable_grad():
            self.mean, log_std = layout.mean_log_std(self.params, outer.observations)
            self.probe = torch.zeros_like(self.mean, requires_grad=True)
            self.pullback = torch.autograd.grad(
                (self.mean * self.probe).sum(), self.params, create_graph=True
            )[0]
        self.mean_weights = torch.exp(-2 * log_std).unsqueeze(-2) * outer.weights.unsqueeze(-1)
        self.mean_weights = self.mean_weights.detach()
        self.log_std_weights = 2 * outer.weights.sum(-1, keepdim=True)

    def product(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = _expand(vectors, self.params.shape[0])
        mean_dot = torch.autograd.grad(self.pullback, self.probe, vectors, retain_graph=True)[0]
        result = torch.autograd.grad(
            self.mean, self.params, mean_dot * self.mean_weights, retain_graph=True
        )[0]
        log_std = vectors[:, -self.action_size :] * self.log_std_weights
        split = -self.action_size
        return torch.cat([result[:, :split], result[:, split:] + log_std], -1)


def inner_hvp(
    layout: PolicyLayout,
    theta: torch.Tensor,
    data: TaskData,
    vectors: torch.Tensor,
    estimator: str = "reinforce",
) -> torch.Tensor:
    """``H_t v_t`` for every task, ``[T, P]``: the inner loss's Hessian at θ times ``vectors``
    (``[P]`` shared or ``[T, P]``), exact."""
    return InnerCurvature(layout, theta, data, 1.0, estimator=estimator).hvp(vectors)


def _surrogate_terms(layout, adapted, outer: TaskData, old_log_prob, old_mean, old_log_std):
    """Per-task surrogate and mean KL ``([T], [T])`` of the adapted parameters on ``outer``."""
    mean, log_std = layout.mean_log_std(adapted, outer.observations)
    log_std = log_std.unsqueeze(-2)
    ratio = torch.exp(gaussian_log_prob(mean, log_std, outer.actions) - old_log_prob)
    surrogate = (ratio * outer.advantages * outer.weights).sum(-1)
    kl = (gaussian_kl(old_mean, old_log_std, mean, log_std) * outer.weights).sum(-1)
    return surrogate, kl


def policy_gradient(layout: PolicyLayout, adapted: torch.Tensor, outer: TaskData) -> torch.Tensor:
    """``∇S_t`` at the sampling policy (ratio 1): mean over valid steps of ``∇log π · Â``,
    ``[T, P]`` (= minus the inner loss's gradient on ``outer``)."""
    return -_inner_gradient(layout, outer)(adapted.contiguous())


def meta_gradient(
    layout: PolicyLayout,
    theta: torch.Tensor,
    inner: TaskData | None,
    outer: TaskData,
    inner_lr: float,
    first_order: bool = False,
    reduce: bool = True,
    curvature: InnerCurvature | None = None,
    estimator: str = "reinforce",
) -> torch.Tensor:
    """Gradient of the surrogate ``S`` (task mean) at θ, where ``outer`` was sampled by the
    adapted policies themselves: ``mean_t J_t ∇S_t(θ'_t)`` (``[P]``; per task ``[T, P]`` with
    ``reduce=False``). ``inner=None``: no adaptation (plain policy gradient)."""
    if curvature is None:
        curvature = InnerCurvature(layout, theta, inner, inner_lr, first_order, estimator)
    adapted = _expand(curvature.adapted, outer.tasks)
    per_task = _expand(curvature.jacobian(policy_gradient(layout, adapted, outer)), outer.tasks)
    return per_task.mean(0) if reduce else per_task


def fisher_vector_product(
    layout: PolicyLayout,
    theta: torch.Tensor,
    inner: TaskData | None,
    outer: TaskData,
    vectors: torch.Tensor,
    inner_lr: float,
    first_order: bool = False,
    estimator: str = "reinforce",
) -> torch.Tensor:
    """Per-task ``J_t F_t J_t v``, ``[T, P]``: the Hessian, at θ, of task t's mean KL between the
    post-adaptation policy that sampled ``outer`` (that of θ) and the post-adaptation policy of
    the varied θ (``vectors``: ``[P]`` shared or ``[T, P]``); two HVPs of the inner loss and one
    Fisher-vector product. The TRPO constraint's curvature is the task mean of these rows.
    To apply it many times at one θ, build :class:`InnerCurvature` and :class:`FisherAt` once."""
    curvature = InnerCurvature(layout, theta, inner, inner_lr, first_order, estimator)
    fisher = FisherAt(layout, _expand(curvature.adapted, outer.tasks), outer)
    return curvature.jacobian(fisher.product(curvature.jacobian(vectors)))


def conjugate_gradient(
    product,
    b: torch.Tensor,
    iterations: int = 10,
    tolerance: float = 1e-10,
    return_residual: bool = False,
):
    """Approximately solves ``product(x) = b`` (symmetric positive definite) from x = 0, stopping
    early once the squared residual norm is at most ``tolerance``. ``return_residual``: also the
    final residual ``r = b - product(x)`` as CG tracks it, so that ``x @ (b - r)`` is
    ``x @ product(x)`` without another product."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_norm = residual @ residual
    for _ in range(iterations):
        if float(residual_norm) <= tolerance:
            break
        image = product(direction)
        step = residual_norm / (direction @ image)
        x = x + step * direction
        residual = residual - step * image
        new_norm = residual @ residual
        direction = residual + (new_norm / residual_norm) * direction
        residual_norm = new_norm
    return (x, residual) if return_residual else x


@dataclass
class OuterStepResult:
    """What an outer step did: surrogate and mean KL before/after (on the post-adaptation
    rollouts), whether the step was taken and which line-search step it was."""

    surrogate_before: float
    surrogate_after: float
    kl: float
    accepted: bool
    line_search_step: int
    gradient_norm: float


class _MetaLearner:
    def __init__(
        self,
        policy,
        inner_lr: float = 0.1,
        first_order: bool = False,
        inner_estimator: str = "reinforce",
        engine: str = "torch",
    ):
        self.policy = policy
        self.layout = policy.layout()
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)
        self.inner_estimator = check_inner_estimator(inner_estimator)
        if engine not in ENGINES:
            raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
        if engine == "fused" and self.inner_estimator != "reinforce" and not self.first_order:
            raise ValueError(
                f"engine='fused' computes the paper's inner Hessian only; inner_estimator="
                f"{self.inner_estimator!r} needs engine='torch'"
            )
        self.engine = engine

    def _adapt(self, theta, inner: TaskData) -> torch.Tensor:
        if self.engine == "fused":
            return fused.fused_adapt(self.layout, theta, inner, self.inner_lr).detach()
        return adapt(self.layout, theta, inner, self.inner_lr).detach()

    def _curvature(self, theta, inner, inner_lr):
        """The inner step's adapted parameters and Jacobian products, on this engine."""
        if self.engine == "fused":
            return FusedInnerCurvature(self.layout, theta, inner, inner_lr, self.first_order)
        return InnerCurvature(
            self.layout, theta, inner, inner_lr, self.first_order, self.inner_estimator
        )

    def _fisher(self, adapted, outer):
        if self.engine == "fused":
            return fused.FusedFisherAt(self.layout, adapted, outer)
        return FisherAt(self.layout, adapted, outer)

    def _policy_gradient(self, adapted, outer):
        if self.engine == "fused":
            return fused.fused_policy_gradient(self.layout, adapted, outer)
        return policy_gradient(self.layout, adapted, outer)

    def theta(self) -> torch.Tensor:
        return self.policy.flat_parameters()

    def adapted(self, inner: Rollouts | TaskData | None, theta=None, tasks=None) -> torch.Tensor:
        """Each task's post-adaptation parameters ``[T, P]`` (no graph)."""
        theta = self.theta() if theta is None else theta
        if inner is None:
            return theta.expand(tasks, -1).clone()
        return self._adapt(theta, TaskData.of(inner))

    def _prepare(self, inner, outer):
        outer = TaskData.of(outer)
        outer.check("outer rollouts", self.layout)
        if inner is not None:
            inner = TaskData.of(inner)
            inner.check("inner rollouts", self.layout)
            if inner.tasks != outer.tasks:
                raise ValueError(
                    f"inner/outer: expected the same tasks, got {inner.tasks} and {outer.tasks}"
                )
        return inner, outer

    def _checked_gradient(self, theta, inner, outer, curvature=None):
        if curvature is None:
            curvature = self._curvature(theta, inner, self.inner_lr if inner is not None else 0.0)
        adapted = _expand(curvature.adapted, outer.tasks)
        per_task = curvature.jacobian(self._policy_gradient(adapted, outer))
        gradient = _expand(per_task, outer.tasks).mean(0)
        if not bool(torch.isfinite(gradient).all()):
            raise FloatingPointError("meta-gradient: not finite; no parameter was changed")
        return gradient


class MetaTRPO(_MetaLearner):
    """The paper's outer optimiser: a TRPO step on the post-adaptation surrogate.

    ``step(inner, outer)``: ``inner`` = the rollouts of the current policy on each task (None: no
    adaptation, plain TRPO on the task distribution, the "pretrained" baseline), ``outer`` = the
    rollouts of each task's adapted policy. Conjugate gradient (``cg_iterations``, ``cg_damping``)
    on the exact Fisher-vector product through the inner step (stopping early at a squared
    residual of ``cg_tolerance``), a step scaled to ``max_kl``, then
    backtracking (``backtrack_ratio``, ``line_search_steps``) until the surrogate improves and the
    mean KL is at most ``max_kl``; if no step qualifies the parameters stay. ``inner_estimator``:
    "reinforce" (the paper's) or "lvc" (ProMP's curvature; see the module docstring). ``engine``:
    "torch" or "fused" (the module docstring; the same step to rounding)."""

    def __init__(
        self,
        policy,
        inner_lr: float = 0.1,
        first_order: bool = False,
        max_kl: float = 0.01,
        cg_iterations: int = 10,
        cg_damping: float = 1e-5,
        cg_tolerance: float = 1e-10,
        backtrack_ratio: float = 0.8,
        line_search_steps: int = 15,
        inner_estimator: str = "reinforce",
        engine: str = "torch",
    ):
        super().__init__(policy, inner_lr, first_order, inner_estimator, engine)
        self.max_kl, self.cg_iterations, self.cg_damping = max_kl, cg_iterations, cg_damping
        self.cg_tolerance = cg_tolerance
        self.backtrack_ratio, self.line_search_steps = backtrack_ratio, line_search_steps

    def evaluate(self, theta, inner, outer, old, adapted=None):
        """Surrogate and mean KL (task means) of parameters θ on the fixed batch (``adapted``:
        θ's post-adaptation parameters where already known)."""
        if adapted is None:
            adapted = _expand(theta, outer.tasks) if inner is None else self._adapt(theta, inner)
        surrogate, kl = _surrogate_terms(self.layout, adapted, outer, *old)
        return float(surrogate.mean()), float(kl.mean())

    def step(self, inner, outer) -> OuterStepResult:
        inner, outer = self._prepare(inner, outer)
        layout, lr = self.layout, self.inner_lr if inner is not None else 0.0
        theta = self.theta()
        curvature = self._curvature(theta, inner, lr)
        adapted = _expand(curvature.adapted, outer.tasks)
        fisher = self._fisher(adapted, outer)
        with torch.no_grad():
            mean, log_std = layout.mean_log_std(adapted, outer.observations)
            log_std = log_std.unsqueeze(-2)
            old = (gaussian_log_prob(mean, log_std, outer.actions), mean, log_std)
        gradient = self._checked_gradient(theta, inner, outer, curvature)

        def product(v):
            rows = curvature.jacobian(fisher.product(curvature.jacobian(v)))
            return _expand(rows, outer.tasks).mean(0) + self.cg_damping * v

        direction, residual = conjugate_gradient(
            product, gradient, self.cg_iterations, self.cg_tolerance, return_residual=True
        )
        # dᵀ A d from CG's residual (A d = g - r): one Fisher product fewer per step.
        curvature = float(direction @ (gradient - residual))
        if not (torch.isfinite(direction).all() and curvature > 0):
            raise FloatingPointError(
                "TRPO: the conjugate-gradient direction is not finite or not a descent direction "
                f"(curvature {curvature}); no parameter was changed"
            )
        full_step = (2 * self.max_kl / curvature) ** 0.5 * direction
        # At θ itself the adapted parameters are the curvature's: no inner step to redo.
        before, _ = self.evaluate(theta, inner, outer, old, adapted=adapted)
        for index in range(self.line_search_steps):
            candidate = theta + self.backtrack_ratio**index * full_step
            surrogate, kl = self.evaluate(candidate, inner, outer, old)
            if surrogate > before and kl <= self.max_kl:
                self.policy.load_flat_parameters(candidate)
                return OuterStepResult(before, surrogate, kl, True, index, float(gradient.norm()))
        return OuterStepResult(before, before, 0.0, False, -1, float(gradient.norm()))


class MetaAdam(_MetaLearner):
    """The plain meta-gradient with Adam (``--outer adam``): minimises ``-S`` (the
    post-adaptation policy-gradient loss) with ``torch.optim.Adam(lr)``."""

    def __init__(
        self,
        policy,
        inner_lr: float = 0.1,
        first_order: bool = False,
        lr: float = 1e-2,
        inner_estimator: str = "reinforce",
        engine: str = "torch",
    ):
        super().__init__(policy, inner_lr, first_order, inner_estimator, engine)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr)

    def step(self, inner, outer) -> OuterStepResult:
        inner, outer = self._prepare(inner, outer)
        gradient = self._checked_gradient(self.theta(), inner, outer)
        offset = 0
        for _, p in self.policy.ordered_parameters():
            p.grad = -gradient[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return OuterStepResult(
            float("nan"), float("nan"), float("nan"), True, 0, float(gradient.norm())
        )

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

"""The meta-RL products on the fused engine (``MetaTRPO(..., engine="fused")``).

The Gaussian policy is a layer program (the mean's Linear layers and activations, then
``AppendLogStd``; :meth:`PolicyLayout.layer_program`) and its policy-gradient loss the engine's
``gaussian_nll`` with each row's weight ``N · Â · w`` (``w``: the validity mask over the task's
count, ``N`` rows), so that ``(1/N) Σ N Â w (−log π) = Σ Â w (−log π)``, the inner loss of
:mod:`maml_ext.rl.metarl` exactly. One ``maml_ext::loss_hvp`` call (forward, backward and their
tangents, every task at once) then gives the inner gradient and a Hessian-vector product.

The Fisher of the Gaussian at the adapted policy is the Hessian, at ``μ_old = μ``, of the same loss
with the policy's own means as the targets, plus ``2 Σ w`` on the log-std: at ``a = μ`` the loss's
gradient in μ vanishes (so does the network's curvature term), its μ-block is ``w e^{−2s}`` (the
Fisher's), and its log-std block ``2 w q²`` and cross term ``2 w e e^{−2s}`` vanish where the
Fisher's log-std block is ``2 w`` (docs/tangent_rules.md, the Gaussian NLL's rules).

Only the paper's estimator (``"reinforce"``): LVC's Hessian adds a per-sample outer product of
score vectors that the loss's rules do not have.
"""

from __future__ import annotations

import functools

import torch

from ..program import loss_code
from .policy import PolicyLayout

__all__ = [
    "FusedFisherAt",
    "fused_policy_gradient",
    "fused_adapt",
    "loss_hvp",
    "policy_loss_targets",
]

_GAUSSIAN_NLL = loss_code("gaussian_nll")


@functools.lru_cache(maxsize=16)
def _program(layout_key):
    shapes, activation = layout_key
    return PolicyLayout(list(shapes), activation).layer_program()


def program_of(layout: PolicyLayout):
    key = (tuple(zip(layout.names, layout.shapes)), layout.activation_name)
    return _program(key)


def _targets(values: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``[values | N · row_weights per dimension]``: gaussian_nll's targets ``[T, N, 2A]``."""
    rows = values.shape[1]
    weights = (rows * row_weights).unsqueeze(-1).expand_as(values)
    return torch.cat([values, weights.to(values.dtype)], dim=-1).contiguous()


def policy_loss_targets(data) -> torch.Tensor:
    """gaussian_nll's targets for the policy-gradient loss on ``data``: ``[actions | N Â w]``."""
    return _targets(data.actions, data.advantages * data.weights)


def loss_hvp(layout, theta, observations, targets, vectors):
    """(per-task loss [T], gradient [T, P], Hessian-vector product [T, P])."""
    program = program_of(layout)
    return torch.ops.maml_ext.loss_hvp(
        theta,
        observations,
        targets,
        vectors,
        program.ints_list,
        program.floats_list,
        _GAUSSIAN_NLL,
    )


def _rows(theta: torch.Tensor, tasks: int) -> torch.Tensor:
    return theta.expand(tasks, -1) if theta.dim() == 1 else theta


def _policy_loss_gradient(layout, theta, data):
    """∇ of the inner (policy-gradient) loss on ``data`` at ``theta``, ``[T, P]``."""
    observations = data.observations.contiguous()
    targets = policy_loss_targets(data)
    zeros = torch.zeros(data.tasks, layout.size, dtype=theta.dtype, device=theta.device)
    return loss_hvp(layout, theta, observations, targets, zeros)[1]


def fused_adapt(layout: PolicyLayout, theta: torch.Tensor, data, inner_lr: float) -> torch.Tensor:
    """``θ'_t = θ - α ∇L_t(θ)``, ``[T, P]``: :func:`maml_ext.rl.metarl.adapt` on the engine."""
    if inner_lr == 0:
        return _rows(theta, data.tasks).contiguous()
    program = program_of(layout)
    rates = torch.full((1, layout.size), float(inner_lr), dtype=theta.dtype, device=theta.device)
    # The engine's inner loop (a gradient pass, no tangent), one step of rate α.
    return torch.ops.maml_ext.adapt(
        theta,
        rates,
        data.observations.contiguous(),
        policy_loss_targets(data),
        program.ints_list,
        program.floats_list,
        _GAUSSIAN_NLL,
    )


def fused_policy_gradient(layout: PolicyLayout, adapted: torch.Tensor, outer) -> torch.Tensor:
    """``∇S_t`` at the sampling policy, ``[T, P]``: minus the policy-gradient loss's gradient."""
    return -_policy_loss_gradient(layout, adapted, outer)


class FusedFisherAt:
    """:class:`maml_ext.rl.metarl.FisherAt` on the engine (the module docstring's identity)."""

    def __init__(self, layout: PolicyLayout, adapted: torch.Tensor, outer):
        program = program_of(layout)
        self.layout = layout
        self.params = adapted.detach().contiguous()
        self.observations = outer.observations.contiguous()
        self.action_size = layout.shapes[-1][0]
        outputs = torch.ops.maml_ext.program_forward(
            self.params, self.observations, program.ints_list, program.floats_list
        )
        self.targets = _targets(outputs[..., : self.action_size].detach(), outer.weights)
        self.log_std_weights = 2 * outer.weights.sum(-1, keepdim=True).to(adapted.dtype)

    def product(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = _rows(vectors, self.params.shape[0]).contiguous()
        result = loss_hvp(self.layout, self.params, self.observations, self.targets, vectors)[2]
        split = -self.action_size
        log_std = vectors[:, split:] * self.log_std_weights
        return torch.cat([result[:, :split], result[:, split:] + log_std], -1)

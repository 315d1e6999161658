"""The Gaussian policy of MAML's reinforcement-learning experiments, and its functional form.

:class:`GaussianPolicy` is an ``nn.Module``: the mean is an MLP (two hidden layers of 100 ReLU
units by default, Xavier-uniform weights, zero biases) and the standard deviation is
``exp(log_std)``, one state-independent parameter per action dimension (initial std 1.0). Both are
adapted in the inner step.

The meta-RL code works on *flat* parameter vectors, one row per task (``[T, P]``): each task's
adapted policy differs. :class:`PolicyLayout` maps such a row (or a ``[T, P]`` block, through
broadcasting batched matrix products, with no per-task Python) to the mean and log-std, in the order
of ``policy.ordered_parameters()`` (the mean's layers, then log_std).
``torch.func.functional_call(policy, params, obs)`` gives the same
distribution from a dict of (unbatched) parameters, so ``torch.func.vmap`` works too.

This slice runs on torch/``torch.func``: the fused C++ engine has no Gaussian loss yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["GaussianPolicy", "PolicyLayout", "gaussian_log_prob", "gaussian_kl"]

_ACTIVATIONS = {"relu": (nn.ReLU, torch.relu), "tanh": (nn.Tanh, torch.tanh)}


def gaussian_log_prob(mean, log_std, actions) -> torch.Tensor:
    """log N(actions | mean, exp(log_std)²), summed over the last (action) dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return -0.5 * (z * z).sum(-1) - log_std.sum(-1) - 0.5 * mean.shape[-1] * math.log(2 * math.pi)


def gaussian_kl(old_mean, old_log_std, mean, log_std) -> torch.Tensor:
    """KL(N(old) ‖ N(new)) of diagonal Gaussians, summed over the last dimension."""
    variance_ratio = torch.exp(2 * (old_log_std - log_std))
    mean_term = (old_mean - mean) ** 2 * torch.exp(-2 * log_std)
    return (log_std - old_log_std + 0.5 * (variance_ratio + mean_term) - 0.5).sum(-1)


class GaussianPolicy(nn.Module):
    """π(a | s) = N(MLP(s), diag(exp(log_std))²); ``forward(obs)`` returns a
    ``torch.distributions.Normal`` (sum ``log_prob`` over the last dimension for the joint).

    ``hidden``: widths of the hidden layers (default (100, 100), the paper's); ``activation``:
    "relu" (the paper) or "tanh" (a common reimplementation's choice, with hidden=(64, 64)).
    """

    def __init__(
        self,
        observation_size: int,
        action_size: int,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        init_std: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if init_std <= 0:
            raise ValueError(f"init_std: expected a positive standard deviation, got {init_std}")
        self.observation_size, self.action_size = int(observation_size), int(action_size)
        self.hidden, self.activation = tuple(int(width) for width in hidden), activation
        widths = (self.observation_size, *self.hidden, self.action_size)
        layers: list[nn.Module] = []
        for index in range(len(widths) - 1):
            linear = nn.Linear(widths[index], widths[index + 1], dtype=dtype, device=device)
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if index < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation][0]())
        self.mean = nn.Sequential(*layers)
        self.log_std = nn.Parameter(
            torch.full((self.action_size,), math.log(init_std), dtype=dtype, device=device)
        )

    def forward(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = self.mean(obs)
        return torch.distributions.Normal(mean, torch.exp(self.log_std).expand_as(mean))

    def layout(self) -> PolicyLayout:
        """The flat-parameter view of this architecture."""
        return PolicyLayout(
            [(name, tuple(p.shape)) for name, p in self.ordered_parameters()], self.activation
        )

    def ordered_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` in the flat order: the mean's layers, then ``log_std``."""
        return [("mean." + name, p) for name, p in self.mean.named_parameters()] + [
            ("log_std", self.log_std)
        ]

    def flat_parameters(self) -> torch.Tensor:
        """Every parameter in :meth:`ordered_parameters` order, as one detached vector."""
        return torch.cat([p.detach().reshape(-1) for _, p in self.ordered_parameters()])

    @torch.no_grad()
    def load_flat_parameters(self, flat: torch.Tensor) -> None:
        """Copies a flat vector (as :meth:`flat_parameters` orders it) into the parameters."""
        total = sum(p.numel() for p in self.parameters())
        if flat.shape != (total,):
            raise ValueError(
                f"flat: expected a vector of {total} parameters, got {list(flat.shape)}"
            )
        offset = 0
        for _, p in self.ordered_parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def config(self) -> dict:
        return {
            "observation_size": self.observation_size,
            "action_size": self.action_size,
            "hidden": list(self.hidden),
            "activation": self.activation,
        }


class PolicyLayout:
    """Maps flat parameters ``[..., P]`` (any leading task dimensions) to the policy's mean and
    log-std. Linear layers alternate with the activation; the last parameter is ``log_std``."""

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]], activation: str = "relu"):
        self.names = [name for name, _ in shapes]
        self.shapes = [tuple(shape) for _, shape in shapes]
        if self.names[-1] != "log_std" or (len(self.names) - 1) % 2:
            raise ValueError("shapes: expected (weight, bias) pairs followed by log_std")
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.size = sum(self.sizes)
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation][1]

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` ``[..., P]`` as each parameter, ``[..., *shape]``."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"flat: expected {self.size} parameters last, got {list(flat.shape)}")
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return [piece.reshape(*lead, *shape) for piece, shape in zip(pieces, self.shapes)]

    def layer_program(self):
        """This architecture as the fused engine's layer program: the mean's Linear layers and
        activations, then ``AppendLogStd``; its θ is exactly this layout's flat vector (the same
        parameters in the same order and shapes)."""
        from ..models import AppendLogStd
        from ..program import compile_program

        layers: list[nn.Module] = []
        linear_shapes = self.shapes[:-1:2]
        for index, (out_features, in_features) in enumerate(linear_shapes):
            layers.append(nn.Linear(in_features, out_features, device="meta"))
            if index < len(linear_shapes) - 1:
                layers.append(_ACTIVATIONS[self.activation_name][0]())
        layers.append(AppendLogStd(self.shapes[-1][0]))
        return compile_program(nn.Sequential(*layers))

    def mean_log_std(self, flat: torch.Tensor, obs: torch.Tensor):
        """``(mean [..., N, A], log_std [..., A])`` for parameters ``[..., P]`` and observations
        ``[..., N, O]`` (the leading dimensions broadcast: one parameter row per task)."""
        params = self.unflatten(flat)
        x = obs
        layers = len(params) // 2
        for index in range(layers):
            weight, bias = params[2 * index], params[2 * index + 1]
            x = torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(-2)
            if index < layers - 1:
                x = self.activation(x)
        return x, params[-1]

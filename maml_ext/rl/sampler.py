"""Batched rollouts and their advantages.

:func:`sample_rollouts` runs ``K`` episodes of each of ``T`` tasks at once, each task with its own
parameter row (``[T, P]``: the pre-adaptation policy repeated, or each task's adapted policy), and
returns :class:`Rollouts`: tensors ``[T, K, H, ...]`` plus a validity mask (steps after an episode
ended are padding). :func:`process_rollouts` adds discounted returns, the per-task linear-baseline
values, GAE(λ) advantages (λ = 1: return minus baseline) normalised per task over its valid steps.

A non-finite observation or reward on a valid step raises a ``FloatingPointError`` naming the task,
rollout and step; such a batch never reaches a parameter update.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .baseline import fit_linear_baseline
from .policy import PolicyLayout

__all__ = ["Rollouts", "sample_rollouts", "process_rollouts"]


@dataclass
class Rollouts:
    """One meta-batch of episodes. ``observations [T, K, H, O]``, ``actions [T, K, H, A]``,
    ``rewards``/``mask [T, K, H]`` (mask: bool, the step happened). After
    :func:`process_rollouts`: ``returns`` (discounted reward-to-go), ``baseline`` and normalised
    ``advantages``, all ``[T, K, H]`` and zero on padding."""

    tasks: torch.Tensor
    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    returns: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    @property
    def episode_returns(self) -> torch.Tensor:
        """Undiscounted return of each episode, ``[T, K]``."""
        return (self.rewards * self.mask).sum(-1)

    def flat(self):
        """``(observations [T, N, O], actions [T, N, A], advantages [T, N], weights [T, N])``
        with N = K·H; ``weights`` = mask / valid steps of the task (a per-task mean)."""
        if self.advantages is None:
            raise ValueError("rollouts: call process_rollouts first (no advantages yet)")
        tasks = self.observations.shape[0]
        mask = self.mask.reshape(tasks, -1).to(self.observations.dtype)
        weights = mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
        return (
            self.observations.reshape(tasks, -1, self.observations.shape[-1]),
            self.actions.reshape(tasks, -1, self.actions.shape[-1]),
            self.advantages.reshape(tasks, -1),
            weights,
        )


@torch.no_grad()
def sample_rollouts(
    env,
    layout: PolicyLayout,
    params: torch.Tensor,
    tasks: torch.Tensor,
    rollouts: int,
    generator: torch.Generator | None = None,
    horizon: int | None = None,
    deterministic: bool = False,
) -> Rollouts:
    """``rollouts`` episodes of each task, the policy of task ``t`` given by ``params[t]``
    (``[T, P]``; a ``[P]`` vector is shared). Actions are drawn with ``generator``."""
    horizon = env.horizon if horizon is None else int(horizon)
    count = tasks.shape[0]
    if params.dim() == 1:
        params = params.expand(count, -1)
    if params.dim() != 2 or params.shape != (count, layout.size):
        raise ValueError(
            f"params: expected [T={count}, P={layout.size}] (or [P]), got {list(params.shape)}"
        )
    obs = env.reset(tasks, rollouts)
    observations, actions, rewards, mask = [], [], [], []
    alive = torch.ones(obs.shape[:2], dtype=torch.bool, device=obs.device)
    for _ in range(horizon):
        mean, log_std = layout.mean_log_std(params, obs.to(params.dtype))
        if deterministic:
            action = mean
        else:
            noise = torch.randn(
                mean.shape, generator=generator, dtype=mean.dtype, device=mean.device
            )
            action = mean + torch.exp(log_std).unsqueeze(-2) * noise
        next_obs, reward, done = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        mask.append(alive)
        alive = alive & ~done
        obs = next_obs
    batch = Rollouts(
        tasks=tasks,
        observations=torch.stack(observations, 2).to(params.dtype),
        actions=torch.stack(actions, 2),
        rewards=torch.stack(rewards, 2).to(params.dtype),
        mask=torch.stack(mask, 2),
    )
    check_finite(batch)
    # Padding (steps after an episode ended) is zeroed, so that whatever a simulator returns there
    # (even NaN) cannot leak into a loss through a zero weight.
    valid = batch.mask.unsqueeze(-1)
    batch.observations = torch.where(valid, batch.observations, 0.0)
    batch.actions = torch.where(valid, batch.actions, 0.0)
    batch.rewards = torch.where(batch.mask, batch.rewards, 0.0)
    return batch


def check_finite(batch: Rollouts) -> None:
    """Raises ``FloatingPointError`` naming the first task/rollout/step whose observation or
    reward is not finite (padding steps are not checked: they are never used)."""
    for name, values in (("observation", batch.observations), ("reward", batch.rewards)):
        finite = torch.isfinite(values) if values.dim() == 3 else torch.isfinite(values).all(-1)
        bad = ~finite & batch.mask
        if bool(bad.any()):
            task, rollout, step = (int(i) for i in bad.nonzero()[0])
            raise FloatingPointError(
                f"rollouts: non-finite {name} in task {task}, rollout {rollout}, step {step} "
                "(an unstable simulation?); this batch is not trained on"
            )


def _discount_matrix(horizon: int, factor: float, like: torch.Tensor) -> torch.Tensor:
    """``M[i, j] = factor^(j - i)`` for j ≥ i, else 0: ``x @ M.T`` sums ``x`` discounted forward."""
    index = torch.arange(horizon, device=like.device)
    lag = (index[None, :] - index[:, None]).to(like.dtype)
    return torch.where(lag >= 0, factor ** lag.clamp_min(0), torch.zeros((), dtype=like.dtype))


def process_rollouts(
    batch: Rollouts, discount: float = 0.99, gae_lambda: float = 1.0, normalize: bool = True
) -> Rollouts:
    """``batch`` with returns, per-task baseline values and advantages (GAE(λ), normalised per
    task over its valid steps to mean 0 and standard deviation 1)."""
    check_finite(batch)
    weight = batch.mask.to(batch.rewards.dtype)
    rewards = torch.where(batch.mask, batch.rewards, 0.0)
    horizon = rewards.shape[-1]
    returns = rewards @ _discount_matrix(horizon, discount, rewards).T
    values = fit_linear_baseline(batch.observations, returns, batch.mask)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (rewards + discount * next_values - values) * weight
    advantages = deltas @ _discount_matrix(horizon, discount * gae_lambda, deltas).T
    if normalize:
        tasks = advantages.shape[0]
        count = weight.reshape(tasks, -1).sum(-1).clamp_min(1.0).view(tasks, 1, 1)
        mean = advantages.sum((1, 2), keepdim=True) / count
        centred = (advantages - mean) * weight
        std = torch.sqrt((centred * centred).sum((1, 2), keepdim=True) / count)
        advantages = centred / (std + 1e-8)
    if not bool(torch.isfinite(advantages).all()):
        raise FloatingPointError("advantages: not finite; this batch is not trained on")
    return replace(batch, returns=returns, baseline=values, advantages=advantages)

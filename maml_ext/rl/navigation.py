"""The paper's 2D point navigation (MAML section 5.3), as one batched tensor environment.

A point starts at the origin and must reach a goal drawn uniformly from ``[-0.5, 0.5]²`` (one goal
per task). The action is a displacement, clipped to ``[-0.1, 0.1]²``; the reward is the negative
Euclidean distance to the goal after the move, ``-‖s - g‖``. That is the authors' code
(``point_env_randgoal.py``); the paper's text says *squared* distance, but the published numbers
come from the code, so the code's reward is used here. An episode is done once ``|dx| < 0.01`` and
``|dy| < 0.01``.

All ``tasks × rollouts`` points advance in one tensor operation per step: no Python per rollout.
"""

from __future__ import annotations

import torch

__all__ = ["Navigation2D"]


class Navigation2D:
    """Batched 2D point navigation; the :class:`maml_ext.rl.envs.BatchedEnv` protocol.

    ``horizon``: steps per episode (100 in the paper). ``dtype``/``device``: of every tensor the
    environment makes (tasks, observations, rewards). ``goal_range``, ``action_bound`` and
    ``tolerance`` default to the paper's values. ``action_scale`` multiplies the policy's action
    before the clip: 1 (the default) moves by the action itself; ``action_bound`` (0.1) is the
    authors' code, whose environment sits in rllab's ``normalize`` wrapper, which maps a policy
    action in ``[-1, 1]`` onto the bounds, so that a unit standard deviation spans the clip range.
    """

    name = "navigation2d"
    observation_size = 2
    action_size = 2
    task_size = 2

    def __init__(
        self,
        horizon: int = 100,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        goal_range: float = 0.5,
        action_bound: float = 0.1,
        tolerance: float = 0.01,
        action_scale: float = 1.0,
    ):
        if int(horizon) < 1:
            raise ValueError(f"horizon: expected a positive number of steps, got {horizon}")
        self.horizon = int(horizon)
        self.dtype = dtype
        self.device = torch.device(device)
        self.goal_range = float(goal_range)
        self.action_bound = float(action_bound)
        self.tolerance = float(tolerance)
        if not action_scale > 0:
            raise ValueError(f"action_scale: expected a positive factor, got {action_scale}")
        self.action_scale = float(action_scale)
        self._goals: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._done: torch.Tensor | None = None

    def sample_tasks(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` goals, uniform in ``[-goal_range, goal_range]²``: ``[count, 2]``."""
        if int(count) < 1:
            raise ValueError(f"count: expected a positive number of tasks, got {count}")
        draw = torch.rand(count, 2, generator=generator, dtype=self.dtype, device=self.device)
        return (2.0 * draw - 1.0) * self.goal_range

    def reset(self, tasks: torch.Tensor, rollouts: int) -> torch.Tensor:
        """Starts ``rollouts`` episodes per goal at the origin; observations ``[T, K, 2]``."""
        if tasks.dim() != 2 or tasks.shape[1] != self.task_size:
            raise ValueError(f"tasks: expected goals of shape [T, 2], got {list(tasks.shape)}")
        if not torch.isfinite(tasks).all():
            raise ValueError("tasks: goals must be finite")
        if int(rollouts) < 1:
            raise ValueError(f"rollouts: expected a positive number, got {rollouts}")
        goals = tasks.to(dtype=self.dtype, device=self.device)
        self._goals = goals[:, None, :].expand(-1, int(rollouts), -1)
        self._positions = torch.zeros_like(self._goals)
        self._done = torch.zeros(self._goals.shape[:2], dtype=torch.bool, device=self.device)
        return self._positions.clone()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Moves every point by its clipped action; ``(positions, -distance, done)``."""
        if self._positions is None:
            raise RuntimeError("step: call reset(tasks, rollouts) first")
        if actions.shape != self._positions.shape:
            raise ValueError(
                f"actions: expected shape {list(self._positions.shape)} [T, K, 2], "
                f"got {list(actions.shape)}"
            )
        bound = self.action_bound
        moves = actions.to(dtype=self.dtype, device=self.device)
        if self.action_scale != 1.0:
            moves = moves * self.action_scale
        moves = moves.clamp(-bound, bound)
        self._positions = self._positions + moves
        offset = self._positions - self._goals
        rewards = -torch.linalg.vector_norm(offset, dim=-1)
        reached = (offset.abs() < self.tolerance).all(dim=-1)
        self._done = self._done | reached
        return self._positions.clone(), rewards, self._done.clone()

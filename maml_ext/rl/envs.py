"""The batched-environment protocol and the registry of environments by name.

An environment steps a whole meta-batch at once: ``tasks`` tasks × ``rollouts`` episodes, as
tensors ``[T, K, ...]``. Episodes that end early are reported through ``done`` and masked by the
sampler; the environment keeps stepping them (whatever it returns after ``done`` is ignored), so
every call has the same shapes and no episode is reset inside a batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch


class BatchedEnv(Protocol):
    """What the sampler needs from an environment.

    ``sample_tasks`` draws task parameters (a goal, a target velocity, a direction) as a tensor
    ``[T, task_size]``; ``reset`` starts ``rollouts`` episodes of each task and returns the first
    observations ``[T, K, observation_size]``; ``step`` takes actions ``[T, K, action_size]`` and
    returns ``(observations [T, K, observation_size], rewards [T, K], done [T, K] bool)``.
    ``done`` stays true once set. Every episode lasts at most ``horizon`` steps.
    """

    name: str
    observation_size: int
    action_size: int
    task_size: int
    horizon: int

    def sample_tasks(self, count: int, generator: torch.Generator) -> torch.Tensor: ...

    def reset(self, tasks: torch.Tensor, rollouts: int) -> torch.Tensor: ...

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


# name -> "module:factory"; imported on first use, so that the MuJoCo environments' optional
# packages are needed only by whoever makes one of them.
ENVIRONMENTS: dict[str, str] = {
    "navigation2d": "maml_ext.rl.navigation:Navigation2D",
    "halfcheetah-vel": "maml_ext.rl.mujoco_envs:HalfCheetahVelocity",
    "halfcheetah-dir": "maml_ext.rl.mujoco_envs:HalfCheetahDirection",
    "ant-vel": "maml_ext.rl.mujoco_envs:AntVelocity",
    "ant-dir": "maml_ext.rl.mujoco_envs:AntDirection",
}


def environment_factory(name: str) -> Callable[..., BatchedEnv]:
    """The class (or factory) registered as ``name``."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"env: unknown environment {name!r}; known: {', '.join(ENVIRONMENTS)}")
    module, attribute = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def make_env(name: str, **kwargs) -> BatchedEnv:
    """A new batched environment: ``make_env("navigation2d", horizon=100)``. Keyword arguments go to
    the environment's constructor (each documents its own: horizon, dtype, device, ...)."""
    return environment_factory(name)(**kwargs)

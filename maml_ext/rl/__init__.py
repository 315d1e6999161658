"""Meta-reinforcement learning (MAML's section 5.3): batched environments, a Gaussian policy, the
REINFORCE inner step and the TRPO outer step.

Environments are task-batched: one object steps ``[tasks, rollouts]`` episodes at once and hands
the sampler tensors, never one episode at a time (see :mod:`maml_ext.rl.envs`).
"""

from .envs import ENVIRONMENTS, BatchedEnv, make_env

__all__ = ["ENVIRONMENTS", "BatchedEnv", "make_env"]

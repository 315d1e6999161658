"""Meta-reinforcement learning (MAML's section 5.3): batched environments, a Gaussian policy, the
REINFORCE inner step and the TRPO outer step.

Environments are task-batched: one object steps ``[tasks, rollouts]`` episodes at once and hands
the sampler tensors, never one episode at a time (see :mod:`maml_ext.rl.envs`). The policy-gradient
maths (inner step, exact meta-gradient and Fisher-vector product through it, MetaTRPO) runs on
torch/``torch.func``, task-batched: the fused C++ engine has no Gaussian loss yet.
"""

from .baseline import fit_linear_baseline
from .envs import ENVIRONMENTS, BatchedEnv, make_env
from .metarl import (
    FisherAt,
    InnerCurvature,
    MetaAdam,
    MetaTRPO,
    TaskData,
    adapt,
    fisher_vector_product,
    inner_hvp,
    meta_gradient,
)
from .navigation import Navigation2D
from .policy import GaussianPolicy, PolicyLayout
from .sampler import Rollouts, process_rollouts, sample_rollouts

__all__ = [
    "ENVIRONMENTS",
    "BatchedEnv",
    "FisherAt",
    "GaussianPolicy",
    "InnerCurvature",
    "MetaAdam",
    "MetaTRPO",
    "Navigation2D",
    "PolicyLayout",
    "Rollouts",
    "TaskData",
    "adapt",
    "fisher_vector_product",
    "fit_linear_baseline",
    "inner_hvp",
    "make_env",
    "meta_gradient",
    "process_rollouts",
    "sample_rollouts",
    "load_rl_checkpoint",
]


def load_rl_checkpoint(path, device="cpu"):
    """The policies of a ``train rl-*`` checkpoint: ``.policy`` (meta-learned), ``.pretrained``."""
    from .train import load_rl_checkpoint as load

    return load(path, device=device)

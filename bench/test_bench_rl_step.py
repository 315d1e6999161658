"""pytest-benchmark: one MAML-TRPO step on 2D navigation (issue 12), implementation by engine.

    .venv/bin/python -m pytest bench/test_bench_rl_step.py --benchmark-columns=median,min,max,rounds
    MAML_BENCH_RL_SIZE=5,5,50 ...   # meta-batch, rollouts, horizon (default the paper's 20,20,100)

The step is the meta-gradient, 10 conjugate-gradient iterations on the Fisher-vector product
through the inner step, and the line search, from the same parameters on the same rollouts, for

- ``torch``: ``MetaTRPO(engine="torch")`` (task-batched torch.func, kept graphs);
- ``fused``: ``MetaTRPO(engine="fused")`` (the layer-program engine);
- ``reference``: the common reimplementations' step (a Python loop over tasks, double backward
  for every Fisher-vector product; ``bench/rl_step.py``).

Each benchmark first checks that its step moves the parameters where the reference's does
(float32: relative difference < 1e-3; 5e-6 to 8e-6 measured), then times a few rounds. The table
split into sampling, adaptation and the step is ``bench/rl_step.py``.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_step  # noqa: E402

from maml_ext.rl.metarl import MetaTRPO, TaskData, adapt  # noqa: E402
from maml_ext.rl.navigation import Navigation2D  # noqa: E402
from maml_ext.rl.policy import GaussianPolicy  # noqa: E402
from maml_ext.rl.sampler import process_rollouts, sample_rollouts  # noqa: E402

STEP_TOL = 1e-3
SIZES = tuple(int(v) for v in os.environ.get("MAML_BENCH_RL_SIZE", "20,20,100").split(","))


class _Problem:
    """The policy, one meta-batch of inner and outer rollouts, and the reference's step."""

    def __init__(self):
        meta_batch, rollouts, horizon = SIZES
        torch.manual_seed(0)
        env = Navigation2D(horizon=horizon, action_scale=0.1)
        self.policy = GaussianPolicy(2, 2)
        layout, theta = self.policy.layout(), self.policy.flat_parameters()
        generator = torch.Generator().manual_seed(1)
        tasks = env.sample_tasks(meta_batch, generator)

        def sample(params):
            return process_rollouts(
                sample_rollouts(env, layout, params, tasks, rollouts, generator)
            )

        self.inner = TaskData.of(sample(theta))
        self.outer = TaskData.of(sample(adapt(layout, theta, self.inner, 0.1).detach()))
        self.theta = theta.detach().clone()
        self.reference_step = self.run("reference") - self.theta

    def run(self, engine: str) -> torch.Tensor:
        """The parameters after one TRPO step of ``engine`` from the same start."""
        if engine == "reference":
            return rl_step.reference_trpo_step(self.policy, self.theta, self.inner, self.outer, 0.1)
        policy = copy.deepcopy(self.policy)
        MetaTRPO(policy, engine=engine).step(self.inner, self.outer)
        return policy.flat_parameters().detach()


@functools.cache
def problem() -> _Problem:
    """Built once per session: the reference's step alone takes seconds."""
    return _Problem()


@pytest.mark.parametrize("engine", ["torch", "fused", "reference"])
def test_trpo_step(benchmark, engine):
    setup = problem()
    assert setup.reference_step.norm() > 0, "the reference's line search took no step"
    step = setup.run(engine) - setup.theta  # also the warm-up
    difference = float((step - setup.reference_step).norm() / setup.reference_step.norm())
    assert difference < STEP_TOL, f"{engine}: step differs from the reference's by {difference:.2e}"
    benchmark.extra_info.update({"sizes": SIZES, "step_rel_diff_vs_reference": difference})
    benchmark.pedantic(setup.run, args=(engine,), rounds=3, iterations=1, warmup_rounds=0)

"""``adapt_steps``: the weights after each of several step counts from one inner loop, for every
meta-learner (MAML with each inner-rate kind, ANIL, MAML++'s per-step batch norm, iMAML's proximal
steps, Reptile's SGD and Adam) on both backends, equal in float64 to ``adapt(steps=k)`` run
separately for each k (which the other test files check against per-task autograd loops), and the
two backends' trajectories equal to each other."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from maml_test_utils import DEVICES, cuda_unavailable_reason, perturb_rates, relative_error
from torch import nn

import maml_ext

pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    pytest.mark.skipif(
        not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
    ),
]

BACKENDS = ["fused", "reference"]
# Trained with 3 inner steps; scored at 0, 1, 3 and beyond training (5): gaps of 1, 2 and 2 steps,
# so the fused backend runs multi-step segments.
COUNTS = [0, 1, 3, 5]


def mlp(batch_norm: bool = False) -> nn.Module:
    layers = [nn.Linear(4, 10)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(10, track_running_stats=False))
    layers += [nn.ReLU(), nn.Linear(10, 3)]
    return nn.Sequential(*layers).double()


def learner(kind: str, model: nn.Module, backend: str):
    common = dict(inner_steps=3, backend=backend)
    if kind == "imaml":
        return maml_ext.ImplicitMetaOptimizer(model, None, inner_lr=0.2, lam=2.0, **common)
    if kind in ("reptile-sgd", "reptile-adam"):
        return maml_ext.Reptile(
            model, inner_lr=0.05, outer_lr=1.0, inner_optimizer=kind.split("-")[1], **common
        )
    options = {
        "maml": {},
        "per-step-rates": {"learn_inner_lr": "per_step"},
        "meta-sgd": {"learn_inner_lr": "per_parameter"},
        "anil": {"adapt": "head"},
        "per-step-batch-norm": {"per_step_batch_norm": True},
    }[kind]
    return maml_ext.MetaOptimizer(model, None, inner_lr=0.3, **common, **options)


KINDS = [
    "maml",
    "per-step-rates",
    "meta-sgd",
    "anil",
    "per-step-batch-norm",
    "imaml",
    "reptile-sgd",
    "reptile-adam",
]


def setup(kind: str, device: str, seed: int):
    reason = cuda_unavailable_reason() if device == "cuda" else None
    if reason:
        pytest.skip(reason)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(batch_norm=kind == "per-step-batch-norm")
    learners = {b: learner(kind, copy.deepcopy(model).to(device), b) for b in BACKENDS}
    for opt in learners.values():
        # The same moved-apart rates and per-step batch-norm values for both backends.
        rate_generator = torch.Generator().manual_seed(seed + 1)
        if opt.inner_lr.learn is not None:
            perturb_rates(opt, rate_generator)
        if getattr(opt, "per_step_batch_norm", None) is not None:
            with torch.no_grad():
                for p in opt.per_step_batch_norm.parameters():
                    p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=rate_generator))
    support_x = torch.randn(4, 6, 4, dtype=torch.float64, generator=generator).to(device)
    support_y = torch.randint(0, 3, (4, 6), generator=generator).to(device)
    return learners, support_x, support_y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_trajectory_equals_adapt_per_count(kind, device, seed):
    learners, support_x, support_y = setup(kind, device, seed)
    trajectories = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # learned per-step rates beyond training reuse the last
        for backend, opt in learners.items():
            trajectory = dict(opt.adapt_steps(support_x, support_y, COUNTS))
            assert list(trajectory) == COUNTS
            for k in COUNTS:
                expected = (
                    {n: p.detach().expand(4, *p.shape) for n, p in opt._params(opt.model).items()}
                    if k == 0
                    else opt.adapt(support_x, support_y, steps=k)
                )
                assert set(trajectory[k]) == set(expected)
                for name, value in expected.items():
                    error = relative_error(trajectory[k][name], value)
                    assert error <= 1e-12, (backend, k, name, error)
            trajectories[backend] = trajectory
    # The weights move with k (the comparison above is not between unchanged θs) ...
    moved = relative_error(
        torch.cat([v.flatten() for v in trajectories["fused"][5].values()]),
        torch.cat([v.flatten() for v in trajectories["fused"][1].values()]),
    )
    assert moved > 1e-3
    # ... and the two backends' loops agree.
    for k in COUNTS:
        for name, value in trajectories["reference"][k].items():
            assert relative_error(trajectories["fused"][k][name], value) <= 1e-10, (k, name)


def test_items_are_computed_lazily_in_the_callers_grad_mode(seed):
    learners, support_x, support_y = setup("reptile-adam", "cpu", seed)
    opt = learners["fused"]
    trajectory = opt.adapt_steps(support_x, support_y, [2, 1])  # any order: yielded increasing
    k, _ = next(trajectory)
    assert k == 1 and torch.is_grad_enabled()  # no no_grad block left open across the yield
    k, weights = next(trajectory)
    assert k == 2 and not any(w.requires_grad for w in weights.values())
    with pytest.raises(StopIteration):
        next(trajectory)


@pytest.mark.parametrize("steps", [[], [1, 1], [-1], [1.5], [True], 3, None])
def test_bad_step_counts_are_refused_at_the_call(steps, seed):
    learners, support_x, support_y = setup("maml", "cpu", seed)
    with pytest.raises(ValueError, match="steps: expected a non-empty collection of distinct"):
        learners["fused"].adapt_steps(support_x, support_y, steps)


def test_bad_support_set_is_refused_at_the_call(seed):
    learners, support_x, support_y = setup("imaml", "cpu", seed)
    with pytest.raises(ValueError, match="support_x"):
        learners["fused"].adapt_steps(support_x.float(), support_y, [1])

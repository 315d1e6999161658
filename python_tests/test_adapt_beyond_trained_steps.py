"""Evaluation with more inner steps than training used: ``adapt(steps=k)`` for k beyond
``inner_steps`` works for every inner-rate kind on both backends, a learned per-step rate reuses
its last step and warns once, checked against plain per-task SGD written out here."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from maml_test_utils import (
    classification_batch,
    conv_net,
    perturb_rates,
    regression_batch,
    relative_error,
    sinusoid_mlp,
)
from torch.func import functional_call

import maml_ext

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

LEARN_KINDS = [None, "scalar", "per_parameter", "per_step"]
TRAINED_STEPS, EVAL_STEPS = 2, 5


def _rate(opt, name: str, step: int):
    """α of ``name`` at ``step``, read straight from the learned tensors (not through rate())."""
    rates = opt.inner_lr
    if rates.learn is None:
        return rates.init
    if rates.learn == "scalar":
        return rates.scalar
    value = rates.tensors[name.replace(".", "-")]
    return value[min(step, TRAINED_STEPS - 1)] if rates.learn == "per_step" else value


def _sgd_per_task(opt, loss, support_x, support_y, steps):
    """{name: [T, *shape]}: ``steps`` plain SGD steps on each task's support set, one at a time."""
    adapted = {name: [] for name, _ in opt.model.named_parameters()}
    for x, y in zip(support_x, support_y):
        weights = {n: p.detach().clone().requires_grad_() for n, p in opt.model.named_parameters()}
        for step in range(steps):
            value = loss(functional_call(opt.model, weights, (x,)), y)
            grads = torch.autograd.grad(value, list(weights.values()))
            with torch.no_grad():
                weights = {
                    n: (w - _rate(opt, n, step) * g).requires_grad_()
                    for (n, w), g in zip(weights.items(), grads)
                }
        for name, weight in weights.items():
            adapted[name].append(weight.detach())
    return {name: torch.stack(values) for name, values in adapted.items()}


def _case(kind: str, generator: torch.Generator):
    if kind == "mlp":
        return sinusoid_mlp(), "mse", F.mse_loss, regression_batch(3, 5, 4, generator=generator)
    batch = classification_batch(3, 6, 5, (1, 8, 8), 3, generator=generator)
    return conv_net(ways=3, channels=4, blocks=2, image=8), "cross_entropy", F.cross_entropy, batch


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("learn", LEARN_KINDS)
def test_adapt_beyond_the_trained_steps_is_plain_sgd(kind, backend, learn, seed):
    generator = torch.Generator().manual_seed(seed)
    model, loss_name, loss, (sx, sy, _, _) = _case(kind, generator)
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.05,
        inner_steps=TRAINED_STEPS,
        loss=loss_name,
        learn_inner_lr=learn,
        backend=backend,
    )
    perturb_rates(opt, generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = opt.adapt(sx, sy, steps=EVAL_STEPS)
        opt.adapt(sx, sy, steps=EVAL_STEPS + 1)  # a second evaluation says nothing more
        opt.adapt(sx, sy)
    expected = _sgd_per_task(opt, loss, sx, sy, EVAL_STEPS)
    assert set(adapted) == set(expected)
    for name in expected:
        assert relative_error(adapted[name], expected[name]) <= 1e-10, (name, seed)
    beyond = [w for w in caught if "beyond the" in str(w.message)]
    if learn == "per_step":
        assert len(beyond) == 1, [str(w.message) for w in caught]
        assert f"reuse the rates of step {TRAINED_STEPS}" in str(beyond[0].message)
    else:
        assert beyond == [], [str(w.message) for w in beyond]


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_the_last_per_step_rate_is_the_one_reused(backend, seed):
    # With the last of the 2 learned rates zeroed, every step from the second on changes nothing:
    # 5 steps give the weights of 1 step, which fails if any other step's rate were reused.
    generator = torch.Generator().manual_seed(seed)
    model, loss_name, _, (sx, sy, _, _) = _case("mlp", generator)
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.05,
        inner_steps=TRAINED_STEPS,
        loss=loss_name,
        learn_inner_lr="per_step",
        backend=backend,
    )
    perturb_rates(opt, generator)
    with torch.no_grad():
        for rates in opt.inner_lr.tensors.values():
            rates[-1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        five, two = opt.adapt(sx, sy, steps=EVAL_STEPS), opt.adapt(sx, sy, steps=1)
    for name in five:
        assert torch.equal(five[name], two[name]), name

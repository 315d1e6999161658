"""The reference backend against an independent per-task loop, finite differences, and its API."""

import copy

import pytest
import torch
import torch.nn.functional as F
from maml_test_utils import (
    all_grads,
    classification_batch,
    conv_net,
    perturb_rates,
    regression_batch,
    relative_error,
    sinusoid_mlp,
)
from torch import nn
from torch.func import functional_call

import maml_ext


def independent_meta_gradient(model, inner_lr, steps, first_order, loss_fn, sx, sy, qx, qy):
    """MAML written out by hand: per task, K inner steps with autograd.grad(create_graph=True)."""
    params = dict(model.named_parameters())
    total = 0
    for t in range(sx.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            inner = loss_fn(functional_call(model, fast, (sx[t],)), sy[t])
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = {n: w - inner_lr * g for (n, w), g in zip(fast.items(), grads)}
        total = total + loss_fn(functional_call(model, fast, (qx[t],)), qy[t])
    meta = total / sx.shape[0]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(meta, list(params.values()))])


CASES = {
    "mlp": (sinusoid_mlp, "mse", F.mse_loss),
    "conv_bn_pool": (lambda: conv_net(ways=5, channels=6), "cross_entropy", F.cross_entropy),
}


def make_batch(case, generator):
    if case == "mlp":
        return regression_batch(3, 6, 5, generator=generator)
    return classification_batch(3, 5, 4, (1, 8, 8), 5, generator=generator)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_reference_matches_independent_loop(case, steps, first_order, seed):
    generator = torch.Generator().manual_seed(seed)
    make_model, loss_name, loss_fn = CASES[case]
    model = make_model()
    batch = make_batch(case, generator)
    expected = independent_meta_gradient(model, 0.1, steps, first_order, loss_fn, *batch)
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.1,
        inner_steps=steps,
        first_order=first_order,
        loss=loss_name,
        backend="reference",
    )
    opt.meta_gradient(*batch)
    assert relative_error(all_grads(opt), expected) < 1e-10


def test_first_order_differs_from_second_order():
    model = sinusoid_mlp()
    batch = regression_batch(2, 6, 5, generator=torch.Generator().manual_seed(3))
    grads = []
    for first_order in (False, True):
        model.zero_grad()
        opt = maml_ext.MetaOptimizer(
            model,
            None,
            inner_lr=0.1,
            inner_steps=2,
            loss="mse",
            first_order=first_order,
            backend="reference",
        )
        opt.meta_gradient(*batch)
        grads.append(all_grads(opt).clone())
    assert relative_error(grads[1], grads[0]) > 1e-6  # the Hessian term is really dropped


@pytest.mark.parametrize("learn", ["scalar", "per_parameter", "per_step"])
@pytest.mark.parametrize("case", list(CASES))
def test_rate_gradient_matches_central_differences(learn, case, seed):
    generator = torch.Generator().manual_seed(seed)
    make_model, loss_name, _ = CASES[case]
    model = make_model()
    batch = make_batch(case, generator)
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.05,
        inner_steps=2,
        loss=loss_name,
        learn_inner_lr=learn,
        backend="reference",
    )
    perturb_rates(opt, generator)
    opt.meta_gradient(*batch)
    rates = list(opt.inner_lr.parameters())
    direction = [torch.randn(r.shape, dtype=r.dtype, generator=generator) for r in rates]
    analytic = sum((r.grad * d).sum() for r, d in zip(rates, direction))

    def meta_loss_at(scale):
        with torch.no_grad():
            for r, d in zip(rates, direction):
                r.add_(scale * d)
        try:
            params = dict(model.named_parameters())
            return maml_ext.reference.meta_loss(
                model, params, opt.inner_lr, *batch, steps=2, first_order=False, loss=opt.loss
            ).loss.item()
        finally:
            with torch.no_grad():
                for r, d in zip(rates, direction):
                    r.sub_(scale * d)

    # ReLU, max-pool and batch norm put kinks in the meta-loss: only a small step agrees.
    eps = 1e-7
    numeric = (meta_loss_at(eps) - meta_loss_at(-eps)) / (2 * eps)
    assert abs(numeric - analytic.item()) <= 1e-6 * max(1.0, abs(numeric))


def test_step_applies_outer_optimizer_and_reports():
    torch.manual_seed(0)
    model = conv_net(ways=4, channels=4)
    before = copy.deepcopy(model.state_dict())
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = maml_ext.MetaOptimizer(
        model, outer, inner_lr=0.2, loss="cross_entropy", backend="reference"
    )
    batch = classification_batch(2, 4, 6, (1, 8, 8), 4)
    expected = independent_meta_gradient(
        copy.deepcopy(model), 0.2, 1, False, F.cross_entropy, *batch
    )
    result = opt.step(*batch)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    start = torch.cat([before[n].reshape(-1) for n, _ in model.named_parameters()])
    assert relative_error(after, start - 0.1 * expected) < 1e-12
    assert result.query_accuracy is not None and 0 <= result.query_accuracy.item() <= 1
    assert result.support_loss.item() > 0 and result.backend == "reference"


def test_adapt_then_predict_reproduces_query_loss():
    model = sinusoid_mlp()
    opt = maml_ext.MetaOptimizer(
        model, None, inner_lr=0.05, inner_steps=2, loss="mse", backend="reference"
    )
    batch = regression_batch(3, 8, 5, generator=torch.Generator().manual_seed(5))
    result = opt.meta_gradient(*batch)
    adapted = opt.adapt(batch[0], batch[1])
    assert adapted["0.weight"].shape == (3, 40, 1)
    outputs = opt.predict(adapted, batch[2])
    assert outputs.shape == (3, 5, 1)
    query_loss = ((outputs - batch[3]) ** 2).mean(dim=(1, 2)).mean()
    assert abs(query_loss.item() - result.query_loss.item()) < 1e-12
    # with the paper's small rate, more steps keep lowering the support loss
    small = maml_ext.MetaOptimizer(model, None, inner_lr=0.01, loss="mse", backend="reference")
    support_loss = [
        ((small.predict(small.adapt(batch[0], batch[1], steps=k), batch[0]) - batch[1]) ** 2).mean()
        for k in (1, 10)
    ]
    assert support_loss[1].item() < support_loss[0].item() < result.support_loss.item()


def test_running_stats_batch_norm_is_rejected():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)
    )
    with pytest.raises(ValueError, match=r"'1'.*track_running_stats=False"):
        maml_ext.MetaOptimizer(model, None, inner_lr=0.1)

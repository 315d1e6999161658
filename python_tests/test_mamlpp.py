"""MAML++'s options in MetaOptimizer (multi_step_loss with its annealing, per_step_batch_norm), on
both backends, exact against the independent per-task autograd loop of variant_oracle.py
(float64), alone, together and with ANIL's adapt=."""

from __future__ import annotations

import copy

import pytest
import torch
from maml_test_utils import conv_net, perturb_rates
from torch import nn
from variant_oracle import optimizer_gradient, oracle_gradient, relative_error

import maml_ext
from maml_ext.variants import msl_weights

BACKENDS = ["reference", "fused"]


def bn_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 12),
        nn.BatchNorm1d(12, track_running_stats=False),
        nn.ReLU(),
        nn.Linear(12, 3),
    ).double()


def batch(generator, model_kind, tasks=3, loss="cross_entropy"):
    shape = (4,) if model_kind == "mlp" else (1, 8, 8)
    sx = torch.randn(tasks, 6, *shape, dtype=torch.float64, generator=generator)
    qx = torch.randn(tasks, 5, *shape, dtype=torch.float64, generator=generator)
    if loss == "mse":
        return (
            sx,
            torch.randn(tasks, 6, 3, dtype=torch.float64, generator=generator),
            qx,
            torch.randn(tasks, 5, 3, dtype=torch.float64, generator=generator),
        )
    sy = torch.randint(0, 3, (tasks, 6), generator=generator)
    qy = torch.randint(0, 3, (tasks, 5), generator=generator)
    return sx, sy, qx, qy


def make_model(kind):
    return bn_mlp() if kind == "mlp" else conv_net(ways=3, channels=4)


def perturb_batch_norm(opt, generator):
    """Moves each step's batch-norm parameters apart, so every step's own values matter."""
    with torch.no_grad():
        for p in opt.per_step_batch_norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=generator))


def adapted_names(opt):
    names = [n for n, _ in opt.model.named_parameters()]
    return names if opt.adapt_names is None else [n for n in names if n in opt.adapt_names]


def test_msl_weights_follow_the_authors_annealing():
    # K = 5 over 10 iterations: the non-final weights lose 1/(5·10) = 0.02 per iteration down to
    # 0.03/5 = 0.006; the final one takes what they lose, up to 1 - 4·0.006.
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5, abs=1e-15)
    assert msl_weights(5, 5, 10) == pytest.approx([0.1] * 4 + [0.6], abs=1e-15)
    assert msl_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92], abs=1e-15)
    # Over 100 iterations the floor is reached (at iteration 97) before the end.
    assert msl_weights(5, 99, 100) == pytest.approx([0.006] * 4 + [0.976], abs=1e-15)
    for iteration in range(0, 100, 7):
        assert sum(msl_weights(5, iteration, 100)) == pytest.approx(1.0, abs=1e-14)


# (model, learned-rate kind): every kind on the MLP, fixed and per-step rates on the conv net.
MODEL_RATES = [
    *(("mlp", learn) for learn in (None, "scalar", "per_parameter", "per_step")),
    ("conv", None),
    ("conv", "per_step"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_kind, learn", MODEL_RATES)
@pytest.mark.parametrize("first_order", [False, True])
def test_multi_step_loss_is_exact_and_anneals_away(backend, model_kind, learn, first_order, seed):
    g = torch.Generator().manual_seed(seed)
    model = make_model(model_kind)
    outer = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = maml_ext.MetaOptimizer(
        model,
        outer,
        inner_lr=0.3,
        inner_steps=3,
        first_order=first_order,
        learn_inner_lr=learn,
        backend=backend,
        multi_step_loss=True,
        msl_iterations=2,
    )
    perturb_rates(opt, g)
    names = adapted_names(opt)
    # K = 3 over 2 iterations: iteration 0 weights each step's loss 1/3, iteration 1 by 1/6,
    # 1/6, 2/3; from iteration 2 on only the final loss counts.
    for iteration, weights in ((0, [1 / 3] * 3), (1, [1 / 6, 1 / 6, 2 / 3]), (2, None)):
        data = batch(g, model_kind, tasks=2)
        if iteration == 1:  # not checked at every iteration: the oracle is the slow part
            opt.step(*data)
            continue
        expected = oracle_gradient(
            opt, data, adapted=names, first_order=first_order, weights=weights
        )
        opt.step(*data)
        assert relative_error(optimizer_gradient(opt), expected) < 1e-10
    assert opt.iteration == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_msl_middle_iteration_weights(backend, seed):
    g = torch.Generator().manual_seed(seed)
    model = bn_mlp()
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.3,
        inner_steps=3,
        backend=backend,
        multi_step_loss=True,
        msl_iterations=2,
    )
    opt.iteration = 1
    data = batch(g, "mlp")
    names = adapted_names(opt)
    expected = oracle_gradient(
        opt, data, adapted=names, first_order=False, weights=[1 / 6, 1 / 6, 2 / 3]
    )
    final = oracle_gradient(opt, data, adapted=names, first_order=False)
    opt.meta_gradient(*data)
    assert relative_error(optimizer_gradient(opt), expected) < 1e-10
    assert relative_error(optimizer_gradient(opt), final) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_msl_query_loss_is_the_final_steps(backend, seed):
    g = torch.Generator().manual_seed(seed)
    model = make_model("conv")
    plain = maml_ext.MetaOptimizer(model, None, inner_lr=0.3, inner_steps=3, backend="reference")
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.3,
        inner_steps=3,
        backend=backend,
        multi_step_loss=True,
        msl_iterations=5,
    )
    data = batch(g, "conv")
    want, got = plain.meta_gradient(*data), opt.meta_gradient(*data)
    assert relative_error(got.query_loss, want.query_loss) < 1e-10
    assert relative_error(got.support_loss, want.support_loss) < 1e-10
    assert relative_error(got.query_accuracy, want.query_accuracy) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_kind, learn", MODEL_RATES)
@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_batch_norm_is_exact(backend, model_kind, learn, first_order, seed):
    g = torch.Generator().manual_seed(seed)
    model = make_model(model_kind)
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.3,
        inner_steps=3,
        first_order=first_order,
        learn_inner_lr=learn,
        backend=backend,
        per_step_batch_norm=True,
    )
    bn_names = opt.per_step_batch_norm.names
    assert bn_names and not (set(bn_names) & set(adapted_names(opt)))
    for name in bn_names:
        extra = opt.per_step_batch_norm.extra[name.replace(".", "-")]
        assert extra.shape[0] == 2
        assert torch.equal(extra[1], dict(model.named_parameters())[name].detach())
    perturb_rates(opt, g)
    perturb_batch_norm(opt, g)
    data = batch(g, model_kind, tasks=2)
    expected = oracle_gradient(
        opt, data, adapted=adapted_names(opt), first_order=first_order, per_step_bn=bn_names
    )
    opt.meta_gradient(*data)
    got = optimizer_gradient(opt)
    assert relative_error(got, expected) < 1e-10
    assert all(p.grad.abs().max() > 0 for p in opt.per_step_batch_norm.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_all_options_together_are_exact(backend, loss, seed):
    g = torch.Generator().manual_seed(seed)
    model = bn_mlp()
    outer = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = maml_ext.MetaOptimizer(
        model,
        outer,
        inner_lr=0.2,
        inner_steps=4,
        learn_inner_lr="per_step",
        backend=backend,
        loss=loss,
        multi_step_loss=True,
        msl_iterations=3,
        per_step_batch_norm=True,
        first_order_until=1,
        adapt=["0", "3"],
    )
    assert len(outer.param_groups) == 3  # the model, the rates, the per-step batch norm
    perturb_rates(opt, g)
    perturb_batch_norm(opt, g)
    bn_names = opt.per_step_batch_norm.names
    for iteration in range(2):
        data = batch(g, "mlp", loss=loss)
        expected = oracle_gradient(
            opt,
            data,
            adapted=adapted_names(opt),
            first_order=iteration < 1,
            weights=msl_weights(4, iteration, 3),
            per_step_bn=bn_names,
            loss=loss,
        )
        opt.step(*data)
        assert relative_error(optimizer_gradient(opt), expected) < 1e-10


@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_per_step_batch_norm_adapt_and_predict_beyond_the_trained_steps(model_kind, seed):
    g = torch.Generator().manual_seed(seed)
    model = make_model(model_kind)
    opts = [
        maml_ext.MetaOptimizer(
            model, None, inner_lr=0.3, inner_steps=2, backend=b, per_step_batch_norm=True
        )
        for b in BACKENDS
    ]
    opts[1].per_step_batch_norm.load_state_dict(opts[0].per_step_batch_norm.state_dict())
    perturb_batch_norm(opts[0], g)
    opts[1].per_step_batch_norm.load_state_dict(opts[0].per_step_batch_norm.state_dict())
    sx, sy, qx, _ = batch(g, model_kind)
    for steps in (1, 2, 4):
        adapted = [o.adapt(sx, sy, steps=steps) for o in opts]
        for name in opts[0].per_step_batch_norm.names:
            # The last step taken's parameters: the model's own after one step, step 1's after more.
            want = dict(model.named_parameters())[name].detach()
            if steps > 1:
                want = opts[0].per_step_batch_norm.extra[name.replace(".", "-")][0].detach()
            for a in adapted:
                assert torch.equal(a[name], want.expand_as(a[name]))
        for name in adapted[0]:
            assert relative_error(adapted[1][name], adapted[0][name]) < 1e-10
        outputs = [o.predict(a, qx) for o, a in zip(opts, adapted)]
        assert relative_error(outputs[1], outputs[0]) < 1e-10


def test_state_dict_round_trip_keeps_per_step_batch_norm_and_iteration(seed):
    g = torch.Generator().manual_seed(seed)

    def build():
        model = bn_mlp()
        outer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return maml_ext.MetaOptimizer(
            model,
            outer,
            inner_lr=0.1,
            inner_steps=3,
            per_step_batch_norm=True,
            multi_step_loss=True,
            msl_iterations=4,
        )

    opt = build()
    for _ in range(2):
        opt.step(*batch(g, "mlp"))
    state = copy.deepcopy(opt.state_dict())  # as saved: Adam's state dict shares its tensors
    clone = build()
    clone.load_state_dict(state)
    assert clone.iteration == 2
    for a, b in zip(opt.per_step_batch_norm.parameters(), clone.per_step_batch_norm.parameters()):
        assert torch.equal(a, b)
    # Steps after the round trip are the same steps.
    data = batch(g, "mlp")
    opt.step(*data)
    clone.step(*data)
    for a, b in zip(opt.model.parameters(), clone.model.parameters()):
        assert torch.equal(a, b)
    plain = maml_ext.MetaOptimizer(bn_mlp(), None, inner_lr=0.1, inner_steps=3)
    before = [p.clone() for p in plain.model.parameters()]
    with pytest.raises(ValueError, match="per_step_batch_norm"):
        plain.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.model.parameters()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(multi_step_loss=True), "msl_iterations: expected a positive int"),
        (dict(multi_step_loss=True, msl_iterations=0), "msl_iterations: expected a positive int"),
        (dict(multi_step_loss=1, msl_iterations=3), "multi_step_loss: expected True or False"),
        (dict(per_step_batch_norm="yes"), "per_step_batch_norm: expected True or False"),
        (dict(per_step_batch_norm=True, adapt=["1.weight"]), "take no inner steps"),
        (dict(per_step_batch_norm=True, adapt=["1"]), "take no inner steps"),
    ],
)
def test_bad_options_are_clear_errors_that_change_nothing(kwargs, message):
    model = bn_mlp()
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        maml_ext.MetaOptimizer(model, outer, inner_lr=0.1, inner_steps=2, **kwargs)
    assert len(outer.param_groups) == 1


def test_per_step_batch_norm_needs_batch_norm():
    model = nn.Sequential(nn.Linear(2, 3)).double()
    with pytest.raises(ValueError, match="per_step_batch_norm: the model has no trainable"):
        maml_ext.MetaOptimizer(model, None, inner_lr=0.1, per_step_batch_norm=True)

"""ANIL (MetaOptimizer(adapt=...)) and derivative-order annealing (first_order_until), on both
backends, exact against the independent per-task autograd loop of variant_oracle.py (float64)."""

from __future__ import annotations

import pytest
import torch
from maml_test_utils import conv_net, perturb_rates
from torch import nn
from variant_oracle import optimizer_gradient, oracle_gradient, relative_error

import maml_ext

BACKENDS = ["reference", "fused"]
# (model, learned-rate kind): every kind on the MLP, fixed and per-step rates on the conv net.
MODEL_RATES = [
    *(("mlp", learn) for learn in (None, "scalar", "per_parameter", "per_step")),
    ("conv", None),
    ("conv", "per_step"),
]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)
    ).double()


def batch(generator, model_kind, tasks=3):
    if model_kind == "mlp":
        shape, support, query = (4,), 6, 7
    else:
        shape, support, query = (1, 8, 8), 5, 5
    sx = torch.randn(tasks, support, *shape, dtype=torch.float64, generator=generator)
    qx = torch.randn(tasks, query, *shape, dtype=torch.float64, generator=generator)
    sy = torch.randint(0, 3, (tasks, support), generator=generator)
    qy = torch.randint(0, 3, (tasks, query), generator=generator)
    return sx, sy, qx, qy


def make_model(kind):
    return mlp() if kind == "mlp" else conv_net(ways=3, channels=4)


def adapted_names(opt):
    names = [n for n, _ in opt.model.named_parameters()]
    return names if opt.adapt_names is None else [n for n in names if n in opt.adapt_names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_kind, learn", MODEL_RATES)
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_head_is_exact(backend, model_kind, learn, first_order, seed):
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
        adapt="head",
    )
    last = [n for n, _ in model.named_parameters()][-2:]
    assert opt.adapt_names == frozenset(last)
    if backend == "fused":  # the path that computes the body's features once
        assert (
            opt._backend_for(torch.device("cpu"), torch.float64).frozen_body_split(opt.adapt_names)
            is not None
        )
    perturb_rates(opt, g)
    data = batch(g, model_kind, tasks=2)
    expected = oracle_gradient(opt, data, adapted=adapted_names(opt), first_order=first_order)
    opt.meta_gradient(*data)
    assert relative_error(optimizer_gradient(opt), expected) < 1e-10
    # The body is meta-learned: its gradient is not zero.
    assert model[0].weight.grad.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("learn", [None, "per_step"])
def test_adapt_by_names_and_prefixes_is_exact(backend, learn, seed):
    g = torch.Generator().manual_seed(seed)
    model = conv_net(ways=3, channels=4)
    # "0" is a prefix (the first convolution's weight and bias), "5.bias" one name.
    opt = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=0.2,
        inner_steps=2,
        learn_inner_lr=learn,
        backend=backend,
        adapt=["0", "5.bias"],
    )
    assert opt.adapt_names == frozenset({"0.weight", "0.bias", "5.bias"})
    if learn is not None:
        assert {k for k in opt.inner_lr.tensors} == {"0-weight", "0-bias", "5-bias"}
    perturb_rates(opt, g)
    data = batch(g, "conv")
    expected = oracle_gradient(opt, data, adapted=adapted_names(opt), first_order=False)
    opt.meta_gradient(*data)
    assert relative_error(optimizer_gradient(opt), expected) < 1e-10


@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_anil_backends_agree_on_adapt_and_predict(model_kind, seed):
    g = torch.Generator().manual_seed(seed)
    model = make_model(model_kind)
    opts = [
        maml_ext.MetaOptimizer(model, None, inner_lr=0.3, inner_steps=2, backend=b, adapt="head")
        for b in BACKENDS
    ]
    sx, sy, qx, _ = batch(g, model_kind)
    adapted = [o.adapt(sx, sy, steps=4) for o in opts]
    for name, p in model.named_parameters():
        for a in adapted:
            if name in opts[0].adapt_names:
                assert not torch.equal(a[name][0], p.detach())
            else:  # the body keeps θ exactly
                assert torch.equal(a[name], p.detach().expand_as(a[name]))
        assert relative_error(adapted[1][name], adapted[0][name]) < 1e-10
    outputs = [o.predict(a, qx) for o, a in zip(opts, adapted)]
    assert relative_error(outputs[1], outputs[0]) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_until_switches_after_n_steps(backend, seed):
    g = torch.Generator().manual_seed(seed)
    model = make_model("conv")
    outer = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = maml_ext.MetaOptimizer(
        model,
        outer,
        inner_lr=0.3,
        inner_steps=2,
        backend=backend,
        first_order_until=2,
        learn_inner_lr="per_step",
    )
    names = [n for n, _ in model.named_parameters()]
    for iteration, first_order in enumerate([True, True, False]):
        assert opt.iteration == iteration
        data = batch(g, "conv")
        expected = oracle_gradient(opt, data, adapted=names, first_order=first_order)
        other = oracle_gradient(opt, data, adapted=names, first_order=not first_order)
        opt.step(*data)
        got = optimizer_gradient(opt)
        assert relative_error(got, expected) < 1e-10
        assert relative_error(got, other) > 1e-6  # the two orders differ on this draw
    assert opt.iteration == 3


def test_state_dict_round_trip_keeps_adapt_and_iteration(seed):
    model = make_model("mlp")
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = maml_ext.MetaOptimizer(
        model,
        outer,
        inner_lr=0.1,
        adapt="head",
        learn_inner_lr="per_parameter",
        first_order_until=5,
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.step(*batch(g, "mlp"))
    state = opt.state_dict()
    assert state["iteration"] == 3 and state["config"]["adapt"] == ["4.bias", "4.weight"]
    clone_model = make_model("mlp")
    clone = maml_ext.MetaOptimizer(
        clone_model,
        torch.optim.Adam(clone_model.parameters(), lr=1e-3),
        inner_lr=0.1,
        adapt="head",
        learn_inner_lr="per_parameter",
        first_order_until=5,
    )
    clone.load_state_dict(state)
    assert clone.iteration == 3
    for a, b in zip(opt.inner_lr.parameters(), clone.inner_lr.parameters()):
        assert torch.equal(a, b)
    other = maml_ext.MetaOptimizer(
        make_model("mlp"), None, inner_lr=0.1, adapt="all", learn_inner_lr="per_parameter"
    )
    before = [p.clone() for p in other.model.parameters()]
    with pytest.raises(ValueError, match="adapt"):
        other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, other.model.parameters()))
    assert other.iteration == 0


@pytest.mark.parametrize(
    "adapt, message",
    [
        ("body", "expected 'all', 'head' or a list"),
        ([], "non-empty list"),
        (["nope"], "'nope' matches no trainable parameter"),
        (["0.weight", 3], "expected parameter names or prefixes"),
    ],
)
def test_bad_adapt_is_a_clear_error_that_changes_nothing(adapt, message):
    model = make_model("mlp")
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        maml_ext.MetaOptimizer(model, outer, inner_lr=0.1, adapt=adapt, learn_inner_lr="scalar")
    assert len(outer.param_groups) == 1


def test_head_needs_a_linear_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()).double()
    with pytest.raises(ValueError, match="last nn.Linear"):
        maml_ext.MetaOptimizer(model, None, inner_lr=0.1, adapt="head", backend="reference")


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_bad_first_order_until(value):
    with pytest.raises(ValueError, match="first_order_until: expected a non-negative int"):
        maml_ext.MetaOptimizer(make_model("mlp"), None, inner_lr=0.1, first_order_until=value)


@pytest.mark.parametrize("model_kind", ["mlp", "conv", "conv_no_bias_head"])
@pytest.mark.parametrize("first_order", [False, True])
def test_frozen_body_op_equals_the_masked_sweep(model_kind, first_order, seed):
    """frozen_body_meta_step against meta_step with zero rates on the body: the same quantities
    (meta-gradient, rate gradient, losses), so the fast path is MAML's sweep exactly."""
    g = torch.Generator().manual_seed(seed)
    if model_kind == "conv_no_bias_head":
        model = conv_net(ways=3, channels=4)
        model[-1] = nn.Linear(model[-1].in_features, 3, bias=False).double()
    else:
        model = make_model(model_kind)
    program = maml_ext.program.compile_program(model)
    names = [n for n, _ in model.named_parameters()]
    head = frozenset(n for n in names if n.startswith(names[-1].rpartition(".")[0] + "."))
    split = maml_ext.backend.frozen_body_split(program, head)
    assert split is not None
    theta = program.flatten(dict(model.named_parameters())).detach()
    steps = 3
    rates = 0.1 + 0.3 * torch.rand(steps, theta.numel(), dtype=torch.float64, generator=g)
    rates[:, : split.body_params] = 0
    sx, sy, qx, qy = batch(g, "mlp" if model_kind == "mlp" else "conv")
    code = maml_ext.program.loss_code("cross_entropy")
    want = torch.ops.maml_ext.meta_step(
        theta,
        rates,
        sx,
        sy,
        qx,
        qy,
        program.ints_list,
        program.floats_list,
        code,
        first_order,
        True,
    )
    got = torch.ops.maml_ext.frozen_body_meta_step(
        theta,
        rates[:, split.body_params :].contiguous(),
        sx,
        sy,
        qx,
        qy,
        split.body_ints,
        split.body_floats,
        split.head_ints,
        split.head_floats,
        code,
        first_order,
        True,
    )
    for index in (0, 1, 2, 3):  # query loss, accuracy, support loss, meta-gradient
        assert relative_error(got[index], want[index]) < 1e-10
    assert relative_error(got[4], want[4][:, split.body_params :]) < 1e-10
    assert relative_error(got[6], want[5]) < 1e-10


def test_frozen_body_split_needs_a_frozen_prefix_ending_before_a_linear_layer():
    model = conv_net(ways=3, channels=4)
    program = maml_ext.program.compile_program(model)
    split = maml_ext.backend.frozen_body_split
    assert split(program, frozenset({"9.weight", "9.bias"})) is not None
    assert split(program, frozenset({"9.weight"})) is None  # the head's bias would be frozen
    assert split(program, frozenset({"0.weight", "0.bias"})) is None  # not a suffix
    assert split(program, frozenset({"5.weight", "5.bias", "9.weight", "9.bias"})) is None

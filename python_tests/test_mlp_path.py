"""The CPU meta-step path for small MLPs (csrc/cpu/mlp_meta_step.cpp) against an autograd oracle:
random Linear/ReLU stacks, per-element rates and their gradients, first and second order, in both
compiled versions of its task kernels (AVX2 + FMA and baseline x86-64); which programs it takes;
its errors."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from maml_test_utils import (
    WEIGHT_SEEDS,
    cpu_kernels,
    draw_loss_and_outputs,
    random_batch,
    relative_error,
    seeded_weights,
    sinusoid_mlp,
)
from torch import nn
from torch.func import functional_call

import maml_ext
from maml_ext.losses import resolve_loss
from maml_ext.program import LOSS_CODES, compile_program

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mlps(draw):
    """(model, input width, loss, output width): Linear layers with ReLUs anywhere, even first."""
    width = draw(st.integers(1, 7))
    features, layers = width, []
    if draw(st.booleans()):
        layers.append(nn.ReLU())
    for _ in range(draw(st.integers(1, 4))):
        # Up to 45 wide: the kernels' 5-vector blocks (40 floats, 20 doubles), their remainders
        # of 1-4 vectors and single columns, and the 8 × 8 / 4 × 4 transpose blocks and edges.
        out = draw(st.integers(1, 45))
        layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.ReLU())
        width = out
    loss, outputs = draw_loss_and_outputs(draw)
    layers.append(nn.Linear(width, outputs, bias=draw(st.booleans())))
    return seeded_weights(nn.Sequential(*layers), draw(WEIGHT_SEEDS)), features, loss, outputs


def assume_converging(query_loss, meta_grad):
    """Discards a draw whose float64 adaptation ran off (a few steps of 0.05-0.15 on a random stack
    can, the Gaussian NLL's exp(-2 log-std) curvature most easily): with no finite, moderate truth,
    neither exactness nor float32's closeness says anything there."""
    assume(bool(torch.isfinite(meta_grad).all()) and float(query_loss.abs().max()) < 1e4)


def batch(generator, tasks, support, query, features, loss, outputs, dtype):
    return random_batch(generator, tasks, support, query, (features,), loss, outputs, dtype)


def oracle(model, program, theta, rates, data, loss, first_order):
    """Per-task autograd MAML on the flat θ and per-element rates [K, P]: (query loss per task,
    support loss per task, meta-gradient [P], rate gradient [K, P], query accuracy per task)."""
    theta = theta.detach().requires_grad_()
    rates = rates.detach().requires_grad_()
    fn = resolve_loss(loss).fn
    sx, sy, qx, qy = data
    query_losses, support_losses, accuracies = [], [], []
    for t in range(sx.shape[0]):
        weights = theta
        for k in range(rates.shape[0]):
            support = fn(functional_call(model, program.unflatten(weights), (sx[t],)), sy[t])
            if k == 0:
                support_losses.append(support.detach())
            (g,) = torch.autograd.grad(support, weights, create_graph=not first_order)
            weights = weights - rates[k] * g
        outputs = functional_call(model, program.unflatten(weights), (qx[t],))
        query_losses.append(fn(outputs, qy[t]))
        if loss == "cross_entropy":
            accuracies.append((outputs.argmax(-1) == qy[t]).double().mean())
    per_task = torch.stack(query_losses)
    meta_grad, rate_grad = torch.autograd.grad(per_task.mean(), (theta, rates))
    accuracy = torch.stack(accuracies) if accuracies else None
    return per_task.detach(), torch.stack(support_losses), meta_grad, rate_grad, accuracy


def run_mlp_path(program, theta, rates, data, loss, first_order, op="_mlp_meta_step"):
    namespace = torch.ops.maml_ext_testing if op.startswith("_") else torch.ops.maml_ext
    return getattr(namespace, op)(
        theta,
        rates,
        *data,
        program.ints_list,
        program.floats_list,
        LOSS_CODES[loss],
        first_order,
        True,
    )[:5]


@pytest.mark.parametrize("isa", ["native", "baseline"])
@settings(max_examples=30, **COMMON)
@given(
    stack=mlps(),
    tasks=st.integers(1, 8),
    steps=st.integers(1, 5),
    first_order=st.booleans(),
    support=st.integers(1, 6),
    query=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_mlp_path_equals_autograd_float64(
    isa, stack, tasks, steps, first_order, support, query, seed
):
    model, features, loss, outputs = stack
    generator = torch.Generator().manual_seed(seed)
    model = model.double()
    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()})
    # Different, positive rates per element and step, so every entry of the rate gradient matters.
    rates = 0.05 + 0.1 * torch.rand(
        steps, program.num_params, dtype=torch.float64, generator=generator
    )
    data = batch(generator, tasks, support, query, features, loss, outputs, torch.float64)

    expected_query, expected_support, expected_meta, expected_rates, expected_accuracy = oracle(
        model, program, theta, rates, data, loss, first_order
    )
    assume_converging(expected_query, expected_meta)
    with cpu_kernels(isa):
        query_loss, accuracy, support_loss, meta_grad, rate_grad = run_mlp_path(
            program, theta, rates, data, loss, first_order
        )
    assert relative_error(query_loss, expected_query) < 1e-12
    assert relative_error(support_loss, expected_support) < 1e-12
    assert relative_error(meta_grad, expected_meta) < 1e-10
    assert relative_error(rate_grad, expected_rates) < 1e-10
    if loss == "cross_entropy":
        assert torch.allclose(accuracy, expected_accuracy, rtol=0, atol=1e-12)
    else:
        assert accuracy.numel() == 0


@pytest.mark.parametrize("isa", ["native", "baseline"])
@settings(max_examples=10, **COMMON)
@given(
    stack=mlps(), tasks=st.integers(1, 8), steps=st.integers(1, 3), seed=st.integers(0, 2**31 - 1)
)
def test_mlp_path_float32_close_to_float64(isa, stack, tasks, steps, seed):
    model, features, loss, outputs = stack
    generator = torch.Generator().manual_seed(seed)
    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()}).double()
    rates = torch.full((steps, program.num_params), 0.1, dtype=torch.float64)
    data = batch(generator, tasks, 5, 5, features, loss, outputs, torch.float64)
    exact = run_mlp_path(program, theta, rates, data, loss, False)
    assume_converging(exact[0], exact[3])
    data32 = [d.float() if d.is_floating_point() else d for d in data]
    with cpu_kernels(isa):
        single = run_mlp_path(program, theta.float(), rates.float(), data32, loss, False)
    # float32 against float64 truth, measured as the general path's tests measure it.
    assert relative_error(single[3], exact[3]) < 1e-4


def test_meta_step_takes_the_mlp_path_for_the_sinusoid_net():
    model = sinusoid_mlp()
    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()})
    rates = torch.full((2, program.num_params), 0.01, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    data = batch(generator, 5, 10, 10, 1, "mse", 1, torch.float64)
    routed = run_mlp_path(program, theta, rates, data, "mse", False, op="meta_step")
    direct = run_mlp_path(program, theta, rates, data, "mse", False)
    for a, b in zip(routed, direct):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "model, features",
    [
        (
            nn.Sequential(
                nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 2)
            ),
            3,
        ),
        (
            nn.Sequential(nn.Linear(3, 129), nn.ReLU(), nn.Linear(129, 2)),
            3,
        ),  # wider than the path takes
    ],
)
def test_other_programs_take_the_general_path(model, features):
    model = model.double()
    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()})
    rates = torch.full((1, program.num_params), 0.1, dtype=torch.float64)
    data = batch(
        torch.Generator().manual_seed(3), 2, 4, 4, features, "cross_entropy", 2, torch.float64
    )
    with pytest.raises(ValueError, match="argument 'program'.*MLP path"):
        run_mlp_path(program, theta, rates, data, "cross_entropy", False)
    general = run_mlp_path(program, theta, rates, data, "cross_entropy", False, op="meta_step")
    expected = oracle(model, program, theta, rates, data, "cross_entropy", False)
    assert relative_error(general[3], expected[2]) < 1e-10


@pytest.mark.parametrize("name", ["support_y", "query_y"])
def test_out_of_range_class_is_named(name):
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()})
    rates = torch.full((1, program.num_params), 0.1, dtype=torch.float64)
    sx, sy, qx, qy = batch(
        torch.Generator().manual_seed(5), 2, 4, 4, 2, "cross_entropy", 3, torch.float64
    )
    if name == "support_y":
        sy[1, 2] = 3
    else:
        qy[0, 0] = -1
    with pytest.raises(ValueError, match=f"argument '{name}'.*class indices in \\[0, 3\\)"):
        run_mlp_path(program, theta, rates, (sx, sy, qx, qy), "cross_entropy", False)

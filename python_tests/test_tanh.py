"""The Tanh layer (csrc/layers/tanh.cpp) against the reference backend and torch.func: fused
meta-gradients of random stacks with Tanh (second and first order, several inner steps, every kind
of learned rate) to 1e-10 in float64, Hessian-vector products against forward-over-reverse
autodiff, and the CPU MLP path declining Tanh programs to the general path."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from maml_test_utils import (
    COMMON,
    DEVICES,
    LEARN_KINDS,
    WEIGHT_SEEDS,
    assert_fused_equals_reference,
    assert_loss_hvp_equals_forward_over_reverse,
    random_batch,
    relative_error,
    seeded_weights,
)
from torch import nn
from torch.func import functional_call

import maml_ext
from maml_ext.program import compile_program, loss_code

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)


@st.composite
def tanh_stacks(draw):
    """(model, per-sample input shape, loss, output size): random layers, each block ending in Tanh
    (other activations and batch norm mixed in), features or images."""
    if draw(st.booleans()):
        features = draw(st.integers(1, 5))
        shape, layers, width = (features,), [], features
        for _ in range(draw(st.integers(1, 3))):
            out = draw(st.integers(2, 12))
            layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm1d(out, track_running_stats=False))
            layers.append(nn.Tanh())
            if draw(st.booleans()):
                layers.append(draw(st.sampled_from([nn.Tanh, nn.ReLU]))())
            width = out
    else:
        channels, size = draw(st.integers(1, 3)), draw(st.integers(4, 7))
        shape, layers = (channels, size, size), []
        for _ in range(draw(st.integers(1, 2))):
            out = draw(st.integers(2, 4))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=draw(st.booleans())))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out, track_running_stats=False))
            layers.append(nn.Tanh())
            if size >= 2 and draw(st.booleans()):
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        layers.append(nn.Flatten())
        width = channels * size * size
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    outputs = draw(st.integers(2, 4)) if loss == "cross_entropy" else draw(st.integers(1, 3))
    model = nn.Sequential(*layers, nn.Linear(width, outputs))
    return seeded_weights(model, draw(WEIGHT_SEEDS)).double(), shape, loss, outputs


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, **COMMON)
@given(
    stack=tanh_stacks(),
    tasks=st.integers(1, 6),
    steps=st.integers(1, 4),
    first_order=st.booleans(),
    learn=st.sampled_from(LEARN_KINDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_meta_gradient_equals_reference_float64(
    device, stack, tasks, steps, first_order, learn, seed
):
    assert_fused_equals_reference(stack, device, tasks, steps, first_order, learn, seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, **COMMON)
@given(stack=tanh_stacks(), tasks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_loss_hvp_equals_jvp_of_vjp(device, stack, tasks, seed):
    assert_loss_hvp_equals_forward_over_reverse(stack, device, tasks, seed)


def test_tanh_policy_net_takes_the_general_path_and_matches_the_reference(seed):
    """The CPU MLP path runs Linear/ReLU programs only: it declines Tanh (its test hook says so),
    and meta_step then runs the general path, exact against the reference."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)
        ).double()
    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()})
    generator = torch.Generator().manual_seed(seed)
    batch = random_batch(generator, 4, 6, 5, (3,), "mse", 2, torch.float64)
    rates = 0.05 + 0.05 * torch.rand(
        3, program.num_params, dtype=torch.float64, generator=generator
    )
    args = (program.ints_list, program.floats_list, loss_code("mse"), False, True)
    with pytest.raises(ValueError, match="argument 'program'.*MLP path"):
        torch.ops.maml_ext_testing._mlp_meta_step(theta, rates, *batch, *args)
    query_loss, _, _, meta_grad, rate_grad, mean_loss = torch.ops.maml_ext.meta_step(
        theta, rates, *batch, *args
    )

    # The reference: the inner loop through autograd, per task.
    theta_ref = theta.clone().requires_grad_()
    rates_ref = rates.clone().requires_grad_()
    sx, sy, qx, qy = batch
    losses = []
    for t in range(sx.shape[0]):
        weights = theta_ref
        for k in range(rates.shape[0]):
            outputs = functional_call(model, program.unflatten(weights), (sx[t],))
            (g,) = torch.autograd.grad(F.mse_loss(outputs, sy[t]), weights, create_graph=True)
            weights = weights - rates_ref[k] * g
        losses.append(
            F.mse_loss(functional_call(model, program.unflatten(weights), (qx[t],)), qy[t])
        )
    expected_loss = torch.stack(losses)
    expected_grad, expected_rate_grad = torch.autograd.grad(
        expected_loss.mean(), (theta_ref, rates_ref)
    )
    assert relative_error(query_loss, expected_loss.detach()) <= 1e-12, seed
    assert relative_error(mean_loss, expected_loss.mean().detach()) <= 1e-12, seed
    assert relative_error(meta_grad, expected_grad) <= 1e-10, seed
    assert relative_error(rate_grad, expected_rate_grad) <= 1e-10, seed


def test_tanh_compiles_to_its_record():
    program = compile_program(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    tanh = maml_ext.program.RECORDS_BY_NAME["tanh"]
    assert [kind for kind, _ in maml_ext.program.read_records(program.ints)] == [
        "linear",
        "tanh",
        "linear",
    ]
    assert tanh.code in program.ints and tanh.int_fields == ()

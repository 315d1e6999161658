"""The LeakyReLU layer (csrc/layers/leaky_relu.cpp) against the reference backend and torch.func:
fused meta-gradients of random stacks with LeakyReLU of random slopes (second and first order,
several inner steps, every kind of learned rate) to 1e-10 in float64, Hessian-vector products
against forward-over-reverse autodiff, and the compiler writing the slope into the record."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from maml_test_utils import (
    COMMON,
    DEVICES,
    LEARN_KINDS,
    WEIGHT_SEEDS,
    assert_fused_equals_reference,
    assert_loss_hvp_equals_forward_over_reverse,
    relative_error,
    seeded_weights,
)
from torch import nn

import maml_ext
from maml_ext.program import compile_program, read_records

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

# Negative and zero slopes as well as the usual ones: the layer keeps its input, not its output,
# for a negative slope.
SLOPES = st.sampled_from([0.01, 0.1, 0.2, 0.0, -0.3, 1.5])


@st.composite
def leaky_stacks(draw):
    """(model, per-sample input shape, loss, output size): random layers, each block ending in
    LeakyReLU of a random slope (batch norm mixed in), features or images."""
    if draw(st.booleans()):
        features = draw(st.integers(1, 5))
        shape, layers, width = (features,), [], features
        for _ in range(draw(st.integers(1, 3))):
            out = draw(st.integers(2, 12))
            layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm1d(out, track_running_stats=False))
            layers.append(nn.LeakyReLU(draw(SLOPES)))
            width = out
    else:
        channels, size = draw(st.integers(1, 3)), draw(st.integers(4, 7))
        shape, layers = (channels, size, size), []
        for _ in range(draw(st.integers(1, 2))):
            out = draw(st.integers(2, 4))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=draw(st.booleans())))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out, track_running_stats=False))
            layers.append(nn.LeakyReLU(draw(SLOPES)))
            if draw(st.booleans()):
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
    stack=leaky_stacks(),
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
@given(stack=leaky_stacks(), tasks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_loss_hvp_equals_jvp_of_vjp(device, stack, tasks, seed):
    assert_loss_hvp_equals_forward_over_reverse(stack, device, tasks, seed)


def test_leaky_relu_compiles_to_its_record_with_the_slope():
    model = nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.25), nn.Linear(3, 3), nn.LeakyReLU())
    program = compile_program(model)
    assert [kind for kind, _ in read_records(program.ints)] == [
        "linear",
        "leaky_relu",
        "linear",
        "leaky_relu",
    ]
    assert program.floats == (0.25, 0.01)  # nn.LeakyReLU's default slope is 0.01


def test_predict_matches_the_model(seed):
    """Forward only (Program::forward): the fused outputs equal the module's own."""
    model = nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(-0.2), nn.Linear(8, 2)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    opt = maml_ext.MetaOptimizer(model, None, inner_lr=0.1, backend="fused")
    adapted = {n: p.detach().expand(2, *p.shape).clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = torch.stack([model(x[t]) for t in range(2)])
    assert relative_error(opt.predict(adapted, x), expected) <= 1e-14, seed

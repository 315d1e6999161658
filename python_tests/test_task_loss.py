"""maml_ext::task_loss: the per-task losses of kernels/loss_math.h (the one definition the general
path and the CPU MLP path share) against PyTorch's losses, their gradients by autograd and the
gradients' tangents by torch.func (jvp of grad), in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from maml_test_utils import DEVICES, relative_error
from torch.func import grad, jacfwd, jvp

import maml_ext
from maml_ext.losses import gaussian_nll
from maml_ext.program import loss_code

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

SHAPES = {
    "cross_entropy": [(3, 7, 5), (1, 1, 2), (4, 75, 20)],
    "mse": [(3, 7, 1), (2, 5), (4, 3, 2, 2)],
    # [T, N, 2A]: means then log-stds; targets values then weights (normal: of either sign, as
    # advantages are)
    "gaussian_nll": [(3, 7, 4), (1, 1, 2), (4, 50, 6)],
}
CASES = [(loss, shape) for loss, shapes in SHAPES.items() for shape in shapes]


def torch_task_loss(loss, z, y):
    """One task's mean loss as PyTorch computes it."""
    if loss == "cross_entropy":
        return F.cross_entropy(z, y)
    if loss == "gaussian_nll":
        return gaussian_nll(z, y)
    return ((z - y) ** 2).mean()  # jvp through F.mse_loss's backward fails here


def absolute_terms(loss, z, y):
    """The loss with every term and summand taken absolutely: the scale float32 rounding works at
    (the weighted Gaussian NLL's terms have either sign and can cancel to near 0)."""
    if loss != "gaussian_nll":
        return abs(torch_task_loss(loss, z, y))
    mean, log_std = z.chunk(2, -1)
    value, weight = y.chunk(2, -1)
    standardised = (value - mean) * torch.exp(-log_std)
    pieces = 0.5 * standardised**2 + log_std.abs() + 0.5 * math.log(2 * math.pi)
    return (weight.abs() * pieces).sum() / z.shape[0]


def tangent_scale(task_loss, z, rz):
    """‖|H| |R{z}|‖ (H the loss's Hessian in z): the size of the products whose sum is the tangent
    H R{z}, the scale float64 rounding works at (the tangent itself can cancel to near 0)."""
    n = z.numel()
    hessian = jacfwd(grad(task_loss))(z).reshape(n, n)
    return float((hessian.abs() @ rz.reshape(n).abs()).norm())


def random_case(loss, shape, generator, dtype=torch.float64):
    z = torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    rz = torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    if loss == "cross_entropy":
        y = torch.randint(0, shape[-1], shape[:2], generator=generator)
    else:
        y = torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    return z, rz, y


def call(z, rz, y, loss):
    return torch.ops.maml_ext.task_loss(z, rz, y, loss_code(loss))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss, shape", CASES)
def test_matches_torch_losses_gradients_and_tangents(device, loss, shape, seed):
    z, rz, y = random_case(loss, shape, torch.Generator().manual_seed(seed))
    values, accuracy, grads, tangents = (
        t.cpu() for t in call(z.to(device), rz.to(device), y.to(device), loss)
    )
    assert values.shape == (shape[0],) and grads.shape == z.shape and tangents.shape == z.shape
    for t in range(shape[0]):

        def task_loss(zt, t=t):
            return torch_task_loss(loss, zt, y[t])

        expected_grad, expected_tangent = jvp(grad(task_loss), (z[t],), (rz[t],))
        # the value against its terms' scale: a signed-weight Gaussian NLL can cancel to near 0
        error = abs(values[t] - task_loss(z[t])).item()
        assert error <= 1e-13 * absolute_terms(loss, z[t], y[t]).item(), seed
        assert relative_error(grads[t], expected_grad) <= 1e-13, seed
        error = float((tangents[t] - expected_tangent).norm())
        assert error <= 1e-13 * tangent_scale(task_loss, z[t], rz[t]), seed
    if loss == "cross_entropy":
        expected_accuracy = (z.argmax(-1) == y).double().mean(1)
        assert torch.equal(accuracy, expected_accuracy), seed
    else:
        assert accuracy.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss, shape", CASES)
def test_without_tangent_gives_the_same_loss_and_gradient(device, loss, shape, seed):
    z, rz, y = (t.to(device) for t in random_case(loss, shape, torch.Generator().manual_seed(seed)))
    with_tangent = call(z, rz, y, loss)
    without = call(z, None, y, loss)
    assert without[3].shape == (0,)
    for a, b in zip(with_tangent[:3], without[:3]):
        assert torch.equal(a, b), seed


@pytest.mark.parametrize("device", DEVICES)
def test_float32_is_as_close_to_float64_as_torch_is(device, seed):
    # Per task, the float32 loss and gradient stay within a small multiple of PyTorch's own float32
    # error against the float64 values.
    for loss, shape in CASES:
        z, rz, y = random_case(loss, shape, torch.Generator().manual_seed(seed))
        exact = call(z, rz, y, loss)
        z32, rz32 = z.float(), rz.float()
        y32 = y if loss == "cross_entropy" else y.float()
        ours = call(z32.to(device), rz32.to(device), y32.to(device), loss)
        for t in range(shape[0]):
            theirs = torch_task_loss(loss, z32[t], y32[t]).double()
            magnitude = absolute_terms(loss, z[t], y[t]).item()
            budget = max(4 * abs(theirs - exact[0][t]).item(), 1e-6 * magnitude)
            assert abs(ours[0][t].cpu().double() - exact[0][t]).item() <= budget, (loss, seed)
        assert relative_error(ours[2].cpu().double(), exact[2]) <= 1e-5, (loss, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_loss_of_confident_rows_keeps_its_relative_precision(device, seed):
    # Right answers with large logits: the loss is small (log1p of the others' softmax mass) while
    # the logits are ~100, so the float32 loss must not be rounded at the logits' magnitude
    # (an ulp of 100 is ~100x the loss's own ulp here).
    generator = torch.Generator().manual_seed(seed)
    tasks, rows, classes = 4, 6, 5
    z = 100 + 0.5 * torch.randn(tasks, rows, classes, dtype=torch.float64, generator=generator)
    y = torch.randint(0, classes, (tasks, rows), generator=generator)
    z.scatter_add_(2, y.unsqueeze(2), torch.full((tasks, rows, 1), 5.0, dtype=torch.float64))
    z = z.float().double()  # the float32 inputs, exactly, so only the arithmetic differs
    exact = call(z, None, y, "cross_entropy")[0]
    ours = call(z.float().to(device), None, y.to(device), "cross_entropy")[0].cpu().double()
    assert (exact < 0.2).all(), seed  # the case is the confident one
    assert relative_error(ours, exact) <= 1e-6, seed


@pytest.mark.parametrize("device", DEVICES)
def test_class_index_out_of_range_makes_only_its_task_nan(device, seed):
    z, rz, y = random_case("cross_entropy", (3, 4, 5), torch.Generator().manual_seed(seed))
    y[1, 2] = 5
    values, _, grads, tangents = (
        t.cpu() for t in call(z.to(device), rz.to(device), y.to(device), "cross_entropy")
    )
    assert torch.isnan(values[1]) and torch.isnan(grads[1, 2]).all()
    assert torch.isnan(tangents[1, 2]).all()
    others = torch.tensor([True, False, True])
    assert torch.isfinite(values[others]).all() and torch.isfinite(grads[others]).all()


@pytest.mark.parametrize(
    "loss, change, argument",
    [
        ("cross_entropy", lambda z, rz, y: (z, rz, y.double()), "'y'"),
        ("cross_entropy", lambda z, rz, y: (z.flatten(1), None, y), "'z'"),
        ("cross_entropy", lambda z, rz, y: (z, rz, y[:, :2]), "'y'"),
        ("mse", lambda z, rz, y: (z, rz, y[:, :2]), "'y'"),
        ("mse", lambda z, rz, y: (z, rz[:, :2], y), "'z_tangent'"),
        ("mse", lambda z, rz, y: (z.int(), None, y.int()), "'z'"),
    ],
)
def test_bad_arguments_are_named(loss, change, argument, seed):
    z, rz, y = random_case(loss, (2, 3, 4), torch.Generator().manual_seed(seed))
    with pytest.raises(ValueError, match=argument):
        call(*change(z, rz, y), loss)


def test_unknown_loss_code_is_named(seed):
    z, rz, y = random_case("mse", (2, 3, 4), torch.Generator().manual_seed(seed))
    with pytest.raises(ValueError, match="'loss'"):
        torch.ops.maml_ext.task_loss(z, rz, y, 99)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_opcheck(loss, seed):
    z, rz, y = random_case(loss, (3, 4, 5), torch.Generator().manual_seed(seed))
    torch.library.opcheck(
        torch.ops.maml_ext.task_loss.default,
        (z, rz, y, loss_code(loss)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )

"""maml_ext::task_conv2d / task_conv2d_backward: the CPU op against per-task F.conv2d with
torch.func jvp / vjp; the CUDA implementation's host side and index math (run on the CPU by the
emulation hook) against the CPU op; the CUDA launch plan's coverage; the CUDA op against the CPU
op where a GPU is visible."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from maml_test_utils import (
    COMMON,
    PASS,
    backward_args,
    conv_cases,
    forward_args,
    make_tensors,
    output_size,
    relative_error,
    standard_case,
)
from torch.func import jvp, vjp

import maml_ext

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
FORWARD_NAMES = ("y", "y_tangent")
BACKWARD_NAMES = (
    "grad_x",
    "grad_x_tangent",
    "grad_weight",
    "grad_weight_tangent",
    "grad_bias",
    "grad_bias_tangent",
)


def per_task_conv(case):
    def conv(x, weight, bias):
        return torch.stack(
            [
                F.conv2d(x[:, k], weight[k], bias[k], case["stride"], case["padding"])
                for k in range(weight.shape[0])
            ],
            1,
        )

    return conv


def reference(case, t):
    """(forward results, backward results) by torch.func, in the ops' order; None where the op
    returns an empty tensor."""
    conv = per_task_conv(case)
    x, weight, gy = (
        t["x"],
        t["weight"].contiguous(),
        t["grad_y"],
    )  # jvp cannot take expanded weights
    bias = t["bias"].contiguous() if case["bias"] else torch.zeros(weight.shape[:2], dtype=x.dtype)

    def zero_if_none(a, like):
        return torch.zeros_like(like) if a is None else a

    rx = zero_if_none(t["x_tangent"], x)
    v = zero_if_none(t["weight_tangent"], weight)
    vb = zero_if_none(t["bias_tangent"], bias)
    rgy = zero_if_none(t["grad_y_tangent"], gy)
    y, ry = jvp(conv, (x, weight, bias), (rx, v, vb))
    forward_tangent = case["x_tangent"] or case["weight_tangent"] or case["bias_tangent"]
    forward = (y, ry if forward_tangent else None)

    def gradients(x, weight, bias, gy):
        return vjp(conv, x, weight, bias)[1](gy)

    (gx, gw, gb), (rgx, rgw, rgb) = jvp(gradients, (x, weight, bias, gy), (rx, v, vb, rgy))
    tangent = case["x_tangent"] or case["weight_tangent"] or case["grad_y_tangent"]
    keep_x, keep_b = case["need_input_grad"], case["bias"]
    backward = (
        gx if keep_x else None,
        rgx if keep_x and tangent else None,
        gw,
        rgw if tangent else None,
        gb if keep_b else None,
        rgb if keep_b and tangent else None,
    )
    return forward, backward


def assert_results_match(actual, expected, names, tolerance):
    for name, a, e in zip(names, actual, expected):
        if e is None:
            assert a.numel() == 0, f"{name}: expected an empty result, got shape {tuple(a.shape)}"
            continue
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype and a.device == e.device, name
        error = relative_error(a.cpu().double(), e.cpu().double())
        assert error <= tolerance, f"{name}: relative error {error:.3g}"


def assert_layer_layout(a, name):
    """Activations come back as the grouped view, channels-last (memory N, H, W, T, C)."""
    assert a.permute(0, 3, 4, 1, 2).is_contiguous(), f"{name}: strides {a.stride()}"


@settings(max_examples=80, **COMMON)
@given(case=conv_cases())
def test_cpu_op_matches_per_task_conv_and_torch_func(case):
    t = make_tensors(case)
    expected_forward, expected_backward = reference(case, t)
    forward = torch.ops.maml_ext.task_conv2d(*forward_args(case, t))
    assert_results_match(forward, expected_forward, FORWARD_NAMES, 1e-10)
    backward = torch.ops.maml_ext.task_conv2d_backward(*backward_args(case, t))
    assert_results_match(backward, expected_backward, BACKWARD_NAMES, 1e-10)
    for name, a in list(zip(FORWARD_NAMES, forward)) + list(zip(BACKWARD_NAMES[:2], backward)):
        if a.numel():
            assert_layer_layout(a, name)


@settings(max_examples=80, **COMMON)
@given(
    case=conv_cases(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    multiprocessors=st.integers(1, 264),
)
def test_emulated_cuda_implementation_matches_cpu_op(case, dtype, multiprocessors):
    """The CUDA op's host side and index math, walked tile by tile on the CPU."""
    t = make_tensors(case, dtype)
    ops = torch.ops.maml_ext
    expected = ops.task_conv2d(*forward_args(case, t))
    actual = torch.ops.maml_ext_testing._task_conv2d_emulated(
        *forward_args(case, t), multiprocessors
    )
    assert_results_match(
        actual, [e if e.numel() else None for e in expected], FORWARD_NAMES, TOLERANCE[dtype]
    )
    expected = ops.task_conv2d_backward(*backward_args(case, t))
    actual = torch.ops.maml_ext_testing._task_conv2d_backward_emulated(
        *backward_args(case, t), multiprocessors
    )
    assert_results_match(
        actual, [e if e.numel() else None for e in expected], BACKWARD_NAMES, TOLERANCE[dtype]
    )
    for name, a in list(zip(FORWARD_NAMES, actual)) + list(zip(BACKWARD_NAMES[:2], actual)):
        if a.numel():
            assert_layer_layout(a, name)


@pytest.mark.parametrize(
    "case",
    [
        standard_case(2, 2, 64, 28),  # Omniglot, hidden layers
        standard_case(2, 3, 64, 28, in_channels=1),  # Omniglot, first layer
        standard_case(1, 1, 32, 84, in_channels=3),  # miniImageNet, first layer
        standard_case(1, 2, 32, 42),  # miniImageNet, second layer
    ],
    ids=["omniglot", "omniglot-first", "miniimagenet-first", "miniimagenet-second"],
)
def test_emulated_cuda_implementation_on_standard_shapes(case, seed):
    case = dict(case, seed=seed)
    t = make_tensors(case)
    ops = torch.ops.maml_ext
    multiprocessors = 132  # an H100 / H200
    shape = [
        case["batch"],
        case["tasks"],
        case["in_channels"],
        case["height"],
        case["width"],
        case["out_channels"],
        3,
        3,
        1,
        1,
        1,
        1,
        multiprocessors,
    ]
    splits = torch.ops.maml_ext_testing._task_conv2d_launch_config([PASS["weight_grad"]] + shape)[
        13
    ]
    assert splits > 1  # the split reduction and its partial sums are exercised
    expected = ops.task_conv2d(*forward_args(case, t))
    assert_results_match(
        torch.ops.maml_ext_testing._task_conv2d_emulated(*forward_args(case, t), multiprocessors),
        expected,
        FORWARD_NAMES,
        1e-10,
    )
    expected = ops.task_conv2d_backward(*backward_args(case, t))
    assert_results_match(
        torch.ops.maml_ext_testing._task_conv2d_backward_emulated(
            *backward_args(case, t), multiprocessors
        ),
        expected,
        BACKWARD_NAMES,
        1e-10,
    )


def gemm_extents(pass_name, N, T, C, H, W, O, kh, kw, sh, sw, ph, pw):
    """(rows, columns, reduction) of one pass's implicit product, from the convolution's shape."""
    Ho, Wo = output_size(H, kh, sh, ph), output_size(W, kw, sw, pw)
    return {
        "forward": (N * Ho * Wo, O, kh * kw * C),
        "backward_data": (N * H * W, C, kh * kw * O),
        "weight_grad": (O, kh * kw * C, N * Ho * Wo),
    }[pass_name]


def check_launch_plan(pass_name, shape, multiprocessors):
    args = [PASS[pass_name]] + list(shape) + [multiprocessors]
    (
        rows,
        cols,
        reduction,
        tasks,
        thread_m,
        thread_n,
        threads_m,
        threads_n,
        block_m,
        block_n,
        block_k,
        grid_m,
        grid_n,
        splits,
        split_length,
    ) = torch.ops.maml_ext_testing._task_conv2d_launch_config(args)
    assert (rows, cols, reduction) == gemm_extents(pass_name, *shape)
    assert tasks == shape[1]
    assert block_m == thread_m * threads_m and block_n == thread_n * threads_n
    assert threads_m * threads_n <= 1024 and thread_m in (1, 2, 4) and thread_n in (1, 2, 4)
    assert grid_n <= 65535 and tasks * splits <= 65535
    assert split_length % block_k == 0
    if pass_name != "weight_grad":
        assert splits == 1
    writes, reads = torch.ops.maml_ext_testing._task_conv2d_tile_coverage(args)
    assert writes.shape == (tasks, splits, rows, cols)
    assert bool((writes == 1).all()), "some output elements are written never or twice"
    assert reads.shape == (reduction,)
    assert bool((reads == 1).all()), "the splits' k-tiles do not partition the reduction"


@settings(max_examples=60, **COMMON)
@given(
    case=conv_cases(max_side=40),
    pass_name=st.sampled_from(sorted(PASS)),
    wide=st.integers(1, 80),
    multiprocessors=st.integers(1, 264),
)
def test_launch_plan_covers_every_output_once(case, pass_name, wide, multiprocessors):
    """Random shapes, with channel counts up to 80 so every per-thread tile size occurs."""
    shape = (
        case["batch"],
        case["tasks"],
        case["in_channels"],
        case["height"],
        case["width"],
        wide,
        *case["kernel"],
        *case["stride"],
        *case["padding"],
    )
    check_launch_plan(pass_name, shape, multiprocessors)


@pytest.mark.parametrize("pass_name", sorted(PASS))
@pytest.mark.parametrize(
    "shape",
    [
        (5, 32, 64, 28, 28, 64, 3, 3, 1, 1, 1, 1),  # omniglot-5w1s support pass, hidden layers
        (5, 32, 1, 28, 28, 64, 3, 3, 1, 1, 1, 1),  # its first layer
        (20, 16, 64, 14, 14, 64, 3, 3, 1, 1, 1, 1),  # omniglot-20w1s, second layer
        (5, 4, 3, 84, 84, 32, 3, 3, 1, 1, 1, 1),  # miniimagenet-5w1s, first layer
        (5, 4, 32, 42, 42, 32, 3, 3, 1, 1, 1, 1),  # its second layer
    ],
)
def test_launch_plan_covers_standard_shapes(pass_name, shape):
    check_launch_plan(pass_name, shape, 132)


def test_bad_arguments_are_named():
    ops = torch.ops.maml_ext
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 6, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'weight'.*C = 4"):
        ops.task_conv2d(x, None, w[:, :, :2], None, None, None, [1, 1], [1, 1])
    with pytest.raises(ValueError, match="'weight'.*T = 3"):
        ops.task_conv2d(x, None, w[:2], None, None, None, [1, 1], [1, 1])
    with pytest.raises(ValueError, match="'stride'"):
        ops.task_conv2d(x, None, w, None, None, None, [0, 1], [1, 1])
    with pytest.raises(ValueError, match="'padding'"):
        ops.task_conv2d(x, None, w, None, None, None, [1, 1], [-1, 1])
    with pytest.raises(ValueError, match="'x_tangent'.*dtype"):
        ops.task_conv2d(x, x.float(), w, None, None, None, [1, 1], [1, 1])
    with pytest.raises(ValueError, match="'bias'"):
        ops.task_conv2d(
            x, None, w, None, torch.randn(3, 5, dtype=torch.float64), None, [1, 1], [1, 1]
        )
    with pytest.raises(ValueError, match="'bias_tangent'.*without a bias"):
        ops.task_conv2d(
            x, None, w, None, None, torch.randn(3, 6, dtype=torch.float64), [1, 1], [1, 1]
        )
    with pytest.raises(ValueError, match="'x'.*smaller than the kernel"):
        ops.task_conv2d(x[..., :2, :2], None, w, None, None, None, [1, 1], [0, 0])
    with pytest.raises(ValueError, match="'grad_y'"):
        ops.task_conv2d_backward(
            torch.randn(2, 3, 6, 4, 4, dtype=torch.float64),
            None,
            x,
            None,
            w,
            None,
            [1, 1],
            [1, 1],
            True,
            False,
        )
    with pytest.raises(ValueError, match="'shape_args'"):
        torch.ops.maml_ext_testing._task_conv2d_launch_config([0, 1, 2])


def poison_cuda_allocator():
    """Fills the caching allocator's free blocks with NaN, so an output element a kernel does not
    write reads NaN (and fails every comparison)."""
    small = [torch.full((2**18,), float("nan"), device="cuda") for _ in range(64)]  # 1 MiB each
    large = torch.full((2**27,), float("nan"), device="cuda")  # 512 MiB
    del small, large


def check_cuda_against_cpu(case, dtype):
    cpu = make_tensors(case, dtype)
    gpu = {k: None if v is None else v.cuda() for k, v in cpu.items()}
    ops = torch.ops.maml_ext
    for op, args, names in [
        (ops.task_conv2d, forward_args, FORWARD_NAMES),
        (ops.task_conv2d_backward, backward_args, BACKWARD_NAMES),
    ]:
        expected = op(*args(case, cpu))
        poison_cuda_allocator()
        actual = op(*args(case, gpu))
        torch.cuda.synchronize()
        for name, a in zip(names, actual):
            assert not bool(a.isnan().any()), f"{name}: elements not written"
        assert_results_match(
            [a.cpu() for a in actual],
            [e if e.numel() else None for e in expected],
            names,
            TOLERANCE[dtype],
        )
        if actual[0].dim() == 5:
            assert_layer_layout(actual[0], names[0])


@pytest.mark.cuda
@settings(max_examples=60, **COMMON)
@given(case=conv_cases(max_side=20), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cuda_op_matches_cpu_op(case, dtype):
    check_cuda_against_cpu(case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case",
    [
        standard_case(5, 32, 64, 28),  # omniglot-5w1s support, hidden layers
        standard_case(5, 32, 64, 28, in_channels=1),  # its first layer
        standard_case(75, 4, 32, 84, in_channels=3),  # miniimagenet-5w1s query, first layer
        standard_case(75, 4, 32, 42),  # its second layer
    ],
    ids=["omniglot", "omniglot-first", "miniimagenet-first", "miniimagenet-second"],
)
def test_cuda_op_matches_cpu_op_on_standard_shapes(case, dtype, seed):
    check_cuda_against_cpu(dict(case, seed=seed), dtype)

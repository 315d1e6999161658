"""The "bias + batch-norm statistics" epilogue of the task-batched convolution: the partial
statistics (count, mean, M2, Σ R{y}, Σ (y − mean) R{y} per row chunk and channel) that
task_conv2d_with_statistics returns, against the same statistics computed directly in float64;
task_batch_norm(_relu_max_pool) given partial statistics against the same op without them. The
CUDA kernel's epilogue runs on the CPU through the emulation hook; the CUDA op where a GPU is
visible."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from maml_test_utils import (
    COMMON,
    PASS,
    all_grads,
    classification_batch,
    conv_cases,
    conv_net,
    forward_args,
    make_tensors,
    perturb_rates,
    relative_error,
    standard_case,
)

import maml_ext

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

ops = torch.ops.maml_ext
FIELDS = ("count", "mean", "m2", "sum_r", "co_moment")
CPU_CHUNK_ROWS = 64  # kStatisticsChunkRows, csrc/task_conv.h


def as_rows(a):
    """A convolution output [N, T, O, Ho, Wo] as the batch norm's [N·Ho·Wo, T·O]."""
    n, t, o, h, w = a.shape
    return a.permute(0, 3, 4, 1, 2).reshape(n * h * w, t * o)


def direct_statistics(y, r):
    """(count, mean, M2, Σ r, Σ (y − mean) r) per column of y, r [rows, K], in float64."""
    y, r = y.double(), r.double()
    var, mean = torch.var_mean(y, 0, correction=0)
    count = torch.full_like(mean, y.shape[0])
    return torch.stack([count, mean, var * y.shape[0], r.sum(0), ((y - mean) * r).sum(0)], -1)


def statistics_scales(y, r):
    """The magnitudes each field is computed from (count, mean |y|, Σ y², Σ |r|, Σ |y r|): a
    statistic of nearly equal values (an output of padding and bias only) is a tiny difference
    of large terms, so its error is measured against these (still to 1e-10)."""
    y, r = y.double(), r.double()
    count = torch.full_like(y[0], y.shape[0])
    return torch.stack(
        [count, y.abs().mean(0), y.square().sum(0), r.abs().sum(0), (y * r).abs().sum(0)], -1
    )


def scaled_error(actual, expected, scale):
    return float((actual - expected).norm() / scale.norm().clamp_min(1e-300))


def chunk_bounds(rows, chunk_rows):
    return [(begin, min(rows, begin + chunk_rows)) for begin in range(0, rows, chunk_rows)]


def check_partials(y, ry, partials, chunk_rows):
    """Each chunk's statistics equal the direct ones of its rows; without a tangent its fields
    are exactly zero."""
    rows_y = as_rows(y)
    rows_r = as_rows(ry) if ry.numel() else torch.zeros_like(rows_y)
    _, tasks, out = y.shape[:3]
    bounds = chunk_bounds(rows_y.shape[0], chunk_rows)
    assert partials.shape == (len(bounds), tasks, out, 5)
    actual = partials.reshape(len(bounds), tasks * out, 5)
    expected = torch.stack([direct_statistics(rows_y[b:e], rows_r[b:e]) for b, e in bounds])
    scales = torch.stack([statistics_scales(rows_y[b:e], rows_r[b:e]) for b, e in bounds])
    assert torch.equal(actual[..., 0], expected[..., 0])
    for f in range(1, 5):
        error = scaled_error(actual[..., f], expected[..., f], scales[..., f])
        assert error <= 1e-10, f"{FIELDS[f]}: error {error:.3g}"
    if not ry.numel():
        assert bool((actual[..., 3:] == 0).all())


def check_merged(y, ry, partials, eps=1e-5):
    """task_batch_norm's statistics from the partials equal the direct float64 statistics."""
    x, rx = as_rows(y).unsqueeze(0), as_rows(ry).unsqueeze(0) if ry.numel() else None
    stats = ops.task_batch_norm(
        x, rx, None, None, None, None, eps, False, partials.reshape(partials.shape[0], 1, -1, 5)
    )
    _, _, mean, invstd, rx_mean, r_sigma = stats
    rows = x.shape[1]
    r = rx[0] if rx is not None else torch.zeros_like(x[0])
    direct, scales = direct_statistics(x[0], r), statistics_scales(x[0], r)
    assert scaled_error(mean[0], direct[:, 1], scales[:, 1]) <= 1e-10
    expected_invstd = (direct[:, 2] / rows + eps).rsqrt()
    assert relative_error(invstd[0], expected_invstd) <= 1e-10
    if rx is not None:
        assert scaled_error(rx_mean[0], direct[:, 3] / rows, scales[:, 3] / rows) <= 1e-10
        assert (
            scaled_error(
                r_sigma[0],
                direct[:, 4] / rows * expected_invstd,
                scales[:, 4] / rows * expected_invstd,
            )
            <= 1e-10
        )
    else:
        assert rx_mean.numel() == 0 and r_sigma.numel() == 0


def tile_rows(case, multiprocessors):
    """The CUDA forward's row tile (block_m): its partial statistics' chunk."""
    shape = [
        case["batch"],
        case["tasks"],
        case["in_channels"],
        case["height"],
        case["width"],
        case["out_channels"],
        *case["kernel"],
        *case["stride"],
        *case["padding"],
        multiprocessors,
    ]
    config = torch.ops.maml_ext_testing._task_conv2d_launch_config([PASS["forward"]] + shape)
    assert config[13] == 1  # the forward is never split: each block holds whole outputs
    return config[8]


@settings(max_examples=60, **COMMON)
@given(case=conv_cases(max_side=12), multiprocessors=st.integers(1, 264))
def test_emulated_epilogue_partials_match_direct_statistics(case, multiprocessors):
    """The CUDA kernel's epilogue, run thread by thread: per row tile and channel, the statistics
    of y (+ bias) and its tangent; y itself as task_conv2d's."""
    t = make_tensors(case)
    y, ry, partials = torch.ops.maml_ext_testing._task_conv2d_with_statistics_emulated(
        *forward_args(case, t), multiprocessors
    )
    expected_y, expected_ry = ops.task_conv2d(*forward_args(case, t))
    assert relative_error(y, expected_y) <= 1e-10
    assert ry.numel() == expected_ry.numel()
    if ry.numel():
        assert relative_error(ry, expected_ry) <= 1e-10
    check_partials(y, ry, partials, tile_rows(case, multiprocessors))
    check_merged(y, ry, partials)


@pytest.mark.parametrize(
    "case",
    [
        standard_case(2, 2, 64, 28),  # Omniglot hidden layer: 4 columns per thread
        standard_case(2, 3, 64, 28, in_channels=1),  # its first layer
        standard_case(1, 2, 32, 21),  # 2 columns per thread, a partial last tile
    ],
    ids=["omniglot", "omniglot-first", "odd"],
)
def test_emulated_epilogue_on_standard_shapes(case, seed):
    t = make_tensors(dict(case, seed=seed))
    y, ry, partials = torch.ops.maml_ext_testing._task_conv2d_with_statistics_emulated(
        *forward_args(case, t), 132
    )
    check_partials(y, ry, partials, tile_rows(case, 132))
    check_merged(y, ry, partials)


@settings(max_examples=40, **COMMON)
@given(case=conv_cases(max_side=14))
def test_cpu_op_partials_match_direct_statistics(case):
    t = make_tensors(case)
    y, ry, partials = ops.task_conv2d_with_statistics(*forward_args(case, t))
    expected_y, expected_ry = ops.task_conv2d(*forward_args(case, t))
    assert torch.equal(y, expected_y) and torch.equal(ry, expected_ry)
    check_partials(y, ry, partials, CPU_CHUNK_ROWS)
    check_merged(y, ry, partials)


def python_partials(x, rx, bounds):
    """Partial statistics [P, B, C, 5] of x [B, M, C] (and rx) over row chunks `bounds`; an
    empty chunk is all zeros."""
    r = rx if rx is not None else torch.zeros_like(x)
    chunks = []
    for begin, end in bounds:
        if begin == end:
            chunks.append(torch.zeros(x.shape[0], x.shape[2], 5, dtype=x.dtype))
        else:
            chunks.append(
                torch.stack(
                    [direct_statistics(x[b, begin:end], r[b, begin:end]) for b in range(x.shape[0])]
                )
            )
    return torch.stack(chunks).to(x.dtype)


@st.composite
def row_chunks(draw, rows):
    """Random chunk boundaries of [0, rows), empty chunks allowed."""
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=6)))
    edges = [0] + cuts + [rows]
    return list(zip(edges[:-1], edges[1:]))


def batch_norm_inputs(g, shape, batch, channels, affine, x_tangent, param_tangent):
    def randn(*s):
        return torch.randn(*s, dtype=torch.float64, generator=g)

    x = randn(*shape) * (0.5 + randn(channels).abs()) + randn(channels)
    params = [randn(batch, channels) if affine else None for _ in range(2)]
    params += [randn(batch, channels) if affine and param_tangent else None for _ in range(2)]
    return x, randn(*shape) if x_tangent else None, params


def assert_outputs_equal(actual, expected, names):
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, name
        if e.numel() == 0:
            continue
        if e.dtype == torch.uint8:
            assert torch.equal(a, e), name
        else:
            assert relative_error(a, e) <= 1e-10, f"{name}: {relative_error(a, e):.3g}"


@settings(max_examples=60, **COMMON)
@given(
    batch=st.integers(1, 3),
    rows=st.integers(4, 40),
    channels=st.integers(1, 7),
    affine=st.booleans(),
    relu=st.booleans(),
    x_tangent=st.booleans(),
    param_tangent=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_norm_with_partials_matches_without(
    batch, rows, channels, affine, relu, x_tangent, param_tangent, data, seed
):
    g = torch.Generator().manual_seed(seed)
    x, rx, params = batch_norm_inputs(
        g, (batch, rows, channels), batch, channels, affine, x_tangent, param_tangent
    )
    partials = python_partials(x, rx, data.draw(row_chunks(rows)))
    expected = ops.task_batch_norm(x, rx, *params, 1e-5, relu)
    actual = ops.task_batch_norm(x, rx, *params, 1e-5, relu, partials)
    assert_outputs_equal(
        actual, expected, ("y", "y_tangent", "mean", "invstd", "x_tangent_mean", "sigma_tangent")
    )


@settings(max_examples=40, **COMMON)
@given(
    n=st.integers(1, 3),
    h=st.integers(2, 7),
    w=st.integers(2, 7),
    channels=st.integers(1, 6),
    affine=st.booleans(),
    x_tangent=st.booleans(),
    param_tangent=st.booleans(),
    ceil_mode=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_relu_max_pool_with_partials_matches_without(
    n, h, w, channels, affine, x_tangent, param_tangent, ceil_mode, data, seed
):
    g = torch.Generator().manual_seed(seed)
    x, rx, params = batch_norm_inputs(
        g, (n, h, w, channels), 1, channels, affine, x_tangent, param_tangent
    )
    rows = n * h * w
    partials = python_partials(
        x.reshape(1, rows, channels),
        rx.reshape(1, rows, channels) if rx is not None else None,
        data.draw(row_chunks(rows)),
    )
    expected = ops.task_batch_norm_relu_max_pool(x, rx, *params, 1e-5, ceil_mode)
    actual = ops.task_batch_norm_relu_max_pool(x, rx, *params, 1e-5, ceil_mode, partials)
    assert_outputs_equal(
        actual,
        expected,
        ("y", "y_tangent", "argmax", "mean", "invstd", "x_tangent_mean", "sigma_tangent"),
    )


def test_partial_statistics_replace_the_passes_over_x():
    """The statistics come from the partials, not from x: shifted partial means shift them."""
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    rx = torch.randn(2, 10, 3, dtype=torch.float64)
    partials = python_partials(x, rx, [(0, 4), (4, 10)])
    partials[..., 1] += 1.0
    _, _, mean, invstd, rx_mean, r_sigma = ops.task_batch_norm(
        x, rx, None, None, None, None, 1e-5, False, partials
    )
    assert relative_error(mean, x.mean(1) + 1.0) <= 1e-10
    assert relative_error(invstd, (x.var(1, correction=0) + 1e-5).rsqrt()) <= 1e-10
    images = x[:1].reshape(1, 2, 5, 3)
    pooled = ops.task_batch_norm_relu_max_pool(
        images, None, None, None, None, None, 1e-5, False, partials[:, :1]
    )
    assert relative_error(pooled[3], x[:1].mean(1) + 1.0) <= 1e-10


def test_bad_partial_statistics_are_named():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    good = python_partials(x, None, [(0, 4), (4, 10)])
    ops.task_batch_norm(x, None, None, None, None, None, 1e-5, False, good)
    for bad in (good[:, :, :2], good[:, :1], good[..., :4], good[0], good[:0]):
        with pytest.raises(ValueError, match="'partial_statistics'.*expected \\[P, 2, 3, 5\\]"):
            ops.task_batch_norm(x, None, None, None, None, None, 1e-5, False, bad)
    with pytest.raises(ValueError, match="'partial_statistics'.*dtype"):
        ops.task_batch_norm(x, None, None, None, None, None, 1e-5, False, good.float())
    images = torch.randn(2, 4, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'partial_statistics'.*expected \\[P, 1, 3, 5\\]"):
        ops.task_batch_norm_relu_max_pool(
            images,
            None,
            None,
            None,
            None,
            None,
            1e-5,
            False,
            torch.zeros(1, 1, 4, 5, dtype=torch.float64),
        )


@pytest.mark.cuda
@settings(max_examples=40, **COMMON)
@given(case=conv_cases(max_side=20), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cuda_epilogue_partials_match_direct_statistics(case, dtype):
    t = make_tensors(case, dtype, device="cuda")
    y, ry, partials = ops.task_conv2d_with_statistics(*forward_args(case, t))
    torch.cuda.synchronize()
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    y, ry, partials = y.cpu().double(), ry.cpu().double(), partials.cpu().double()
    if dtype == torch.float64:
        check_partials(y, ry, partials, tile_rows(case, multiprocessors))
        check_merged(y, ry, partials)
    else:  # float32 epilogue arithmetic: against float64 statistics of its own output
        rows_y = as_rows(y)
        rows_r = as_rows(ry) if ry.numel() else torch.zeros_like(rows_y)
        merged = ops.task_batch_norm(
            rows_y.unsqueeze(0),
            None,
            None,
            None,
            None,
            None,
            1e-5,
            False,
            partials.reshape(partials.shape[0], 1, -1, 5),
        )
        direct = direct_statistics(rows_y, rows_r)
        assert relative_error(merged[2][0], direct[:, 1]) <= 1e-4
        assert relative_error(merged[3][0], (direct[:, 2] / rows_y.shape[0] + 1e-5).rsqrt()) <= 1e-4


def check_batch_norm_with_conv_partials(case, relu_pool, convolve, device):
    """The layers' hand-over: the convolution's partials [P, T, O, 5] as [P, 1, T·O, 5] for its
    output as the batch norm's images [N, H, W, T·O] (or x [1, N·H·W, T·O]); the batch norm on
    `device` with them against the CPU batch norm without."""
    t = make_tensors(case, device=device)
    y, ry, partials = convolve(*forward_args(case, t))
    n, tasks, out, h, w = y.shape
    images = y.permute(0, 3, 4, 1, 2).reshape(n, h, w, tasks * out)
    r_images = ry.permute(0, 3, 4, 1, 2).reshape(n, h, w, tasks * out)
    p = partials.view(partials.shape[0], 1, -1, 5)
    g = torch.Generator().manual_seed(case["seed"])
    params = [torch.randn(1, tasks * out, dtype=y.dtype, generator=g).to(device) for _ in range(4)]
    cpu_params = [q.cpu() for q in params]
    if relu_pool:
        actual = ops.task_batch_norm_relu_max_pool(images, r_images, *params, 1e-5, False, p)
        expected = ops.task_batch_norm_relu_max_pool(
            images.cpu(), r_images.cpu(), *cpu_params, 1e-5, False
        )
        names = ("y", "y_tangent", "argmax", "mean", "invstd", "x_tangent_mean", "sigma_tangent")
    else:
        x, rx = images.reshape(1, -1, tasks * out), r_images.reshape(1, -1, tasks * out)
        actual = ops.task_batch_norm(x, rx, *params, 1e-5, True, p)
        expected = ops.task_batch_norm(x.cpu(), rx.cpu(), *cpu_params, 1e-5, True)
        names = ("y", "y_tangent", "mean", "invstd", "x_tangent_mean", "sigma_tangent")
    assert_outputs_equal([a.cpu() for a in actual], expected, names)


@pytest.mark.parametrize("relu_pool", [False, True])
def test_batch_norm_with_emulated_conv_partials_matches_without(relu_pool, seed):
    """The CUDA data flow on the CPU: the kernel's epilogue (emulated), then the batch norm."""

    def convolve(*args):
        return torch.ops.maml_ext_testing._task_conv2d_with_statistics_emulated(*args, 132)

    check_batch_norm_with_conv_partials(
        standard_case(2, 3, 64, 14, seed=seed), relu_pool, convolve, "cpu"
    )


@pytest.mark.cuda
@pytest.mark.parametrize("relu_pool", [False, True])
def test_cuda_batch_norm_with_conv_partials_matches_cpu(relu_pool, seed):
    check_batch_norm_with_conv_partials(
        standard_case(5, 4, 64, 28, seed=seed), relu_pool, ops.task_conv2d_with_statistics, "cuda"
    )


FLOAT32_DRAWS = 7


def test_fused_omniglot_like_net_matches_reference(device, dtype, seed):
    """Conv → BN (statistics from the convolution's epilogue) → ReLU → pool, Omniglot's widths:
    64 channels fill four columns per thread and 28×28 maps several row tiles. The reference runs
    on the CPU in float64, the fused backend on `device` in `dtype`.

    float64 claims exactness, on one draw. float32 cannot, on every draw: max-pooling and ReLU
    route the gradient by comparisons, and at these widths some draw (about 1 in 40 measured, the
    float32 reference as often as the fused backend) has a comparison that float32 rounding
    decides, which moves the meta-gradient by up to 1e-2; which rounding depends even on the
    thread count (bench/NOTES.md, "float32 at Omniglot's widths"). So float32 must be within 1e-4
    of float64 on most of seven draws: a float32 defect would miss on all of them."""
    generator = torch.Generator().manual_seed(seed)
    model = conv_net(ways=5, channels=64, blocks=4, image=28, dtype=torch.float64)
    draws = 1 if dtype == torch.float64 else FLOAT32_DRAWS
    batches = [
        classification_batch(2, 5, 5, (1, 28, 28), 5, dtype=dtype, generator=generator)
        for _ in range(draws)
    ]

    def meta_gradients(model, backend, batch):
        model.zero_grad(set_to_none=True)
        opt = maml_ext.MetaOptimizer(model, None, backend=backend, inner_lr=0.1, inner_steps=2)
        perturb_rates(opt, torch.Generator().manual_seed(11))
        return opt.meta_gradient(*batch), all_grads(opt)

    def as_float64(batch):
        return [b.double() if b.is_floating_point() else b for b in batch]

    exact = [meta_gradients(model, "reference", as_float64(b))[1] for b in batches]
    model.to(device=device, dtype=dtype)
    errors = []
    for batch, expected in zip(batches, exact):
        result, actual = meta_gradients(model, "fused", [b.to(device) for b in batch])
        assert result.backend == "fused"
        errors.append(relative_error(actual.cpu().double(), expected))
    if dtype == torch.float64:
        assert errors[0] <= 1e-10
    else:
        within = sum(error <= 1e-4 for error in errors)
        assert within > draws // 2, f"float32 relative errors against float64: {errors}"

"""maml_ext::task_batch_norm(_backward), the batch-norm (+ fused ReLU) kernels with tangents:
the CPU kernels against torch.func on F.batch_norm(training=True) per task, the CUDA kernels
against the CPU kernels."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from maml_test_utils import cpu_kernels, relative_error
from torch.func import jvp, vjp

import maml_ext

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

ops = torch.ops.maml_ext
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(x, weight, bias, eps, relu):
    """Per b of x [B, M, C]: PyTorch's training-mode batch norm over the M values of each
    channel."""
    outs = []
    for b in range(x.shape[0]):
        y = F.batch_norm(
            x[b],
            None,
            None,
            None if weight is None else weight[b],
            None if bias is None else bias[b],
            training=True,
            eps=eps,
        )
        outs.append(F.relu(y) if relu else y)
    return torch.stack(outs)


def reference_passes(x, rx, weight, bias, vw, vb, gy, rgy, eps, relu):
    """y, R{y}; gx, gγ, gβ and their tangents, by torch.func: jvp of the forward, jvp of its vjp.
    Missing tangents are zero; without affine, γ = 1 and β = 0 (held constant)."""
    affine = weight is not None
    primals = (x, weight, bias) if affine else (x,)
    tangents = (rx, vw, vb) if affine else (rx,)

    def forward(x, *params):
        return reference(x, *(params if affine else (None, None)), eps, relu)

    y, ry = jvp(forward, primals, tangents)

    def backward(gy, *primals):
        return vjp(forward, *primals)[1](gy)

    grads, grad_tangents = jvp(backward, (gy, *primals), (rgy, *tangents))
    return y, ry, grads, grad_tangents


def random_case(draw_seed, batch, rows, channels, dtype, device="cpu"):
    g = torch.Generator().manual_seed(draw_seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=g).to(device)

    # A per-channel offset and scale, so means and variances differ between channels.
    x = randn(batch, rows, channels) * (0.5 + randn(batch, 1, channels).abs()) + randn(
        batch, 1, channels
    )
    return x, randn


# At least 4 values per channel: with 2, x̂ = ±1 up to eps and the input gradient cancels to
# O(eps / var), a problem no kernel can compute to 1e-10 relative.
# In both compiled versions of the kernels (AVX2 + FMA and baseline x86-64).
@pytest.mark.parametrize("isa", ["native", "baseline"])
@settings(max_examples=60, **COMMON)
@given(
    batch=st.integers(1, 4),
    rows=st.integers(4, 40),
    channels=st.integers(1, 9),
    affine=st.booleans(),
    relu=st.booleans(),
    x_tangent=st.booleans(),
    param_tangent=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_kernels_match_torch_func(
    isa, batch, rows, channels, affine, relu, x_tangent, param_tangent, eps, seed
):
    with cpu_kernels(isa):
        check_cpu_kernels(batch, rows, channels, affine, relu, x_tangent, param_tangent, eps, seed)


# The CPU kernels sum a channel in units of 1024 rows (blocks of 64 inside), added in unit order:
# several units, a partial last block, with every flag.
@settings(max_examples=12, **COMMON)
@given(
    batch=st.integers(1, 2),
    rows=st.integers(1025, 3000),
    channels=st.integers(1, 5),
    affine=st.booleans(),
    relu=st.booleans(),
    x_tangent=st.booleans(),
    param_tangent=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_kernels_match_torch_func_over_several_row_units(
    batch, rows, channels, affine, relu, x_tangent, param_tangent, seed
):
    check_cpu_kernels(batch, rows, channels, affine, relu, x_tangent, param_tangent, 1e-5, seed)


def test_cpu_kernels_do_not_depend_on_the_thread_count():
    """Bitwise: the channel sums' units are fixed by the shape, not by the threads."""
    x, randn = random_case(7, 1, 5000, 64, torch.float32)
    weight, bias, rx, gy, rgy = (
        randn(1, 64),
        randn(1, 64),
        randn(1, 5000, 64),
        randn(1, 5000, 64),
        randn(1, 5000, 64),
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y, ry, mean, invstd, rx_mean, r_sigma = ops.task_batch_norm(
                x, rx, weight, bias, None, None, 1e-5, True
            )
            grads = ops.task_batch_norm_backward(
                gy, rgy, x, rx, weight, None, mean, invstd, rx_mean, r_sigma, y, True
            )
            results.append((y, ry, mean, invstd, rx_mean, r_sigma, *grads))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def check_cpu_kernels(batch, rows, channels, affine, relu, x_tangent, param_tangent, eps, seed):
    x, randn = random_case(seed, batch, rows, channels, torch.float64)
    weight = randn(batch, channels) if affine else None
    bias = randn(batch, channels) if affine else None
    vw = randn(batch, channels) if affine and param_tangent else None
    vb = randn(batch, channels) if affine and param_tangent else None
    rx = randn(batch, rows, channels) if x_tangent else None
    gy, rgy = randn(batch, rows, channels), randn(batch, rows, channels)

    zero_channels = torch.zeros(batch, channels, dtype=x.dtype)
    y_ref, ry_ref, grads_ref, rgrads_ref = reference_passes(
        x,
        torch.zeros_like(x) if rx is None else rx,
        weight,
        bias,
        zero_channels if vw is None else vw,
        zero_channels if vb is None else vb,
        gy,
        rgy,
        eps,
        relu,
    )

    y, ry, mean, invstd, rx_mean, r_sigma = ops.task_batch_norm(
        x, rx, weight, bias, vw, vb, eps, relu
    )
    assert relative_error(y, y_ref) <= 1e-10
    assert torch.allclose(mean, x.mean(1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(invstd, (x.var(1, unbiased=False) + eps).rsqrt(), rtol=1e-12, atol=0)
    if rx is None and vw is None:
        assert ry.numel() == 0 and rx_mean.numel() == 0 and r_sigma.numel() == 0
    else:
        assert relative_error(ry, ry_ref) <= 1e-10
    if rx is not None:
        x_hat = (x - mean.unsqueeze(1)) * invstd.unsqueeze(1)
        assert torch.allclose(rx_mean, rx.mean(1), rtol=1e-12, atol=1e-12)
        assert torch.allclose(r_sigma, (x_hat * rx).mean(1), rtol=1e-10, atol=1e-12)

    for tangent in (False, True):
        for input_grad in (False, True):
            gx, rgx, gw, gb, rgw, rgb = ops.task_batch_norm_backward(
                gy,
                rgy if tangent else None,
                x,
                rx,
                weight,
                vw if tangent else None,
                mean,
                invstd,
                rx_mean if rx is not None else None,
                r_sigma if rx is not None else None,
                y if relu else None,
                input_grad,
            )
            if input_grad:
                assert relative_error(gx, grads_ref[0]) <= 1e-10
            else:
                assert gx.numel() == 0 and rgx.numel() == 0
            if affine:
                assert relative_error(gw, grads_ref[1]) <= 1e-10
                assert relative_error(gb, grads_ref[2]) <= 1e-10
            if tangent:
                if input_grad:
                    assert relative_error(rgx, rgrads_ref[0]) <= 1e-10
                if affine:
                    assert relative_error(rgw, rgrads_ref[1]) <= 1e-10
                    assert relative_error(rgb, rgrads_ref[2]) <= 1e-10
            else:
                assert rgx.numel() == 0 and rgw.numel() == 0 and rgb.numel() == 0


@settings(max_examples=15, **COMMON)
@given(
    n=st.integers(1, 5),
    tasks=st.integers(1, 4),
    channels=st.integers(1, 5),
    size=st.integers(1, 6),
    relu=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_image_layout_is_per_task_batch_norm_2d(n, tasks, channels, size, relu, seed):
    """The fused program's images [N, T, C, H, W], stored N, H, W, T, C, are x [1, N·H·W, T·C]:
    each (task, channel) normalised over its task's N·H·W values, as BatchNorm2d of that task."""
    if n * size * size < 4:
        n = 4
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(
        tasks, n, channels, size, size, dtype=torch.float64, generator=g
    )  # [T, N, C, H, W]
    weight = torch.randn(tasks, channels, dtype=torch.float64, generator=g)
    bias = torch.randn(tasks, channels, dtype=torch.float64, generator=g)
    x = images.permute(1, 3, 4, 0, 2).reshape(1, n * size * size, tasks * channels)
    y = ops.task_batch_norm(
        x, None, weight.reshape(1, -1), bias.reshape(1, -1), None, None, 1e-5, relu
    )[0]
    got = y.reshape(n, size, size, tasks, channels).permute(3, 0, 4, 1, 2)
    for t in range(tasks):
        want = F.batch_norm(images[t], None, None, weight[t], bias[t], training=True, eps=1e-5)
        assert relative_error(got[t], F.relu(want) if relu else want) <= 1e-10


def pooled_reference(x, weight, bias, eps, ceil_mode):
    """x [N, H, W, C] (channels-last images): BatchNorm2d (training), ReLU, max_pool2d(2)."""
    y = F.batch_norm(
        x.permute(0, 3, 1, 2),
        None,
        None,
        None if weight is None else weight[0],
        None if bias is None else bias[0],
        training=True,
        eps=eps,
    )
    return F.max_pool2d(F.relu(y), 2, ceil_mode=ceil_mode).permute(0, 2, 3, 1)


@pytest.mark.parametrize("isa", ["native", "baseline"])
@settings(max_examples=60, **COMMON)
@given(
    n=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    channels=st.integers(1, 5),
    affine=st.booleans(),
    x_tangent=st.booleans(),
    param_tangent=st.booleans(),
    ceil_mode=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_fused_pool_kernels_match_torch_func(
    isa, n, h, w, channels, affine, x_tangent, param_tangent, ceil_mode, seed
):
    if not ceil_mode:
        h, w = max(h, 2), max(w, 2)
    if n * h * w < 4:  # see test_cpu_kernels_match_torch_func
        n = 4
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    x = randn(n, h, w, channels) * (0.5 + randn(channels).abs()) + randn(channels)
    weight, bias = (randn(1, channels), randn(1, channels)) if affine else (None, None)
    vw, vb = (randn(1, channels), randn(1, channels)) if affine and param_tangent else (None, None)
    rx = randn(n, h, w, channels) if x_tangent else None

    def forward(x, *params):
        return pooled_reference(x, *(params if affine else (None, None)), 1e-5, ceil_mode)

    zero = torch.zeros(1, channels, dtype=x.dtype)
    primals = (x, weight, bias) if affine else (x,)
    tangents = (
        (torch.zeros_like(x) if rx is None else rx),
        *(((zero if vw is None else vw), (zero if vb is None else vb)) if affine else ()),
    )
    y_ref, ry_ref = jvp(forward, primals, tangents)
    gy, rgy = randn(*y_ref.shape), randn(*y_ref.shape)
    grads_ref, rgrads_ref = jvp(
        lambda gy, *p: vjp(forward, *p)[1](gy), (gy, *primals), (rgy, *tangents)
    )

    with cpu_kernels(isa):
        y, ry, argmax, mean, invstd, rx_mean, r_sigma = ops.task_batch_norm_relu_max_pool(
            x, rx, weight, bias, vw, vb, 1e-5, ceil_mode
        )
    assert relative_error(y, y_ref) <= 1e-10
    if rx is not None or vw is not None:
        assert relative_error(ry, ry_ref) <= 1e-10
    else:
        assert ry.numel() == 0
    # The window's argmax is PyTorch's (first maximum in row-major order).
    _, index = F.max_pool2d(
        F.relu(
            F.batch_norm(
                x.permute(0, 3, 1, 2),
                None,
                None,
                None if weight is None else weight[0],
                None if bias is None else bias[0],
                training=True,
                eps=1e-5,
            )
        ),
        2,
        ceil_mode=ceil_mode,
        return_indices=True,
    )
    oh = torch.arange(index.shape[2]).view(-1, 1)
    ow = torch.arange(index.shape[3])
    position = 2 * (index // w - 2 * oh) + (index % w - 2 * ow)
    assert torch.equal(argmax.long(), position.permute(0, 2, 3, 1))

    for tangent in (False, True):
        with cpu_kernels(isa):
            gx, rgx, gw, gb, rgw, rgb = ops.task_batch_norm_relu_max_pool_backward(
                gy,
                rgy if tangent else None,
                x,
                rx,
                weight,
                vw if tangent else None,
                mean,
                invstd,
                rx_mean if rx is not None else None,
                r_sigma if rx is not None else None,
                y,
                argmax,
                True,
            )
        assert relative_error(gx, grads_ref[0]) <= 1e-10
        if affine:
            assert relative_error(gw, grads_ref[1]) <= 1e-10
            assert relative_error(gb, grads_ref[2]) <= 1e-10
        if tangent:
            assert relative_error(rgx, rgrads_ref[0]) <= 1e-10
            if affine:
                assert relative_error(rgw, rgrads_ref[1]) <= 1e-10
                assert relative_error(rgb, rgrads_ref[2]) <= 1e-10
        else:
            assert rgx.numel() == 0 and rgw.numel() == 0


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'x'"):
        ops.task_batch_norm(x[0], None, None, None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="'weight'"):
        ops.task_batch_norm(x, None, w[:, :2], None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="'x_tangent'"):
        ops.task_batch_norm(x, x.float(), None, None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="'eps'"):
        ops.task_batch_norm(x, None, None, None, None, None, -1.0, False)
    with pytest.raises(ValueError, match="'x'"):
        ops.task_batch_norm(x[:, :0], None, None, None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="'x'"):
        ops.task_batch_norm(x.int(), None, None, None, None, None, 1e-5, False)
    y, _, mean, invstd, _, _ = ops.task_batch_norm(x, None, None, None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="'x_tangent'"):
        ops.task_batch_norm_backward(y, y, x, x, None, None, mean, invstd, None, None, None, True)
    with pytest.raises(ValueError, match="'grad_y'"):
        ops.task_batch_norm_backward(
            y[:1], None, x, None, None, None, mean, invstd, None, None, None, True
        )
    with pytest.raises(ValueError, match="'mean'"):
        ops.task_batch_norm_backward(
            y, None, x, None, None, None, mean.t(), invstd, None, None, None, True
        )


@settings(max_examples=200, **COMMON)
@given(
    batch=st.integers(1, 65535),
    rows=st.integers(1, 10**7),
    channels=st.integers(1, 5000),
    multiprocessors=st.integers(1, 200),
)
def test_cuda_reduction_plan_covers_every_value_once(batch, rows, channels, multiprocessors):
    per_block, row_lanes, channel_blocks, splits, rows_per_split = (
        torch.ops.maml_ext_testing.task_batch_norm_reduction_plan(
            batch, rows, channels, multiprocessors
        )
    )
    # A warp's lanes split evenly over adjacent channels; 256 threads per block.
    assert per_block in (1, 2, 4, 8, 16, 32) and per_block >= min(channels, 32)
    assert per_block * row_lanes == 256
    # Channel groups and row splits tile the channels and rows, none empty, within grid limits.
    assert (channel_blocks - 1) * per_block < channels <= channel_blocks * per_block
    assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split
    assert 1 <= splits <= 65535
    # Rows are split only where each thread keeps at least 16 of them.
    assert splits == 1 or rows_per_split >= 16 * row_lanes
    # Splitting stops once the device has about four blocks per multiprocessor.
    assert splits == 1 or (splits - 1) * channel_blocks * batch < 4 * multiprocessors


def test_cuda_reduction_plan_fills_the_device_on_omniglot_shapes():
    # Omniglot 5-way query batch: 75 images of 28×28, 5 tasks of 64 channels, an H200's 132 SMs.
    _, _, channel_blocks, splits, _ = torch.ops.maml_ext_testing.task_batch_norm_reduction_plan(
        1, 75 * 28 * 28, 5 * 64, 132
    )
    assert channel_blocks * splits >= 4 * 132
    with pytest.raises(ValueError, match="'rows'"):
        torch.ops.maml_ext_testing.task_batch_norm_reduction_plan(1, 0, 5, 132)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape", [(1, 75 * 28 * 28, 5 * 64), (8, 25, 64), (3, 7, 5), (1, 4000, 33)]
)
@pytest.mark.parametrize("relu", [False, True])
def test_cuda_kernels_match_cpu(dtype, tolerance, shape, relu, seed):
    batch, rows, channels = shape
    x, randn = random_case(seed, batch, rows, channels, dtype)
    weight, bias, vw, vb = (randn(batch, channels) for _ in range(4))
    rx, gy, rgy = (randn(batch, rows, channels) for _ in range(3))

    def forward(device):
        args = [t.to(device) for t in (x, rx, weight, bias, vw, vb)]
        return ops.task_batch_norm(*args, 1e-5, relu)

    on_cpu, on_gpu = forward("cpu"), forward("cuda")
    for a, b in zip(on_cpu, on_gpu):
        assert b.shape == a.shape and relative_error(b.cpu(), a) <= tolerance
    for tangent in (False, True):

        def backward(device, forward_out, tangent=tangent):
            y, _, mean, invstd, rx_mean, r_sigma = forward_out

            def d(t):
                return t.to(device)

            return ops.task_batch_norm_backward(
                d(gy),
                d(rgy) if tangent else None,
                d(x),
                d(rx),
                d(weight),
                d(vw) if tangent else None,
                mean,
                invstd,
                rx_mean,
                r_sigma,
                y if relu else None,
                True,
            )

        for a, b in zip(backward("cpu", on_cpu), backward("cuda", on_gpu)):
            assert b.shape == a.shape and relative_error(b.cpu(), a) <= tolerance


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape, ceil_mode",
    [
        ((75, 28, 28, 5 * 64), False),
        ((4, 7, 5, 3), True),
        ((4, 7, 5, 3), False),
        ((2, 1, 1, 40), True),
    ],
)
def test_cuda_fused_pool_kernels_match_cpu(dtype, tolerance, shape, ceil_mode, seed):
    g = torch.Generator().manual_seed(seed)
    channels = shape[-1]

    def randn(*s):
        return torch.randn(*s, dtype=dtype, generator=g)

    x = randn(*shape) * (0.5 + randn(channels).abs()) + randn(channels)
    rx = randn(*shape)
    weight, bias, vw, vb = (randn(1, channels) for _ in range(4))

    def forward(device):
        return ops.task_batch_norm_relu_max_pool(
            *(t.to(device) for t in (x, rx, weight, bias, vw, vb)), 1e-5, ceil_mode
        )

    on_cpu, on_gpu = forward("cpu"), forward("cuda")
    for a, b in zip(on_cpu, on_gpu):
        assert b.shape == a.shape
        if a.dtype == torch.uint8:  # argmax: equal wherever the window's maximum is unique
            assert (b.cpu() == a).float().mean() > 0.999
        else:
            assert relative_error(b.cpu(), a) <= tolerance
    gy, rgy = randn(*on_cpu[0].shape), randn(*on_cpu[0].shape)
    for tangent in (False, True):

        def backward(device, out, tangent=tangent):
            y, _, argmax, mean, invstd, rx_mean, r_sigma = out

            def d(t):
                return t.to(device)

            # The CPU's argmax on both devices, so near-ties route the gradient alike.
            return ops.task_batch_norm_relu_max_pool_backward(
                d(gy),
                d(rgy) if tangent else None,
                d(x),
                d(rx),
                d(weight),
                d(vw) if tangent else None,
                mean,
                invstd,
                rx_mean,
                r_sigma,
                y,
                d(on_cpu[2]),
                True,
            )

        for a, b in zip(backward("cpu", on_cpu), backward("cuda", on_gpu)):
            assert b.shape == a.shape and relative_error(b.cpu(), a) <= tolerance

"""What the tests share: the devices and dtypes they run on, models, random task batches, and
the random convolution cases of the task-batched convolution's tests."""

from __future__ import annotations

import contextlib
import copy

import hypothesis
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, strategies as st
from torch import nn

import maml_ext

SEED_VARIABLE = "MAML_TEST_SEED"

# Parameters of the `device` and `dtype` fixtures (conftest.py); Hypothesis tests, which cannot
# take function-scoped fixtures, take them through @pytest.mark.parametrize("device", DEVICES).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]

COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cuda_unavailable_reason() -> str | None:
    """Why tests marked ``cuda`` cannot run here, or None where they can."""
    if not maml_ext.extension_info()["compiled_ops_loaded"]:
        return "needs maml_ext._C, which is not built"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False here"
    if not maml_ext.extension_info()["cuda_kernels_compiled"]:
        return "needs maml_ext built with its CUDA kernels: this build is CPU-only"
    return None


def sinusoid_mlp(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    ).to(dtype)


class Residual(nn.Module):
    """A residual block as users write one (the fused compiler finds it by tracing forward)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + self.shortcut(x)


def conv_block(in_channels: int, out_channels: int, *, pool: bool = True) -> list[nn.Module]:
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=1 if pool else 2),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


def conv_net(
    ways: int = 5,
    channels: int = 8,
    in_channels: int = 1,
    blocks: int = 2,
    image: int = 8,
    pool: bool = True,
    dtype=torch.float64,
) -> nn.Module:
    """The paper's conv net shape (conv3x3, BN, ReLU, max-pool or stride 2), scaled down."""
    layers: list[nn.Module] = []
    size = image
    for block in range(blocks):
        layers += conv_block(in_channels if block == 0 else channels, channels, pool=pool)
        size = size // 2 if pool else (size + 1) // 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, ways)]
    return nn.Sequential(*layers).to(dtype)


def classification_batch(
    tasks: int,
    support: int,
    query: int,
    features: tuple[int, ...],
    ways: int,
    *,
    dtype=torch.float64,
    generator=None,
):
    g = generator
    sx = torch.randn(tasks, support, *features, dtype=dtype, generator=g)
    qx = torch.randn(tasks, query, *features, dtype=dtype, generator=g)
    sy = torch.randint(0, ways, (tasks, support), generator=g)
    qy = torch.randint(0, ways, (tasks, query), generator=g)
    return sx, sy, qx, qy


def regression_batch(tasks: int, support: int, query: int, *, dtype=torch.float64, generator=None):
    g = generator
    sx = torch.rand(tasks, support, 1, dtype=dtype, generator=g) * 10 - 5
    qx = torch.rand(tasks, query, 1, dtype=dtype, generator=g) * 10 - 5
    amplitude = torch.rand(tasks, 1, 1, dtype=dtype, generator=g) * 4.9 + 0.1
    return sx, amplitude * torch.sin(sx), qx, amplitude * torch.sin(qx)


WEIGHT_SEEDS = st.integers(0, 2**31 - 1)

# The built-in losses and their output widths, drawn by the random-model strategies: classes,
# regression targets, or means then log-stds (gaussian_nll).
OUTPUT_WIDTHS = {
    "cross_entropy": st.integers(2, 5),
    "mse": st.integers(1, 3),
    "gaussian_nll": st.sampled_from([2, 4]),
}


def draw_loss_and_outputs(draw) -> tuple[str, int]:
    """(loss name, output width) for a strategy's ``draw``."""
    loss = draw(st.sampled_from(sorted(OUTPUT_WIDTHS)))
    return loss, draw(OUTPUT_WIDTHS[loss])


def seeded_weights(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialises ``model``'s layers from ``seed`` without touching the global RNG. Strategies
    that build modules draw this seed as an example, so Hypothesis replays the weights too: drawn
    from the global RNG, a failing example would come back with other weights (and be reported
    as flaky)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def perturb_rates(opt, generator=None) -> None:
    """Moves learned rates away from their common initial value, so each entry matters."""
    with torch.no_grad():
        for p in opt.inner_lr.parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, dtype=p.dtype, generator=generator).to(p.device))


def _reference_passes(opt, support_x, support_y, query_x, module_type, record) -> None:
    """Calls ``record(module, inputs, output)`` for every ``module_type`` module in every pass of
    ``opt``'s inner loop (each task's support set at θ_0 … θ_{K-1}, its query set at θ_K), run
    in float64 by the reference backend."""
    model = copy.deepcopy(opt.model).double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    reference = maml_ext.MetaOptimizer(
        model,
        None,
        inner_lr=opt.inner_lr.init,
        inner_steps=opt.inner_steps,
        backend="reference",
        learn_inner_lr=opt.inner_lr.learn,
        loss=opt.loss.name if opt.loss.builtin else opt.loss.fn,
    )
    reference.inner_lr.load_state_dict(
        {k: v.double() for k, v in opt.inner_lr.state_dict().items()}
    )
    support_x, query_x = support_x.double().cpu(), query_x.double().cpu()
    support_y = support_y.double().cpu() if support_y.is_floating_point() else support_y.cpu()
    # θ_1 … θ_K first: the reference backend's own passes must not reach the hooks.
    steps = opt.inner_steps
    adapted = [reference.adapt(support_x, support_y, steps=k) for k in range(1, steps + 1)]
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, module_type)]
    try:
        with torch.no_grad():
            for k in range(steps + 1):
                for t in range(support_x.shape[0]):
                    weights = params if k == 0 else {n: v[t] for n, v in adapted[k - 1].items()}
                    x = query_x[t] if k == steps else support_x[t]
                    torch.func.functional_call(model, weights, (x,))
    finally:
        for hook in hooks:
            hook.remove()


def smallest_max_pool_gap(opt, support_x, support_y, query_x) -> float:
    """The smallest relative gap between the two largest inputs of any 2x2 max-pool window with a
    positive maximum, over every pass of the inner loop, from ``opt``'s model in float64 by the
    reference backend. Below a dtype's resolution that precision may route the window's gradient
    to either input: max-pooling is discontinuous there, and no backend can be expected to agree
    with float64."""
    gaps = []

    def record_gap(module, inputs, output):
        windows = F.unfold(inputs[0].flatten(0, 1).unsqueeze(1), 2, stride=2)
        top = windows.topk(2, dim=1).values
        positive = top[:, 0] > 0  # all-zero windows carry no gradient past the ReLU
        if positive.any():
            gaps.append(((top[:, 0] - top[:, 1])[positive] / top[:, 0][positive]).min().item())

    _reference_passes(opt, support_x, support_y, query_x, nn.MaxPool2d, record_gap)
    return min(gaps, default=float("inf"))


def smallest_batch_norm_offset(opt, support_x, support_y, query_x) -> float:
    """The smallest distance of any batch-norm input from its channel's mean, in units of the
    channel's normalising scale sqrt(var + eps), over every pass of the inner loop (float64,
    reference backend). An input on its channel's mean normalises to 0 ± rounding, which with
    the default bias β = 0 puts a following ReLU exactly on its kink (either side is a right
    answer, so two backends need not agree there). It happens by construction, not by chance: a
    channel constant over a task (its inputs all zero after dead ReLUs), or zero padding after a
    bias-free convolution of normalised (mean-zero) channels."""
    offsets = []

    def record_offset(module, inputs, output):
        x = inputs[0].transpose(0, 1).flatten(1)  # [C, N * spatial]
        mean = x.mean(dim=1, keepdim=True)
        scale = (x.var(dim=1, unbiased=False, keepdim=True) + module.eps).sqrt()
        offsets.append(((x - mean).abs() / scale).min().item())

    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    _reference_passes(opt, support_x, support_y, query_x, batch_norms, record_offset)
    return min(offsets, default=float("inf"))


def all_grads(opt) -> torch.Tensor:
    tensors = list(opt.model.parameters()) + list(opt.inner_lr.parameters())
    return torch.cat([t.grad.reshape(-1) for t in tensors])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


LEARN_KINDS = [None, "scalar", "per_parameter", "per_step"]


def meta_gradient_of(model, batch, backend, seed, **kwargs):
    """(MetaStepResult, every gradient flat) of one MetaOptimizer.meta_gradient on ``backend``,
    learned rates perturbed from ``seed`` so that each parameter's rate differs."""
    model.zero_grad(set_to_none=True)
    opt = maml_ext.MetaOptimizer(model, None, backend=backend, **kwargs)
    perturb_rates(opt, torch.Generator().manual_seed(seed))
    result = opt.meta_gradient(*batch)
    return result, all_grads(opt)


def assume_no_batch_norm_tie(model, batch, seed, **kwargs) -> None:
    """Rejects (hypothesis.assume) a draw in which some batch-norm input lies on its channel's
    mean in some pass of the inner loop: that leaves a following ReLU exactly on its kink (see
    smallest_batch_norm_offset), where a draw tests rounding, not the rules. ``kwargs`` and
    ``seed`` as for meta_gradient_of."""
    probe = maml_ext.MetaOptimizer(copy.deepcopy(model), None, backend="reference", **kwargs)
    perturb_rates(probe, torch.Generator().manual_seed(seed))
    hypothesis.assume(smallest_batch_norm_offset(probe, batch[0], batch[1], batch[2]) > 1e-9)


def assert_fused_equals_reference(stack, device, tasks, steps, first_order, learn, seed):
    """A random float64 stack ``(model, shape, loss, outputs)``: the fused meta-gradient, query
    and support losses on ``device`` equal the reference backend's on the CPU to 1e-10."""
    model, shape, loss, outputs = stack
    generator = torch.Generator().manual_seed(seed)
    batch = random_batch(generator, tasks, 4, 3, shape, loss, outputs, torch.float64)
    kwargs = dict(
        inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss, learn_inner_lr=learn
    )
    assume_no_batch_norm_tie(model, batch, seed, **kwargs)
    expected_result, expected = meta_gradient_of(model, batch, "reference", seed, **kwargs)
    model.to(device)
    result, actual = meta_gradient_of(model, [b.to(device) for b in batch], "fused", seed, **kwargs)
    assert result.backend == "fused"
    assert relative_error(actual.cpu(), expected) <= 1e-10, seed
    for name in ("query_loss", "support_loss"):
        want = getattr(expected_result, name)
        assert relative_error(getattr(result, name).cpu(), want) <= 1e-10, seed


def assert_loss_hvp_equals_forward_over_reverse(stack, device, tasks, seed):
    """A random float64 stack: ``fused.loss_hvp``'s per-task losses, gradients and
    Hessian-vector products at per-task weights equal torch.func's jvp of grad."""
    from maml_ext import fused
    from maml_ext.program import compile_program, loss_code

    model, shape, loss, outputs = stack
    model = model.to(device)
    generator = torch.Generator().manual_seed(seed)
    x, y, _, _ = [
        b.to(device)
        for b in random_batch(generator, tasks, 5, 1, shape, loss, outputs, torch.float64)
    ]
    program = compile_program(model)
    names = program.slot_names
    params = {
        n: (
            p.detach().cpu()
            + 0.3 * torch.randn((tasks, *p.shape), dtype=p.dtype, generator=generator)
        ).to(device)
        for n, p in model.named_parameters()
    }
    v = {
        n: torch.randn(p.shape, dtype=p.dtype, generator=generator).to(device)
        for n, p in params.items()
    }
    losses, grads, products = fused.loss_hvp(
        program,
        program.flatten(params, task_dims=1),
        x,
        y,
        program.flatten(v, task_dims=1),
        loss_code=loss_code(loss),
    )
    # The squared error written out (torch.func's forward-over-reverse of F.mse_loss trips over an
    # immutable ZeroTensor for some models).
    loss_fn = (
        F.cross_entropy
        if loss == "cross_entropy"
        else (lambda out, target: ((out - target) ** 2).mean())
    )

    def flat(tensors):
        return torch.cat([tensors[n].reshape(-1) for n in names])

    for t in range(tasks):

        def task_loss(p, t=t):
            return loss_fn(torch.func.functional_call(model, p, (x[t],)), y[t])

        at_task = {n: params[n][t] for n in names}
        expected_grad, expected_product = torch.func.jvp(
            torch.func.grad(task_loss), (at_task,), ({n: v[n][t] for n in names},)
        )
        assert relative_error(losses[t], task_loss(at_task)) <= 1e-12, seed
        assert relative_error(grads[t], flat(expected_grad)) <= 1e-10, seed
        assert relative_error(products[t], flat(expected_product)) <= 1e-10, seed


def random_batch(generator, tasks, support, query, shape, loss, outputs, dtype):
    """Fresh normal inputs [T, N, *shape]; class indices below `outputs`, normal targets, or
    (gaussian_nll, `outputs` = 2A) normal values and weights in [0.5, 1.5) (a positive weighting
    keeps random multi-step adaptation from running off; signed weights are tested on the loss
    itself, test_task_loss.py)."""
    sx = torch.randn(tasks, support, *shape, dtype=dtype, generator=generator)
    qx = torch.randn(tasks, query, *shape, dtype=dtype, generator=generator)
    if loss == "cross_entropy":
        sy = torch.randint(0, outputs, (tasks, support), generator=generator)
        qy = torch.randint(0, outputs, (tasks, query), generator=generator)
    elif loss == "gaussian_nll":
        sy, qy = (
            torch.cat(
                [
                    torch.randn(tasks, n, outputs // 2, dtype=dtype, generator=generator),
                    0.5 + torch.rand(tasks, n, outputs // 2, dtype=dtype, generator=generator),
                ],
                dim=-1,
            )
            for n in (support, query)
        )
    else:
        sy = torch.randn(tasks, support, outputs, dtype=dtype, generator=generator)
        qy = torch.randn(tasks, query, outputs, dtype=dtype, generator=generator)
    return sx, sy, qx, qy


@contextlib.contextmanager
def cpu_kernels(isa: str):
    """Runs the block with the CPU kernels compiled for what this CPU supports ("native") or with
    their baseline x86-64 versions ("baseline"; csrc/cpu/vector_isa.h)."""
    previous = torch.ops.maml_ext_testing._force_baseline_cpu_kernels(isa == "baseline")
    try:
        yield
    finally:
        torch.ops.maml_ext_testing._force_baseline_cpu_kernels(previous)


# --- random cases of one task-batched convolution (maml_ext::task_conv2d and its statistics) ---

PASS = {"forward": 0, "backward_data": 1, "weight_grad": 2}


@st.composite
def conv_cases(draw, max_side=8):
    """Shapes, layouts and which tangents are given, for one convolution."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    side = [draw(st.integers(max(1, k - 2 * p), max_side)) for k, p in zip(kernel, padding)]
    bias = draw(st.booleans())
    return dict(
        tasks=draw(st.integers(1, 4)),
        batch=draw(st.integers(1, 3)),
        in_channels=draw(st.integers(1, 6)),
        out_channels=draw(st.integers(1, 6)),
        height=side[0],
        width=side[1],
        kernel=kernel,
        padding=padding,
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        bias=bias,
        x_tangent=draw(st.booleans()),
        weight_tangent=draw(st.booleans()),
        bias_tangent=bias and draw(st.booleans()),
        grad_y_tangent=draw(st.booleans()),
        need_input_grad=draw(st.booleans()),
        layer_layout=draw(st.booleans()),
        weights=draw(st.sampled_from(["own", "shared", "slice"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def make_tensors(case, dtype=torch.float64, device="cpu"):
    """Random inputs of one case (fresh per seed), on `device`; absent tangents are None."""
    g = torch.Generator().manual_seed(case["seed"])
    T, N, C, O = case["tasks"], case["batch"], case["in_channels"], case["out_channels"]
    H, W = case["height"], case["width"]
    kh, kw = case["kernel"]
    Ho = output_size(H, kh, case["stride"][0], case["padding"][0])
    Wo = output_size(W, kw, case["stride"][1], case["padding"][1])

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype=dtype, device=device)

    def activation(*shape):
        a = randn(*shape)
        if case["layer_layout"]:  # the layer's layout: memory order N, H, W, T, C
            a = a.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
        return a

    def weights(*shape):
        if case["weights"] == "shared":
            return randn(1, *shape[1:]).expand(*shape)
        if case["weights"] == "slice":  # a slice of a flat [T, P] vector, as the layer passes it
            numel = torch.Size(shape[1:]).numel()
            return randn(shape[0], numel + 3)[:, 2 : 2 + numel].view(shape)
        return randn(*shape)

    t = dict(
        x=activation(N, T, C, H, W),
        weight=weights(T, O, C, kh, kw),
        bias=weights(T, O) if case["bias"] else None,
        grad_y=activation(N, T, O, Ho, Wo),
    )
    t["x_tangent"] = activation(N, T, C, H, W) if case["x_tangent"] else None
    t["weight_tangent"] = randn(T, O, C, kh, kw) if case["weight_tangent"] else None
    t["bias_tangent"] = randn(T, O) if case["bias_tangent"] else None
    t["grad_y_tangent"] = activation(N, T, O, Ho, Wo) if case["grad_y_tangent"] else None
    return t


def forward_args(case, t):
    return (
        t["x"],
        t["x_tangent"],
        t["weight"],
        t["weight_tangent"],
        t["bias"],
        t["bias_tangent"],
        case["stride"],
        case["padding"],
    )


def backward_args(case, t):
    return (
        t["grad_y"],
        t["grad_y_tangent"],
        t["x"],
        t["x_tangent"],
        t["weight"],
        t["weight_tangent"],
        case["stride"],
        case["padding"],
        case["need_input_grad"],
        case["bias"],
    )


def standard_case(batch, tasks, channels, side, in_channels=None, seed=None):
    """A 3x3, stride 1, pad 1 convolution of the standard configurations, all tangents given. A
    case built at collection (a parametrize list) gets its test's seed later:
    ``dict(case, seed=seed)``."""
    return dict(
        tasks=tasks,
        batch=batch,
        in_channels=in_channels or channels,
        out_channels=channels,
        height=side,
        width=side,
        kernel=(3, 3),
        padding=(1, 1),
        stride=(1, 1),
        bias=True,
        x_tangent=True,
        weight_tangent=True,
        bias_tangent=True,
        grad_y_tangent=True,
        need_input_grad=True,
        layer_layout=True,
        weights="slice",
        seed=seed,
    )

"""Residual blocks on the fused path (csrc/layers/residual.cpp, the residual_* records) and the
compiler that finds them in a module's forward (torch.fx): ResNet-12 (narrow, small images) fused
against the reference in float64 (1e-10 relative) and float32, with batch norm: meta-gradient for
each kind of inner rate, first and second order, adapt and predict; random residual stacks (nested
blocks, identity shortcuts) against the reference and against torch.func's Hessian-vector
products; users' own block classes; graphs the fused backend cannot run, named."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from maml_test_utils import (
    COMMON,
    DEVICES,
    LEARN_KINDS,
    WEIGHT_SEEDS,
    Residual,
    assert_fused_equals_reference,
    assert_loss_hvp_equals_forward_over_reverse,
    classification_batch,
    meta_gradient_of,
    perturb_rates,
    relative_error,
    seeded_weights,
    smallest_max_pool_gap,
)
from torch import nn

import maml_ext
from maml_ext import fused, models
from maml_ext.program import (
    LayerProgram,
    UnsupportedModelError,
    compile_program,
    loss_code,
    read_records,
)

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)


def narrow_resnet12(dtype, ways=5):
    return models.resnet12(ways, in_channels=3, width=2, image_size=16).to(dtype)


# ---- ResNet-12 -----------------------------------------------------------------------------------


def test_resnet12_compiles_to_four_residual_blocks():
    program = compile_program(narrow_resnet12(torch.float64))
    kinds = [kind for kind, _ in read_records(program.ints)]
    block = ["residual_begin"] + ["conv2d", "batch_norm", "leaky_relu"] * 2
    block += ["conv2d", "batch_norm", "residual_shortcut", "conv2d", "batch_norm", "residual_end"]
    block += ["leaky_relu", "max_pool2d"]
    assert kinds == block * 4 + ["flatten", "linear"]
    assert set(program.floats) == {1e-5, 0.1}  # batch norm eps, the slope
    convs = [fields["out_channels"] for k, fields in read_records(program.ints) if k == "conv2d"]
    assert convs[::4] == [2, 5, 10, 20]  # width=2: (w, 2.5 w, 5 w, 10 w)


def test_auto_picks_fused_for_resnet12_and_conv4():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in (narrow_resnet12(torch.float32), models.conv4(5)):
            opt = maml_ext.MetaOptimizer(model, None, inner_lr=0.1, backend="auto")
            assert opt.backend == "fused"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("learn", LEARN_KINDS)
def test_resnet12_meta_gradient_float64(device, learn, first_order, seed):
    """Three 5-way tasks of 16x16 images, two inner steps: fused equals reference to 1e-10."""
    generator = torch.Generator().manual_seed(seed)
    model = narrow_resnet12(torch.float64)
    batch = classification_batch(3, 5, 5, (3, 16, 16), 5, dtype=torch.float64, generator=generator)
    kwargs = dict(inner_lr=0.1, inner_steps=2, first_order=first_order, learn_inner_lr=learn)
    expected_result, expected = meta_gradient_of(model, batch, "reference", seed, **kwargs)
    model.to(device)
    result, actual = meta_gradient_of(model, [b.to(device) for b in batch], "fused", seed, **kwargs)
    assert result.backend == "fused"
    assert relative_error(actual.cpu(), expected) <= 1e-10, seed
    for name in ("query_loss", "support_loss", "query_accuracy"):
        want = getattr(expected_result, name)
        assert relative_error(getattr(result, name).cpu(), want) <= 1e-10, (name, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_resnet12_adapt_and_predict_float64(device, seed):
    generator = torch.Generator().manual_seed(seed)
    model = narrow_resnet12(torch.float64)
    sx, sy, qx, _ = classification_batch(3, 5, 5, (3, 16, 16), 5, generator=generator)
    results = {}
    for backend in ("reference", "fused"):
        opt = maml_ext.MetaOptimizer(model.to(device), None, inner_lr=0.1, backend=backend)
        adapted = opt.adapt(sx.to(device), sy.to(device), steps=3)
        results[backend] = (adapted, opt.predict(adapted, qx.to(device)))
    (ref_adapted, ref_out), (adapted, out) = results["reference"], results["fused"]
    for name, value in ref_adapted.items():
        assert relative_error(adapted[name].cpu(), value.cpu()) <= 1e-10, (name, seed)
    assert out.shape == (3, qx.shape[1], 5)
    assert relative_error(out.cpu(), ref_out.cpu()) <= 1e-10, seed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_resnet12_meta_gradient_float32(device, first_order, seed):
    """float32 with batch norm: fused within 1e-4 of the float32 reference, or (where the float32
    problem is itself ill-conditioned) no further from float64 than twice the reference is."""
    generator = torch.Generator().manual_seed(seed)
    model = narrow_resnet12(torch.float32)
    batch = classification_batch(3, 5, 5, (3, 16, 16), 5, dtype=torch.float32, generator=generator)
    kwargs = dict(inner_lr=0.1, inner_steps=2, first_order=first_order, learn_inner_lr="scalar")
    probe = maml_ext.MetaOptimizer(model, None, backend="reference", **kwargs)
    perturb_rates(probe, torch.Generator().manual_seed(seed))
    gap = smallest_max_pool_gap(probe, *batch[:3])
    if gap < 4 * torch.finfo(torch.float32).eps:
        pytest.skip(f"seed {seed}: a max-pool window's two largest inputs differ by {gap:.1e}")
    batch64 = [b.double() if b.is_floating_point() else b for b in batch]
    _, exact = meta_gradient_of(model.double(), batch64, "reference", seed, **kwargs)
    model.float()
    _, expected = meta_gradient_of(model, batch, "reference", seed, **kwargs)
    model.to(device)
    result, actual = meta_gradient_of(model, [b.to(device) for b in batch], "fused", seed, **kwargs)
    actual = actual.cpu()
    assert result.backend == "fused"
    close = relative_error(actual, expected) <= 1e-4
    as_good = relative_error(actual.double(), exact) <= 2 * relative_error(expected.double(), exact)
    assert close or as_good, (seed, relative_error(actual, expected))


def test_resnet12_widths_and_width():
    standard = models.resnet12(5)
    convs = [m.out_channels for m in standard.modules() if isinstance(m, nn.Conv2d)]
    assert convs[::4] == [64, 160, 320, 640]
    assert standard[-1].in_features == 640 * 5 * 5  # 84x84 leaves 5x5 maps
    narrow = models.resnet12(5, width=8)
    convs = [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert convs[::4] == [8, 20, 40, 80]
    with pytest.raises(ValueError, match="widths: expected four"):
        models.resnet12(5, widths=(8, 16))
    with pytest.raises(ValueError, match="width: expected a positive integer"):
        models.resnet12(5, width=0)
    with pytest.raises(ValueError, match="image_size"):
        models.conv4(5, image_size=8)


# ---- users' own blocks ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """The torchvision style: in-place addition of the identity, ReLU reused, functional calls."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class DownBlock(nn.Module):
    """A projection shortcut written first, F.leaky_relu with a slope, torch.add."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=2)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )

    def forward(self, x):
        return F.leaky_relu(torch.add(self.skip(x), self.body(x)), 0.2)


class Net(nn.Module):
    """A whole model of the user's own, with a nested block and a method-style flatten."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.block = BasicBlock(4)
        self.down = DownBlock(4, 6)
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        x = self.down(self.block(torch.relu(self.stem(x))))
        return self.head(x.flatten(1))


def test_user_blocks_are_recognised():
    kinds = [kind for kind, _ in read_records(compile_program(Net()).ints)]
    assert kinds == [
        "conv2d", "relu",
        "residual_begin", "conv2d", "batch_norm", "relu", "conv2d", "batch_norm",
        "residual_shortcut", "residual_end", "relu",
        "residual_begin", "conv2d",
        "residual_shortcut", "conv2d", "tanh", "conv2d", "residual_end", "leaky_relu",
        "flatten", "linear",
    ]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_user_model_fused_equals_reference_float64(device, first_order, seed):
    generator = torch.Generator().manual_seed(seed)
    model = Net().double()
    batch = classification_batch(3, 3, 4, (2, 6, 6), 3, dtype=torch.float64, generator=generator)
    kwargs = dict(inner_lr=0.1, inner_steps=3, first_order=first_order, learn_inner_lr="per_step")
    _, expected = meta_gradient_of(model, batch, "reference", seed, **kwargs)
    model.to(device)
    result, actual = meta_gradient_of(model, [b.to(device) for b in batch], "fused", seed, **kwargs)
    assert result.backend == "fused"
    assert relative_error(actual.cpu(), expected) <= 1e-10, seed


class Concatenating(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), x], dim=1)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class Scaling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + 0.5 * x


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.other = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        self.other(x)
        return self.conv(x)


@pytest.mark.parametrize(
    "block, named",
    [
        (Concatenating(), r"torch\.cat\(\) in Concatenating\.forward"),
        (Branching(), r"Branching\.forward could not be traced by torch\.fx"),
        (Scaling(), r"_operator\.mul\(\) in Scaling\.forward"),
        (Unused(), r"submodule 'other' in Unused\.forward computes an output"),
    ],
)
def test_unsupported_graphs_are_named_and_auto_falls_back(block, named):
    # Compilation fails before any data runs: the head's size does not matter.
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(UnsupportedModelError, match=rf"layer '0': {named}") as error:
        maml_ext.MetaOptimizer(model, None, inner_lr=0.1, backend="fused")
    assert error.value.layer == "0"
    with pytest.warns(UserWarning, match=r"uses the reference backend: .*layer '0'"):
        opt = maml_ext.MetaOptimizer(model, None, inner_lr=0.1, backend="auto")
    assert opt.backend == "reference"


class Mismatched(nn.Module):
    """Branches whose outputs differ in shape: only the data's shape tells."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.conv(x) + x


def test_branch_shapes_that_differ_are_named_and_change_nothing():
    """MetaOptimizer runs the model on one sample first, so the data's shape is named before any
    step; the fused program checks the branches' shapes itself too (its own callers)."""
    model = nn.Sequential(Mismatched(), nn.Flatten(), nn.Linear(8, 2)).double()
    opt = maml_ext.MetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1, backend="fused"
    )
    before = [p.detach().clone() for p in model.parameters()]
    batch = classification_batch(2, 2, 3, (2, 4, 4), 2)
    with pytest.raises(ValueError, match="support_x: the model does not accept"):
        opt.step(*batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    program = compile_program(model)
    theta = program.flatten({n: p.detach() for n, p in model.named_parameters()}).expand(2, -1)
    sx, sy = batch[:2]
    with pytest.raises(ValueError, match="residual block's main branch gives activations"):
        fused.loss_hvp(program, theta, sx, sy, theta, loss_code=loss_code("cross_entropy"))


@pytest.mark.parametrize(
    "records, message",
    [
        (["residual_end"], "residual_end.*does not close"),
        (["residual_shortcut"], "residual_shortcut.*not inside"),
        (["residual_begin", "residual_shortcut"], "not closed by residual_end"),
        (["residual_begin", "residual_end"], "residual_end.*does not close"),
    ],
)
def test_malformed_residual_records_are_rejected(records, message):
    """The C++ reader checks the nesting of residual records (programs are plain int lists)."""
    good = compile_program(nn.Sequential(nn.Linear(2, 2)))
    codes = [maml_ext.program.RECORDS_BY_NAME[name].code for name in records]
    bad = LayerProgram(good.ints + tuple(codes), good.floats, good.slots, good.num_params)
    theta = torch.zeros(1, good.num_params, dtype=torch.float64)
    x = torch.zeros(1, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"program.*{message}"):
        fused.loss_hvp(bad, theta, x, x.clone(), theta, loss_code=loss_code("mse"))


# ---- random residual stacks ----------------------------------------------------------------------


def _activation(draw):
    return draw(
        st.sampled_from(
            [lambda: nn.ReLU(), lambda: nn.LeakyReLU(0.1), lambda: nn.Tanh(), lambda: nn.Identity()]
        )
    )()


@st.composite
def residual_block(draw, channels, size, nested=False):
    """(block, its output channels, its output side): main = conv (stride 1 or 2) with batch norm
    and an activation mixed in, possibly holding a nested block (stride 1); shortcut = the identity
    where shapes allow, else a 1x1 conv of the same stride, with batch norm mixed in."""
    out = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 2)) if size >= 3 and not nested else 1
    main = [nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=draw(st.booleans()))]
    if draw(st.booleans()):
        main.append(nn.BatchNorm2d(out, track_running_stats=False))
    main.append(_activation(draw))
    new_size = (size - 1) // stride + 1
    if not nested and draw(st.booleans()):
        inner, out, _ = draw(residual_block(out, new_size, nested=True))
        main.append(inner)
    if out == channels and stride == 1 and draw(st.booleans()):
        shortcut = nn.Sequential()  # the identity
    else:
        shortcut = [nn.Conv2d(channels, out, 1, stride=stride, bias=draw(st.booleans()))]
        if draw(st.booleans()):
            shortcut.append(nn.BatchNorm2d(out, track_running_stats=False))
        shortcut = nn.Sequential(*shortcut)
    return Residual(nn.Sequential(*main), shortcut), out, new_size


@st.composite
def residual_models(draw):
    channels, size = draw(st.integers(1, 3)), draw(st.integers(3, 7))
    shape, layers = (channels, size, size), []
    for _ in range(draw(st.integers(1, 2))):
        block, channels, size = draw(residual_block(channels, size))
        layers += [block, _activation(draw)]
        if size >= 2 and draw(st.booleans()):
            layers.append(nn.MaxPool2d(2))
            size //= 2
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    outputs = draw(st.integers(2, 4)) if loss == "cross_entropy" else draw(st.integers(1, 3))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, outputs))
    return seeded_weights(model, draw(WEIGHT_SEEDS)).double(), shape, loss, outputs


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, **COMMON)
@given(
    stack=residual_models(),
    tasks=st.integers(1, 5),
    steps=st.integers(1, 3),
    first_order=st.booleans(),
    learn=st.sampled_from(LEARN_KINDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_residual_stacks_equal_reference_float64(
    device, stack, tasks, steps, first_order, learn, seed
):
    assert_fused_equals_reference(stack, device, tasks, steps, first_order, learn, seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, **COMMON)
@given(stack=residual_models(), tasks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_random_residual_stacks_hvp_equals_jvp_of_grad(device, stack, tasks, seed):
    assert_loss_hvp_equals_forward_over_reverse(stack, device, tasks, seed)

"""MetaOptimizer's contract: bad input raises a ValueError naming the argument and losing nothing;
non-finite steps change nothing; state_dict round trips; extension_info reports the build."""

import copy

import pytest
import torch
from maml_test_utils import classification_batch, conv_net, regression_batch, sinusoid_mlp

import maml_ext

BACKENDS = ["reference", "fused"]


def classifier(backend, **kwargs):
    model = conv_net(ways=3, channels=4)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return maml_ext.MetaOptimizer(model, outer, inner_lr=0.1, backend=backend, **kwargs)


def snapshot(opt):
    return copy.deepcopy(
        {
            "model": opt.model.state_dict(),
            "rates": opt.inner_lr.state_dict(),
            "outer": opt.outer_optimizer.state_dict(),
            "grads": [None if p.grad is None else p.grad.clone() for p in opt.model.parameters()],
        }
    )


def same(a, b):
    """Equal values (a NaN equal to a NaN: a parameter that held one before may still hold it)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def assert_unchanged(opt, before):
    after = snapshot(opt)
    for key, value in before["model"].items():
        assert same(value, after["model"][key]), key
    for key, value in before["rates"].items():
        assert same(value, after["rates"][key]), key
    assert repr(before["outer"]) == repr(after["outer"])
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None and g1 is None) or same(g0, g1)


def good_batch():
    return classification_batch(2, 3, 6, (1, 8, 8), 3)


def with_arg(batch, index, value):
    batch = list(batch)
    batch[index] = value
    return batch


BAD_INPUTS = {
    # name: (make the bad batch, the argument named, a fragment of the message)
    "support_x rank": (
        lambda b: with_arg(b, 0, b[0][:, :, 0, 0, 0]),
        "support_x",
        "at least 3 dimensions",
    ),
    "support_x features": (
        lambda b: with_arg(b, 0, b[0].expand(2, 3, 2, 8, 8)),
        "support_x",
        "the model does not accept per-sample inputs of shape [2, 8, 8]",
    ),
    "query_x task count": (lambda b: with_arg(b, 2, b[2][:1]), "query_x", "expected 2 tasks"),
    "query_x features": (lambda b: with_arg(b, 2, b[2][..., :7]), "query_x", "per-sample features"),
    "support_y shape": (
        lambda b: with_arg(b, 1, b[1][:, :2]),
        "support_y",
        "expected shape [2, 3]",
    ),
    "query_y task count": (lambda b: with_arg(b, 3, b[3][:1]), "query_y", "expected shape [2, 6]"),
    "label out of range": (lambda b: with_arg(b, 1, b[1] + 3), "support_y", "must lie in [0, 2]"),
    "negative label": (lambda b: with_arg(b, 3, b[3] - 3), "query_y", "must lie in [0, 2]"),
    "float labels": (lambda b: with_arg(b, 1, b[1].double()), "support_y", "int64"),
    "dtype mismatch": (lambda b: with_arg(b, 0, b[0].float()), "support_x", "torch.float64"),
    "device mismatch": (lambda b: with_arg(b, 2, b[2].to("meta")), "query_x", "device"),
    "not a tensor": (lambda b: with_arg(b, 0, b[0].tolist()), "support_x", "torch.Tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_argument_and_changes_nothing(backend, case):
    opt = classifier(backend, learn_inner_lr="per_step")
    opt.step(*good_batch())  # so that optimiser state exists and must survive
    before = snapshot(opt)
    make_bad, argument, fragment = BAD_INPUTS[case]
    with pytest.raises(ValueError) as error:
        opt.step(*make_bad(good_batch()))
    assert str(error.value).startswith(argument), str(error.value)
    assert fragment in str(error.value), str(error.value)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_target_shape_is_checked(backend):
    opt = maml_ext.MetaOptimizer(sinusoid_mlp(), None, inner_lr=0.01, loss="mse", backend=backend)
    sx, sy, qx, qy = regression_batch(2, 5, 5)
    with pytest.raises(ValueError, match=r"^query_y: expected shape \[2, 5, 1\]"):
        opt.meta_gradient(sx, sy, qx, qy[..., 0])


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_inner_steps_must_be_a_positive_integer(steps):
    with pytest.raises(
        ValueError, match="inner_steps: expected an integer number of inner steps >= 1"
    ):
        maml_ext.MetaOptimizer(sinusoid_mlp(), None, inner_lr=0.01, inner_steps=steps)
    opt = maml_ext.MetaOptimizer(sinusoid_mlp(), None, inner_lr=0.01, loss="mse")
    sx, sy, _, _ = regression_batch(2, 5, 5)
    with pytest.raises(ValueError, match="^steps: expected an integer"):
        opt.adapt(sx, sy, steps=steps)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"inner_lr": -0.1}, "inner_lr: expected a positive finite number"),
        ({"inner_lr": float("nan")}, "inner_lr: expected a positive finite number"),
        ({"inner_lr": 0.1, "learn_inner_lr": "per_layer"}, "learn_inner_lr: expected one of"),
        (
            {"inner_lr": 0.1, "loss": "hinge"},
            "loss: expected 'cross_entropy', 'mse', 'gaussian_nll' or a callable",
        ),
        ({"inner_lr": 0.1, "backend": "cuda"}, "backend: expected one of"),
    ],
)
def test_bad_settings_are_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        maml_ext.MetaOptimizer(sinusoid_mlp(), None, **kwargs)


@pytest.mark.parametrize("learn", [None, "scalar"])  # fused: the one-op path, the autograd path
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_step_raises_and_changes_nothing(backend, learn):
    opt = classifier(backend, learn_inner_lr=learn)
    opt.step(*good_batch())
    before = snapshot(opt)
    sx, sy, qx, qy = good_batch()
    qx[1, 2, 0, 3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="nothing was applied"):
        opt.step(sx, sy, qx, qy)
    assert_unchanged(opt, before)
    with pytest.raises(FloatingPointError):
        opt.meta_gradient(sx, sy, qx, qy)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("learn", [None, "scalar"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_parameter_is_named_and_changes_nothing(backend, learn):
    """A NaN in the output layer's bias reaches every output: the error names every parameter
    (by its name, in model order) and the step changes nothing."""
    opt = classifier(backend, learn_inner_lr=learn)
    opt.step(*good_batch())
    with torch.no_grad():
        opt.model[-1].bias[1] = float("nan")
    before = snapshot(opt)
    names = [name for name, _ in opt.model.named_parameters()]
    with pytest.raises(FloatingPointError, match="nothing was applied") as error:
        opt.step(*good_batch())
    bad = names + (["inner_lr"] if learn else [])
    assert f"non-finite gradient of {bad}" in str(error.value)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_mismatch(backend):
    opt = classifier(backend, learn_inner_lr="per_parameter")
    for _ in range(2):
        opt.step(*good_batch())
    state = copy.deepcopy(opt.state_dict())
    fresh = classifier(backend, learn_inner_lr="per_parameter")
    fresh.load_state_dict(state)
    batch = good_batch()
    assert torch.equal(opt.step(*batch).query_loss, fresh.step(*batch).query_loss)
    for p, q in zip(opt.model.parameters(), fresh.model.parameters()):
        assert torch.equal(p, q)

    other = classifier(backend, learn_inner_lr="scalar")
    before = snapshot(other)
    with pytest.raises(ValueError, match="learn_inner_lr"):
        other.load_state_dict(state)
    assert_unchanged(other, before)
    broken = copy.deepcopy(state)
    broken["model"]["9.weight"] = broken["model"]["9.weight"][:, :3]
    target = classifier(backend, learn_inner_lr="per_parameter")
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"state\['model'\]\['9.weight'\]: expected shape"):
        target.load_state_dict(broken)
    assert_unchanged(target, before)


def test_meta_gradient_accumulates_like_backward():
    opt = classifier("reference")
    batch = good_batch()
    opt.meta_gradient(*batch)
    once = [p.grad.clone() for p in opt.model.parameters()]
    opt.meta_gradient(*batch)
    for g, p in zip(once, opt.model.parameters()):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-12, atol=0)


def test_extension_info_reports_build():
    info = maml_ext.extension_info()
    assert info["torch_version"] == torch.__version__
    assert info["compiled_ops_loaded"] is True  # the test suite runs against a built extension
    assert isinstance(info["cuda_kernels_compiled"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()
    if not info["cuda_available"]:
        assert "no CUDA device" in info["reason"]

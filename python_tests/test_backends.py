"""The backend objects' contract (maml_ext/backend.py), called directly as MetaOptimizer calls
them: what meta_gradient returns, that the fused backend's two paths (the one-op fixed-rate path
and the differentiable path of learned rates) agree with each other and with the reference, the
finite flag, and the backend choice."""

import warnings

import pytest
import torch
from maml_test_utils import (
    classification_batch,
    conv_net,
    regression_batch,
    relative_error,
    sinusoid_mlp,
)

import maml_ext
from maml_ext.backend import FusedBackend, MetaGradient, ReferenceBackend, choose_backend
from maml_ext.inner_lr import InnerLearningRates
from maml_ext.losses import resolve_loss

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

LEARN_KINDS = [None, "scalar", "per_parameter", "per_step"]
CPU = torch.device("cpu")


def case(kind: str, generator: torch.Generator):
    """(model, loss name, batch): the sinusoid MLP (mse) or a small conv net (cross-entropy)."""
    if kind == "mlp":
        return sinusoid_mlp(), "mse", regression_batch(3, 5, 4, generator=generator)
    return (
        conv_net(ways=3, channels=4, blocks=2, image=8),
        "cross_entropy",
        classification_batch(3, 4, 5, (1, 8, 8), 3, generator=generator),
    )


def rates_for(model, steps: int, learn, generator) -> InnerLearningRates:
    """Inner rates as MetaOptimizer builds them, learned ones moved off their common value."""
    rates = InnerLearningRates(
        {n: p.shape for n, p in model.named_parameters()}, steps, 0.05, learn, dtype=torch.float64
    )
    with torch.no_grad():
        for p in rates.parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, dtype=p.dtype, generator=generator))
    return rates


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("learn", LEARN_KINDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_contract_and_backends_agree(kind, learn, first_order, seed):
    generator = torch.Generator().manual_seed(seed)
    model, loss_name, batch = case(kind, generator)
    rates = rates_for(model, 2, learn, generator)
    params = dict(model.named_parameters())
    loss = resolve_loss(loss_name)
    steps = {}
    for name in ("reference", "fused"):
        backend = choose_backend(name, model, loss, CPU, torch.float64)
        assert backend.name == name and backend.reason is None and not backend.defers_class_range
        step = backend.meta_gradient(params, rates, *batch, steps=2, first_order=first_order)
        assert isinstance(step, MetaGradient)
        # The gradients of every parameter, then of every learned rate, named for messages;
        # nothing is written to .grad (MetaOptimizer decides what to do with them).
        assert [id(t) for t in step.tensors] == [
            id(t) for t in [*params.values(), *rates.parameters()]
        ]
        assert list(step.names) == [*params, *["inner_lr"] * len(list(rates.parameters()))]
        assert [g.shape for g in step.grads] == [t.shape for t in step.tensors]
        assert all(t.grad is None for t in step.tensors)
        assert step.finite.dtype == torch.bool and step.finite.dim() == 0 and bool(step.finite)
        assert step.query_loss.dim() == 0 and step.support_loss.dim() == 0
        assert not step.query_loss.requires_grad
        if loss.is_classification:
            assert step.query_accuracy.dim() == 0 and 0 <= float(step.query_accuracy) <= 1
        else:
            assert step.query_accuracy is None
        steps[name] = step
    reference, fused = steps["reference"], steps["fused"]
    assert relative_error(flat(fused.grads), flat(reference.grads)) <= 1e-10, seed
    for name in ("query_loss", "support_loss", "query_accuracy"):
        if getattr(reference, name) is not None:
            assert relative_error(getattr(fused, name), getattr(reference, name)) <= 1e-10, seed


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_fused_fixed_rate_op_equals_the_differentiable_path(kind, first_order, seed):
    # meta_gradient takes the one-op path for fixed rates; differentiable_step is the path of
    # learned rates (and of the CUDA graph): both must give the same meta-step.
    generator = torch.Generator().manual_seed(seed)
    model, loss_name, batch = case(kind, generator)
    rates = rates_for(model, 3, None, generator)
    params = dict(model.named_parameters())
    backend = choose_backend("fused", model, resolve_loss(loss_name), CPU, torch.float64)
    step = backend.meta_gradient(params, rates, *batch, steps=3, first_order=first_order)
    meta_grad, rate_grads, query_loss, accuracy, support_loss = backend.differentiable_step(
        params, rates, *batch, steps=3, first_order=first_order
    )
    assert rate_grads == ()
    assert relative_error(flat(step.grads), meta_grad) <= 1e-12, seed
    assert relative_error(step.query_loss, query_loss.mean()) <= 1e-12, seed
    assert relative_error(step.support_loss, support_loss.mean()) <= 1e-12, seed
    if step.query_accuracy is not None:
        assert float(step.query_accuracy) == float(accuracy.mean())


@pytest.mark.parametrize("name", ["reference", "fused"])
@pytest.mark.parametrize("learn", [None, "per_step"])
def test_non_finite_step_is_flagged(name, learn, seed):
    generator = torch.Generator().manual_seed(seed)
    model, loss_name, (sx, sy, qx, qy) = case("mlp", generator)
    rates = rates_for(model, 1, learn, generator)
    backend = choose_backend(name, model, resolve_loss(loss_name), CPU, torch.float64)
    qx[1, 2, 0] = float("nan")
    step = backend.meta_gradient(
        dict(model.named_parameters()), rates, sx, sy, qx, qy, steps=1, first_order=False
    )
    assert not bool(step.finite)
    assert not all(bool(torch.isfinite(g).all()) for g in step.grads)


@pytest.mark.parametrize("name", ["reference", "fused"])
@pytest.mark.parametrize("learn", [None, "scalar"])
def test_meta_gradient_does_not_depend_on_grad_mode(name, learn, seed):
    # The meta-gradient is computed whatever the caller's grad mode (autograd runs inside).
    generator = torch.Generator().manual_seed(seed)
    model, loss_name, batch = case("mlp", generator)
    rates = rates_for(model, 2, learn, generator)
    params = dict(model.named_parameters())
    backend = choose_backend(name, model, resolve_loss(loss_name), CPU, torch.float64)
    enabled = backend.meta_gradient(params, rates, *batch, steps=2, first_order=False)
    with torch.no_grad():
        disabled = backend.meta_gradient(params, rates, *batch, steps=2, first_order=False)
    assert torch.equal(flat(disabled.grads), flat(enabled.grads)), seed


def test_fixed_rates_are_built_once_per_steps_and_rate():
    model = sinusoid_mlp()
    backend = choose_backend("fused", model, resolve_loss("mse"), CPU, torch.float64)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    rates = InnerLearningRates(shapes, 2, 0.05, None, dtype=torch.float64)
    table = backend.fixed_rates(rates, 2)
    theta = backend.program.flatten(dict(model.named_parameters()))
    assert torch.equal(table, rates.flat(backend.program.slots, 2, theta))
    assert backend.fixed_rates(rates, 2) is table
    assert backend.fixed_rates(rates, 3).shape == (3, backend.program.num_params)
    other = InnerLearningRates(shapes, 2, 0.1, None, dtype=torch.float64)
    assert torch.equal(backend.fixed_rates(other, 2), torch.full_like(table, 0.1))


def test_choose_backend_objects_and_the_fallback_reason():
    model, mse = sinusoid_mlp(), resolve_loss("mse")
    assert isinstance(choose_backend("reference", model, mse, CPU, torch.float64), ReferenceBackend)
    assert isinstance(choose_backend("auto", model, mse, CPU, torch.float64), FusedBackend)
    custom = resolve_loss(lambda out, y: (out - y).abs().mean())
    with pytest.warns(
        UserWarning, match="backend='auto' uses the reference backend: a custom loss"
    ):
        fallback = choose_backend("auto", model, custom, CPU, torch.float64)
    assert isinstance(fallback, ReferenceBackend) and "custom loss" in fallback.reason
    with pytest.raises(ValueError, match="backend='fused' cannot run here: a custom loss"):
        choose_backend("fused", model, custom, CPU, torch.float64)
    with pytest.raises(ValueError, match="backend: expected one of"):
        choose_backend("cuda", model, mse, CPU, torch.float64)


def test_only_the_fused_backend_on_a_gpu_defers_the_class_range():
    # Deciding needs no GPU: nothing is allocated until a step runs.
    model = conv_net(ways=3, channels=4)
    program = choose_backend("fused", model, resolve_loss("mse"), CPU, torch.float64).program
    cuda = torch.device("cuda", 0)
    assert FusedBackend(
        program, resolve_loss("cross_entropy"), cuda, torch.float32
    ).defers_class_range
    assert not FusedBackend(program, resolve_loss("mse"), cuda, torch.float32).defers_class_range
    assert not FusedBackend(
        program, resolve_loss("cross_entropy"), CPU, torch.float32
    ).defers_class_range
    assert not ReferenceBackend(model, resolve_loss("cross_entropy")).defers_class_range


def test_a_backend_is_picked_once_per_device_and_dtype(seed):
    # The model changes dtype after construction: the optimiser picks anew for the new dtype (and
    # its one fallback warning), and keeps the earlier pick for the earlier dtype.
    model = sinusoid_mlp()
    with pytest.warns(UserWarning, match="custom loss"):
        opt = maml_ext.MetaOptimizer(
            model, None, inner_lr=0.1, loss=lambda out, y: ((out - y) ** 2).mean()
        )
    batch = regression_batch(2, 3, 3, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.meta_gradient(*batch).backend == "reference"
    model.float()
    with pytest.warns(UserWarning, match="custom loss"):
        assert opt.backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.meta_gradient(*[b.float() for b in batch]).backend == "reference"
        model.double()
        assert opt.backend == "reference"


def test_fused_follows_the_model_to_another_dtype(seed):
    model = sinusoid_mlp()
    batch = regression_batch(3, 5, 4, generator=torch.Generator().manual_seed(seed))
    fused = maml_ext.MetaOptimizer(model, None, inner_lr=0.05, loss="mse", backend="fused")
    fused.meta_gradient(*batch)  # the float64 backend is picked (and used) first
    model.float()
    for p in model.parameters():
        p.grad = None
    assert fused.meta_gradient(*[b.float() for b in batch]).backend == "fused"
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert got.dtype == torch.float32
    reference = maml_ext.MetaOptimizer(model, None, inner_lr=0.05, loss="mse", backend="reference")
    for p in model.parameters():
        p.grad = None
    reference.meta_gradient(*[b.float() for b in batch])
    want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(got, want) <= 1e-4, seed

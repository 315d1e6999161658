"""torch.ops.maml_ext.meta_gradient (MetaOptimizer's fixed-rate step in one op) against meta_step:
the same meta-gradient split into the parameters' shapes, the means over tasks, the finiteness
flag; bad parameter lists are named."""

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
from torch import nn

import maml_ext
from maml_ext.program import LOSS_CODES, compile_program

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)


def randomize(model, generator):
    """Random parameters away from the default initialisation (batch-norm weights included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator) * 0.5)
    return model


def mlp_case(generator, dtype=torch.float64):
    model = randomize(sinusoid_mlp(dtype), generator)
    return model, regression_batch(5, 4, 6, dtype=dtype, generator=generator), "mse"


def conv_case(generator, dtype=torch.float64):
    model = randomize(conv_net(ways=3, channels=4, dtype=dtype), generator)
    batch = classification_batch(3, 4, 5, (1, 8, 8), 3, dtype=dtype, generator=generator)
    return model, batch, "cross_entropy"


def both_ops(model, batch, loss, *, steps=2, first_order=False, generator=None):
    """(meta_gradient's outputs, meta_step's outputs) for the same θ, rates and batch."""
    program = compile_program(model)
    params = [p for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    rates = 0.02 * (1 + torch.rand(steps, theta.numel(), dtype=theta.dtype, generator=generator))
    rates = rates.to(theta.device)
    ints, floats, code = program.ints_list, program.floats_list, LOSS_CODES[loss]
    ours = torch.ops.maml_ext.meta_gradient(params, rates, *batch, ints, floats, code, first_order)
    theirs = torch.ops.maml_ext.meta_step(
        theta, rates, *batch, ints, floats, code, first_order, False
    )
    return ours, theirs


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("make_case", [mlp_case, conv_case], ids=["mlp", "conv"])
def test_equals_meta_step(make_case, first_order, device, seed):
    generator = torch.Generator().manual_seed(seed)
    model, batch, loss = make_case(generator)
    model, batch = model.to(device), [b.to(device) for b in batch]
    (grads, query_loss, accuracy, support_loss, finite), theirs = both_ops(
        model, batch, loss, first_order=first_order, generator=generator
    )
    their_loss, their_accuracy, their_support, their_grad, _, _ = theirs
    params = list(model.parameters())
    assert [g.shape for g in grads] == [p.shape for p in params], seed
    assert not any(g.requires_grad for g in grads), seed  # params do: no graph is kept
    assert torch.equal(torch.cat([g.reshape(-1) for g in grads]), their_grad), seed
    for mean, per_task in [(query_loss, their_loss), (support_loss, their_support)]:
        assert mean.dim() == 0 and relative_error(mean, per_task.mean()) <= 1e-12, seed
    if loss == "cross_entropy":
        assert accuracy.dim() == 0 and relative_error(accuracy, their_accuracy.mean()) <= 1e-12, (
            seed
        )
    else:
        assert accuracy.shape == (0,), seed
    assert finite.dtype == torch.bool and finite.dim() == 0 and bool(finite), seed
    assert finite.device == their_grad.device, seed


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("make_case", [mlp_case, conv_case], ids=["mlp", "conv"])
def test_non_finite_parameter_is_flagged(make_case, bad, seed):
    generator = torch.Generator().manual_seed(seed)
    model, batch, loss = make_case(generator)
    params = list(model.parameters())
    # The output bias reaches every output, so the step cannot be finite; elsewhere a ReLU may
    # hide the bad value (an input unit at −inf is dead): there the flag must tell the truth.
    for index in (len(params) - 1, int(torch.randint(0, len(params) - 1, (), generator=generator))):
        original = params[index].detach().clone()
        with torch.no_grad():
            params[index].view(-1)[0] = bad
        (grads, query_loss, *_, finite), _ = both_ops(model, batch, loss, generator=generator)
        truth = bool(query_loss.isfinite()) and all(bool(g.isfinite().all()) for g in grads)
        assert bool(finite) == truth, (seed, index)
        if index == len(params) - 1:
            assert not truth, (seed, index)
        with torch.no_grad():
            params[index].copy_(original)


def test_non_finite_query_loss_alone_is_flagged(seed):
    """A query target of inf: the loss is inf; the flag must say so even where no gradient does
    (the MSE gradient at an infinite target is infinite too, so check the loss directly)."""
    generator = torch.Generator().manual_seed(seed)
    model, (sx, sy, qx, qy), loss = mlp_case(generator)
    qy[0, 0, 0] = float("inf")
    (_, query_loss, *_, finite), _ = both_ops(model, (sx, sy, qx, qy), loss, generator=generator)
    assert bool(torch.isinf(query_loss)) and not bool(finite)


def test_finite_flag_is_exact_where_the_gradient_sum_overflows():
    """Finite gradient elements whose sum overflows float32: the flag must stay true (a test of
    the sum alone would say false)."""
    model = nn.Linear(1, 16, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    # One task, one sample x = 3e38, targets 1: residual −1, loss 1, ∂L/∂W = 2 r x / 16 =
    # −3.75e37 per element (rate 0: the query pass sees the same weights); their sum, −6e38, is
    # beyond float32's 3.4e38.
    x = torch.full((1, 1, 1), 3e38)
    y = torch.ones(1, 1, 16)
    program = compile_program(nn.Sequential(model))
    grads, query_loss, _, _, finite = torch.ops.maml_ext.meta_gradient(
        [model.weight],
        torch.zeros(1, 16),
        x,
        y,
        x,
        y,
        program.ints_list,
        program.floats_list,
        LOSS_CODES["mse"],
        True,
    )
    grad = grads[0]
    assert bool(grad.isfinite().all()) and bool(query_loss.isfinite())
    assert not bool(grad.sum().isfinite())  # the premise
    assert bool(finite)


def test_bad_parameter_lists_are_named(seed):
    generator = torch.Generator().manual_seed(seed)
    model, batch, loss = mlp_case(generator)
    program = compile_program(model)
    params = [p.detach() for p in model.parameters()]
    rates = torch.full((1, program.num_params), 0.01, dtype=torch.float64)

    def call(ps):
        return torch.ops.maml_ext.meta_gradient(
            ps, rates, *batch, program.ints_list, program.floats_list, LOSS_CODES[loss], False
        )

    cases = [
        (params[:-1], "expected the program's 6 parameter tensors, got 5"),
        (params + [params[-1]], "expected the program's 6 parameter tensors, got 7"),
        ([], "expected at least one parameter tensor"),
        (
            [params[0], params[1], params[2][:20], *params[3:]],
            "expected tensor 2 to hold 1600 elements",
        ),
        ([params[0], params[1].float(), *params[2:]], "expected dtype Double, got Float"),
        ([p.long() for p in params], "expected float32 or float64"),
    ]
    for bad, fragment in cases:
        with pytest.raises(ValueError, match=rf"argument 'params': {fragment}"):
            call(bad)
    # and the argument checks of meta_step still name the others
    with pytest.raises(ValueError, match="argument 'inner_lr'"):
        torch.ops.maml_ext.meta_gradient(
            params,
            rates[:, 1:],
            *batch,
            program.ints_list,
            program.floats_list,
            LOSS_CODES[loss],
            False,
        )


def synchronisations(fn) -> int:
    """How many host synchronisations PyTorch's sync debug mode reports while ``fn`` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.parametrize("make_case", [mlp_case, conv_case], ids=["mlp", "conv"])
def test_on_cuda_equals_meta_step_without_host_synchronisation(make_case, seed):
    """The GPU's own concern: the op adds no host synchronisation to meta_step's (the equality
    on every device is test_equals_meta_step's)."""
    generator = torch.Generator().manual_seed(seed)
    model, batch, loss = make_case(generator)
    model = model.cuda()
    batch = [b.cuda() for b in batch]
    program = compile_program(model)
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    rates = torch.full((2, theta.numel()), 0.03, dtype=theta.dtype, device="cuda")
    args = (program.ints_list, program.floats_list, LOSS_CODES[loss], False)
    theirs = torch.ops.maml_ext.meta_step(theta, rates, *batch, *args, False)
    grads, query_loss, accuracy, support_loss, finite = torch.ops.maml_ext.meta_gradient(
        params, rates, *batch, *args
    )
    assert finite.device.type == "cuda" and finite.dtype == torch.bool and bool(finite), seed
    assert torch.equal(torch.cat([g.reshape(-1) for g in grads]), theirs[3]), seed
    assert relative_error(query_loss, theirs[0].mean()) <= 1e-12, seed
    assert relative_error(support_loss, theirs[2].mean()) <= 1e-12, seed
    # The op adds no host synchronisation to meta_step's own (if it has any).
    bare = synchronisations(
        lambda: torch.ops.maml_ext.meta_step(theta, rates, *batch, *args, False)
    )
    ours = synchronisations(lambda: torch.ops.maml_ext.meta_gradient(params, rates, *batch, *args))
    assert ours == bare, (ours, bare)
    with torch.no_grad():
        params[-1].view(-1)[0] = float("nan")
    assert not bool(torch.ops.maml_ext.meta_gradient(params, rates, *batch, *args)[4]), seed

"""max_tasks_per_call: a meta-batch processed in chunks equals the unchunked meta-step (float64
round-off), for both backends, every inner-rate kind, first and second order; "auto" with a
memory_budget picks the chunk the documented estimate predicts; bad arguments are named."""

from __future__ import annotations

import copy

import pytest
import torch
from maml_test_utils import (
    classification_batch,
    conv_net,
    perturb_rates,
    regression_batch,
    sinusoid_mlp,
)

import maml_ext
from maml_ext import task_chunks

KINDS = [None, "scalar", "per_parameter", "per_step"]
BACKENDS = ["fused", "reference"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _pair(model, *, chunk, backend, kind, first_order, loss, steps=2, seed=0):
    """Two MetaOptimizers on identical copies of ``model``: unchunked and chunked."""
    generator = torch.Generator().manual_seed(seed)
    opts = []
    for max_tasks in (None, chunk):
        opt = maml_ext.MetaOptimizer(
            copy.deepcopy(model),
            None,
            inner_lr=0.05,
            inner_steps=steps,
            first_order=first_order,
            loss=loss,
            learn_inner_lr=kind,
            backend=backend,
            max_tasks_per_call=max_tasks,
        )
        opts.append(opt)
    perturb_rates(opts[0], generator)
    opts[1].inner_lr.load_state_dict(opts[0].inner_lr.state_dict())
    return opts


def _grads(opt):
    """Every meta-gradient as one vector: compared relative to its largest entry, since some
    entries are zero up to round-off (a convolution's bias before batch norm)."""
    tensors = (*opt.model.parameters(), *opt.inner_lr.parameters())
    return [torch.cat([p.grad.reshape(-1) for p in tensors])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind, first_order",
    [(kind, False) for kind in KINDS] + [(None, True), ("per_parameter", True)],
)
def test_chunked_sinusoid_equals_unchunked(backend, kind, first_order):
    torch.manual_seed(1)
    whole, chunked = _pair(
        sinusoid_mlp(), chunk=2, backend=backend, kind=kind, first_order=first_order, loss="mse"
    )
    batch = regression_batch(5, 6, 7, generator=torch.Generator().manual_seed(2))  # chunks 2,2,1
    a, b = whole.meta_gradient(*batch), chunked.meta_gradient(*batch)
    assert chunked.tasks_per_call(batch[0], batch[2]) == 2
    for ga, gb in zip(_grads(whole), _grads(chunked), strict=True):
        assert _relative(gb, ga) < 1e-12
    assert _relative(b.query_loss, a.query_loss) < 1e-12
    assert _relative(b.support_loss, a.support_loss) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [None, "per_step"])
def test_chunked_conv_classification_equals_unchunked(backend, kind):
    torch.manual_seed(3)
    whole, chunked = _pair(
        conv_net(ways=3, channels=4, image=8),
        chunk=2,
        backend=backend,
        kind=kind,
        first_order=False,
        loss="cross_entropy",
    )
    batch = classification_batch(5, 3, 4, (1, 8, 8), 3, generator=torch.Generator().manual_seed(4))
    a, b = whole.meta_gradient(*batch), chunked.meta_gradient(*batch)
    for ga, gb in zip(_grads(whole), _grads(chunked), strict=True):
        assert _relative(gb, ga) < 1e-12
    assert _relative(b.query_loss, a.query_loss) < 1e-12
    # accuracies are multiples of 1/20 here: the chunk-weighted mean is that fraction again
    assert abs(b.query_accuracy.item() - a.query_accuracy.item()) < 1e-14
    assert _relative(b.support_loss, a.support_loss) < 1e-12


def test_chunked_steps_track_unchunked():
    torch.manual_seed(5)
    model = sinusoid_mlp()
    opts = []
    for chunk in (None, 3):
        m = copy.deepcopy(model)
        opts.append(
            maml_ext.MetaOptimizer(
                m,
                torch.optim.Adam(m.parameters(), lr=1e-3),
                inner_lr=0.01,
                loss="mse",
                learn_inner_lr="per_step",
                max_tasks_per_call=chunk,
            )
        )
    generator = torch.Generator().manual_seed(6)
    for _ in range(4):
        batch = regression_batch(8, 5, 5, generator=generator)
        for opt in opts:
            opt.step(*batch)
    for pa, pb in zip(opts[0].model.parameters(), opts[1].model.parameters(), strict=True):
        assert _relative(pb.detach(), pa.detach()) < 1e-10


def test_auto_chunk_follows_the_documented_estimate():
    opt = maml_ext.MetaOptimizer(
        sinusoid_mlp(),
        None,
        inner_lr=0.01,
        inner_steps=1,
        loss="mse",
        max_tasks_per_call="auto",
        memory_budget=3 * 107_872 + 100,
    )
    # By hand: P = 40 + 40 + 1600 + 40 + 40 + 1 = 1761 parameters; A = 40+40+40+40+1 = 161
    # activation elements per sample (five leaf modules); K = 1, 10 support + 10 query samples,
    # second order (c = 2), float64: 8 × (4·1761 + 2·(1·10 + 10)·161) = 107 872 bytes per task.
    sx, sy, qx, qy = regression_batch(8, 10, 10, generator=torch.Generator().manual_seed(7))
    assert opt.tasks_per_call(sx, qx) == 3
    assert task_chunks.activation_elements(opt.model, (1,), sx) == 161
    small = maml_ext.MetaOptimizer(
        sinusoid_mlp(),
        None,
        inner_lr=0.01,
        loss="mse",
        max_tasks_per_call="auto",
        memory_budget=10,
    )
    assert small.tasks_per_call(sx, qx) == 1  # never below one task
    large = maml_ext.MetaOptimizer(
        sinusoid_mlp(),
        None,
        inner_lr=0.01,
        loss="mse",
        max_tasks_per_call="auto",
        memory_budget=10**12,
    )
    assert large.tasks_per_call(sx, qx) == 8  # never above the batch
    whole = maml_ext.MetaOptimizer(copy.deepcopy(opt.model), None, inner_lr=0.01, loss="mse")
    a, b = whole.meta_gradient(sx, sy, qx, qy), opt.meta_gradient(sx, sy, qx, qy)
    assert _relative(b.query_loss, a.query_loss) < 1e-12
    for ga, gb in zip(_grads(whole), _grads(opt), strict=True):
        assert _relative(gb, ga) < 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tasks_per_call": 0}, "max_tasks_per_call: expected None, an integer >= 1"),
        ({"max_tasks_per_call": True}, "max_tasks_per_call: expected"),
        ({"max_tasks_per_call": "all"}, "max_tasks_per_call: expected"),
        ({"max_tasks_per_call": "auto"}, "max_tasks_per_call: 'auto' on cpu needs memory_budget"),
        ({"max_tasks_per_call": 2, "memory_budget": 10}, "memory_budget: only used with"),
        ({"max_tasks_per_call": "auto", "memory_budget": -1}, "memory_budget: expected"),
        ({"consistency_check_every": 3}, "consistency_check_every: only used with distributed"),
        ({"distributed": True}, "distributed: True needs torch.distributed.init_process_group"),
        ({"distributed": "gloo"}, "distributed: expected False, True or a"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model = sinusoid_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        maml_ext.MetaOptimizer(model, None, inner_lr=0.01, loss="mse", **kwargs)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)

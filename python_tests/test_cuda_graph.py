"""MetaOptimizer(cuda_graph=True): the option's checks, the signature keying and recapture
decisions (on the CPU, with an eager stand-in for the CUDA capture), and real capture and replay
against the eager fused backend where a GPU is visible."""

import copy

import pytest
import torch
from maml_test_utils import (
    all_grads,
    classification_batch,
    conv_net,
    perturb_rates,
    regression_batch,
    relative_error,
    sinusoid_mlp,
)

import maml_ext
from maml_ext import fused
from maml_ext.backend import choose_backend
from maml_ext.cuda_graph import GraphedFusedBackend, MetaStepGraphs
from maml_ext.losses import resolve_loss
from maml_ext.program import loss_code

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

LEARN_KINDS = [None, "scalar", "per_parameter", "per_step"]


class EagerCapture:
    """CPU stand-in for CudaGraphCapture: "replay" reruns the captured body and writes its result
    into the output captured first, as a graph replay rewrites its static output. The body reads
    the static inputs and the live parameters, so a runner that forgot to copy a new batch in, or
    read stale parameters, gives wrong gradients here too."""

    device_type = "cpu"

    def __call__(self, body, device):
        output = body()

        def replay():
            output.copy_(body())

        return replay, output


def eager_graphs(**kwargs) -> MetaStepGraphs:
    return MetaStepGraphs(capture=EagerCapture(), **kwargs)


def twin_optimizers(model, *, graphed, lr=1e-2, **kwargs):
    """(eager fused optimiser, optimiser whose fused meta-step goes through ``graphed``), on two
    identical copies of ``model``, each with its own Adam."""
    optimizers = []
    for cuda_graph in (False, graphed):
        copy_of = copy.deepcopy(model)
        opt = maml_ext.MetaOptimizer(
            copy_of,
            torch.optim.Adam(copy_of.parameters(), lr=lr),
            backend="fused",
            cuda_graph=cuda_graph,
            **kwargs,
        )
        optimizers.append(opt)
    assert optimizers[1].cuda_graphs is graphed
    perturb = torch.Generator().manual_seed(3)
    perturb_rates(optimizers[0], perturb)
    with torch.no_grad():
        for a, b in zip(optimizers[0].inner_lr.parameters(), optimizers[1].inner_lr.parameters()):
            b.copy_(a)
    return optimizers


def step_both(eager, graphed_opt, batch):
    results = [opt.step(*batch) for opt in (eager, graphed_opt)]
    assert relative_error(all_grads(graphed_opt), all_grads(eager)) <= 1e-12
    for name in ("query_loss", "support_loss"):
        want = getattr(results[0], name)
        assert abs(float(getattr(results[1], name)) - float(want)) <= 1e-12 * max(
            1, abs(float(want))
        )
    if results[0].query_accuracy is None:
        assert results[1].query_accuracy is None
    else:
        assert float(results[1].query_accuracy) == float(results[0].query_accuracy)
    params = [
        torch.cat([p.detach().reshape(-1) for p in opt.model.parameters()])
        for opt in (eager, graphed_opt)
    ]
    assert relative_error(params[1], params[0]) <= 1e-12
    return results


# ---- the option's checks ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "yes", None])
def test_cuda_graph_must_be_a_bool(value):
    with pytest.raises(ValueError, match="cuda_graph: expected True or False"):
        maml_ext.MetaOptimizer(sinusoid_mlp(), None, inner_lr=0.1, loss="mse", cuda_graph=value)


def test_cuda_graph_with_reference_backend_raises():
    with pytest.raises(ValueError, match="cuda_graph: .*backend='reference'"):
        maml_ext.MetaOptimizer(
            sinusoid_mlp(), None, inner_lr=0.1, loss="mse", backend="reference", cuda_graph=True
        )


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_cuda_graph_with_cpu_model_raises(backend):
    with pytest.raises(
        ValueError,
        match="cuda_graph: True needs the model on a CUDA device; its parameters are on cpu",
    ):
        maml_ext.MetaOptimizer(
            sinusoid_mlp(), None, inner_lr=0.1, loss="mse", backend=backend, cuda_graph=True
        )


def test_cuda_graph_where_auto_falls_back_to_reference_raises():
    # (The stand-in capture runs on the CPU, so the device check passes and the backend's fails.)
    with (
        pytest.warns(UserWarning, match="custom loss"),
        pytest.raises(
            ValueError,
            match=r"cuda_graph: True needs the fused backend, but "
            r"backend='auto' uses the reference backend here: a custom loss",
        ),
    ):
        maml_ext.MetaOptimizer(
            sinusoid_mlp(),
            None,
            inner_lr=0.1,
            loss=lambda out, y: (out - y).abs().mean(),
            cuda_graph=eager_graphs(),
        )


def test_cuda_graph_off_and_on():
    opt = maml_ext.MetaOptimizer(sinusoid_mlp(), None, inner_lr=0.1, loss="mse", backend="fused")
    assert opt.cuda_graphs is None
    graphs = eager_graphs(max_graphs=2)
    opt = maml_ext.MetaOptimizer(sinusoid_mlp(), None, inner_lr=0.1, loss="mse", cuda_graph=graphs)
    assert opt.cuda_graphs is graphs and opt.backend == "fused"
    assert len(graphs) == 0 and graphs.captures == 0  # nothing is captured before the first step
    opt.meta_gradient(*regression_batch(2, 5, 5))
    assert len(graphs) == 1 and graphs.captures == 1


def test_graphed_backend_rejects_cpu_parameters():
    # The model was moved off the GPU after construction: the real capture refuses, naming the
    # option.
    model = sinusoid_mlp()
    fused_backend = choose_backend(
        "fused", model, resolve_loss("mse"), torch.device("cpu"), torch.float64
    )
    backend = GraphedFusedBackend(fused_backend, MetaStepGraphs())
    opt = maml_ext.MetaOptimizer(model, None, inner_lr=0.1, loss="mse")
    with pytest.raises(ValueError, match="cuda_graph: True needs the model on a CUDA device"):
        backend.meta_gradient(
            dict(model.named_parameters()),
            opt.inner_lr,
            *regression_batch(2, 5, 5),
            steps=1,
            first_order=False,
        )


@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_max_graphs_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="max_graphs"):
        MetaStepGraphs(max_graphs=value)


# ---- keys and recapture decisions ---------------------------------------------------------------


def test_signature_keys_on_shapes_dtypes_and_settings():
    model = conv_net(channels=4, blocks=1, image=6)
    opt = maml_ext.MetaOptimizer(model, None, inner_lr=0.1, backend="fused")
    program = choose_backend("fused", model, opt.loss, torch.device("cpu"), torch.float64).program
    g = torch.Generator().manual_seed(0)
    batch = classification_batch(3, 5, 7, (1, 6, 6), 5, generator=g)
    key = lambda b, **kw: MetaStepGraphs.signature(  # noqa: E731
        program,
        opt.inner_lr,
        kw.pop("steps", 1),
        b,
        loss_code=loss_code("cross_entropy"),
        first_order=kw.pop("first_order", False),
    )
    base = key(batch)
    # New values, same shapes: the same graph.
    assert key(classification_batch(3, 5, 7, (1, 6, 6), 5, generator=g)) == base
    # Non-contiguous inputs are copied into the static buffers: layout is not part of the key.
    assert key((batch[0].transpose(3, 4), *batch[1:])) == base
    assert key(classification_batch(3, 5, 8, (1, 6, 6), 5, generator=g)) != base  # query size
    assert key(classification_batch(4, 5, 7, (1, 6, 6), 5, generator=g)) != base  # tasks
    assert key((batch[0].float(), *batch[1:])) != base  # dtype
    assert key(batch, steps=2) != base
    assert key(batch, first_order=True) != base
    learned = maml_ext.MetaOptimizer(
        model, None, inner_lr=0.1, backend="fused", learn_inner_lr="scalar"
    )
    assert (
        MetaStepGraphs.signature(
            program,
            learned.inner_lr,
            1,
            batch,
            loss_code=loss_code("cross_entropy"),
            first_order=False,
        )
        != base
    )


def test_replays_equal_eager_over_steps_new_batches_and_shape_changes(seed):
    graphed = eager_graphs()
    eager, with_graph = twin_optimizers(
        conv_net(channels=4, blocks=2, image=8), graphed=graphed, inner_lr=0.1, inner_steps=2
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):  # a fresh batch every step, one shape: one capture
        step_both(eager, with_graph, classification_batch(3, 5, 6, (1, 8, 8), 5, generator=g))
    assert graphed.captures == 1 and len(graphed) == 1
    step_both(eager, with_graph, classification_batch(2, 5, 9, (1, 8, 8), 5, generator=g))
    assert graphed.captures == 2 and len(graphed) == 2
    step_both(eager, with_graph, classification_batch(3, 5, 6, (1, 8, 8), 5, generator=g))
    assert graphed.captures == 2  # the first shape's graph is replayed again


@pytest.mark.parametrize("learn", LEARN_KINDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_rates_are_supported(learn, first_order, seed):
    graphed = eager_graphs()
    eager, with_graph = twin_optimizers(
        sinusoid_mlp(),
        graphed=graphed,
        inner_lr=0.05,
        inner_steps=3,
        loss="mse",
        learn_inner_lr=learn,
        first_order=first_order,
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        results = step_both(eager, with_graph, regression_batch(4, 5, 6, generator=g))
    assert results[1].query_accuracy is None and results[1].backend == "fused"
    assert graphed.captures == 1
    # The rates moved (they are parameters updated in place) and the graph kept reading them.
    if learn is not None:
        for a, b in zip(eager.inner_lr.parameters(), with_graph.inner_lr.parameters()):
            assert relative_error(b.detach(), a.detach()) <= 1e-12


def test_replaced_parameter_storage_recaptures(seed):
    graphed = eager_graphs()
    eager, with_graph = twin_optimizers(sinusoid_mlp(), graphed=graphed, inner_lr=0.05, loss="mse")
    g = torch.Generator().manual_seed(seed)
    step_both(eager, with_graph, regression_batch(4, 5, 6, generator=g))
    for opt in (eager, with_graph):
        layer = opt.model[0]
        layer.weight.data = (
            layer.weight.data.clone()
        )  # new storage: the old graph would read freed memory
    step_both(eager, with_graph, regression_batch(4, 5, 6, generator=g))
    assert graphed.captures == 2 and len(graphed) == 1  # the stale graph was replaced, not kept
    step_both(eager, with_graph, regression_batch(4, 5, 6, generator=g))
    assert graphed.captures == 2


def test_least_recently_used_graph_is_dropped(seed):
    graphed = eager_graphs(max_graphs=2)
    eager, with_graph = twin_optimizers(sinusoid_mlp(), graphed=graphed, inner_lr=0.05, loss="mse")
    g = torch.Generator().manual_seed(seed)
    for query, captures in ((4, 1), (5, 2), (4, 2), (6, 3), (4, 3), (5, 4)):
        step_both(eager, with_graph, regression_batch(3, 5, query, generator=g))
        assert graphed.captures == captures and len(graphed) == min(captures, 2)


@pytest.mark.parametrize("learn", LEARN_KINDS)
def test_graphed_backend_returns_what_fused_meta_loss_gives(learn, seed):
    # The backend called directly, against the eager op's autograd function (an independent path:
    # autograd through the flattening and the rates' construction).
    model = sinusoid_mlp()
    opt = maml_ext.MetaOptimizer(
        model, None, inner_lr=0.05, inner_steps=2, loss="mse", backend="fused", learn_inner_lr=learn
    )
    perturb_rates(opt, torch.Generator().manual_seed(5))
    fused_backend = choose_backend("fused", model, opt.loss, torch.device("cpu"), torch.float64)
    program = fused_backend.program
    params = dict(model.named_parameters())
    tensors = list(params.values()) + list(opt.inner_lr.parameters())
    batch = regression_batch(3, 5, 4, generator=torch.Generator().manual_seed(seed))
    theta = program.flatten(params)
    loss, _, accuracy, support_loss = fused.meta_loss(
        program,
        theta,
        opt.inner_lr.flat(program.slots, 2, theta),
        *batch,
        loss_code=loss_code("mse"),
        first_order=False,
    )
    want = torch.autograd.grad(loss, tensors)
    backend = GraphedFusedBackend(fused_backend, eager_graphs())
    for _ in range(2):  # the capture, then a replay
        step = backend.meta_gradient(params, opt.inner_lr, *batch, steps=2, first_order=False)
        assert step.query_accuracy is None and accuracy is None and bool(step.finite), seed
        assert relative_error(step.query_loss, loss.detach()) <= 1e-12, seed
        assert relative_error(step.support_loss, support_loss.mean()) <= 1e-12, seed
        assert [id(t) for t in step.tensors] == [id(t) for t in tensors]
        assert list(step.names) == list(params) + ["inner_lr"] * (len(tensors) - len(params))
        for got, expected in zip(step.grads, want, strict=True):
            assert got.shape == expected.shape and relative_error(got, expected) <= 1e-12, seed


@pytest.mark.parametrize("learn", [None, "scalar"])
def test_non_finite_replay_raises_and_changes_nothing(learn):
    graphed = eager_graphs()
    _, with_graph = twin_optimizers(
        sinusoid_mlp(), graphed=graphed, inner_lr=0.05, loss="mse", learn_inner_lr=learn
    )
    sx, sy, qx, qy = regression_batch(3, 5, 4, generator=torch.Generator().manual_seed(2))
    with_graph.step(sx, sy, qx, qy)
    before = [
        t.detach().clone()
        for t in (*with_graph.model.parameters(), *with_graph.inner_lr.parameters())
    ]
    qx = qx.clone()
    qx[1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nothing was applied") as error:
        with_graph.step(sx, sy, qx, qy)
    assert graphed.captures == 1  # the replayed graph found it, not a new capture
    names = [name for name, _ in with_graph.model.named_parameters()]
    assert f"non-finite gradient of {names + (['inner_lr'] if learn else [])}" in str(error.value)
    after = [*with_graph.model.parameters(), *with_graph.inner_lr.parameters()]
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))


def test_meta_gradient_accumulates_like_eager(seed):
    graphed = eager_graphs()
    eager, with_graph = twin_optimizers(
        sinusoid_mlp(), graphed=graphed, inner_lr=0.05, loss="mse", learn_inner_lr="per_parameter"
    )
    g = torch.Generator().manual_seed(seed)
    batches = [regression_batch(3, 5, 4, generator=g) for _ in range(2)]
    for opt in (eager, with_graph):
        for batch in batches:  # the second call's gradients add to the first's
            opt.meta_gradient(*batch)
    assert relative_error(all_grads(with_graph), all_grads(eager)) <= 1e-12


# ---- real capture and replay on a GPU ------------------------------------------------------------


def cuda_batch(tasks, support, query, generator, dtype=torch.float64):
    return [
        b.cuda()
        for b in classification_batch(
            tasks, support, query, (1, 8, 8), 5, dtype=dtype, generator=generator
        )
    ]


def cuda_twins(learn, **kwargs):
    model = conv_net(ways=5, channels=8, blocks=2, dtype=torch.float64).cuda()
    optimizers = []
    for cuda_graph in (False, True):
        copy_of = copy.deepcopy(model)
        opt = maml_ext.MetaOptimizer(
            copy_of,
            torch.optim.Adam(copy_of.parameters(), lr=1e-2),
            inner_lr=0.1,
            inner_steps=3,
            backend="fused",
            learn_inner_lr=learn,
            cuda_graph=cuda_graph,
            **kwargs,
        )
        optimizers.append(opt)
    with torch.no_grad():
        for a, b in zip(optimizers[0].inner_lr.parameters(), optimizers[1].inner_lr.parameters()):
            a.mul_(1 + 0.5 * torch.rand_like(a))
            b.copy_(a)
    return optimizers


@pytest.mark.cuda
@pytest.mark.parametrize("learn", LEARN_KINDS)
def test_cuda_graph_replays_equal_eager_fused(learn, seed):
    eager, with_graph = cuda_twins(learn)
    assert with_graph.cuda_graphs is not None
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):  # fresh batches, one shape: one capture, outer Adam steps in between
        step_both(eager, with_graph, cuda_batch(4, 5, 6, g))
    assert with_graph.cuda_graphs.captures == 1
    step_both(eager, with_graph, cuda_batch(3, 5, 9, g))  # a new shape captures anew
    step_both(eager, with_graph, cuda_batch(4, 5, 6, g))  # and the first one replays again
    assert with_graph.cuda_graphs.captures == 2


@pytest.mark.cuda
def test_cuda_graph_first_order_and_replaced_storage(seed):
    eager, with_graph = cuda_twins(None, first_order=True)
    g = torch.Generator().manual_seed(seed)
    step_both(eager, with_graph, cuda_batch(4, 5, 6, g))
    for opt in (eager, with_graph):
        opt.model[0].weight.data = opt.model[0].weight.data.clone()
    step_both(eager, with_graph, cuda_batch(4, 5, 6, g))
    assert with_graph.cuda_graphs.captures == 2 and len(with_graph.cuda_graphs) == 1

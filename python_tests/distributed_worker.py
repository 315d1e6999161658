"""One rank of the gloo process groups that python_tests/test_distributed.py starts on loopback.

Run as ``python distributed_worker.py RANK WORLD_SIZE PORT OUT_DIR TIMEOUT_S [fail]``; the test
process hosts the TCPStore (as torchrun's agent does). Every case runs in the same processes (a
process group costs seconds to start on a busy machine); each rank writes what it measured to
OUT_DIR/rank{RANK}.json, and with ``fail`` rank 1 then raises mid-run, so the others must fail
naming it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# This checkout's maml_ext and the tests' helpers, whatever the installed one is.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from maml_test_utils import (  # noqa: E402
    classification_batch,
    conv_net,
    perturb_rates,
    regression_batch,
    sinusoid_mlp,
)

import maml_ext  # noqa: E402
from maml_ext import distributed as dist_meta  # noqa: E402

SHARDS = {2: [3, 4], 3: [1, 2, 4]}  # uneven shards of one meta-batch per world size
KINDS = [None, "scalar", "per_parameter", "per_step"]


def shard(batch, rank, world):
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    return [t[start : start + sizes[rank]] for t in batch]


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def flat_grads(opt):
    tensors = (*opt.model.parameters(), *opt.inner_lr.parameters())
    return torch.cat([p.grad.reshape(-1) for p in tensors])


def flat_params(opt):
    tensors = (*opt.model.parameters(), *opt.inner_lr.parameters())
    return torch.cat([p.detach().reshape(-1) for p in tensors])


def build(model, rank, **kwargs):
    return maml_ext.MetaOptimizer(model, None, inner_lr=0.05, inner_steps=2, **kwargs)


def meta_gradient_cases(rank, world, results):
    """The distributed meta-gradient against one process's on the concatenated batch."""
    for backend in ("fused", "reference"):
        for kind in KINDS:
            for model_name in ("mlp", "mlp-first-order", "conv"):
                if model_name != "mlp" and kind not in (None, "per_step"):
                    continue
                torch.manual_seed(100 + rank)  # different on every rank: the broadcast fixes it
                if model_name.startswith("mlp"):
                    model, loss = sinusoid_mlp(), "mse"
                    batch = regression_batch(
                        sum(SHARDS[world]), 5, 6, generator=torch.Generator().manual_seed(7)
                    )
                else:
                    model, loss = conv_net(ways=3, channels=4, image=8), "cross_entropy"
                    batch = classification_batch(
                        sum(SHARDS[world]),
                        3,
                        4,
                        (1, 8, 8),
                        3,
                        generator=torch.Generator().manual_seed(7),
                    )
                first_order = model_name == "mlp-first-order"
                settings = dict(
                    loss=loss, learn_inner_lr=kind, backend=backend, first_order=first_order
                )
                opt = build(model, rank, distributed=True, **settings)
                perturb_rates(opt, torch.Generator().manual_seed(8))  # the same on every rank
                single = build(copy.deepcopy(opt.model), rank, **settings)
                single.inner_lr.load_state_dict(opt.inner_lr.state_dict())
                got = opt.meta_gradient(*shard(batch, rank, world))
                want = single.meta_gradient(*batch)
                key = f"{backend}/{kind}/{model_name}"
                results[key] = {
                    "grad": relative(flat_grads(opt), flat_grads(single)),
                    "query_loss": relative(got.query_loss, want.query_loss),
                    "support_loss": relative(got.support_loss, want.support_loss),
                }
                if want.query_accuracy is not None:
                    results[key]["accuracy"] = abs(
                        got.query_accuracy.item() - want.query_accuracy.item()
                    )


class EagerCapture:
    """The CPU stand-in for a CUDA graph capture of python_tests/test_cuda_graph.py: "replay"
    reruns the body and writes into the output captured first, as a replay rewrites it."""

    device_type = "cpu"

    def __call__(self, body, device):
        output = body()

        def replay():
            output.copy_(body())

        return replay, output


def graphed_case(rank, world, results):
    """cuda_graph's path (with the eager stand-in) composed with chunks and the all-reduce, which
    runs after each replay, outside the graph: equal to one eager process."""
    from maml_ext.cuda_graph import MetaStepGraphs

    for kind in (None, "per_step"):
        torch.manual_seed(600 + rank)
        opt = build(
            sinusoid_mlp(),
            rank,
            loss="mse",
            learn_inner_lr=kind,
            backend="fused",
            distributed=True,
            max_tasks_per_call=2,
            cuda_graph=MetaStepGraphs(capture=EagerCapture()),
        )
        single = build(copy.deepcopy(opt.model), rank, loss="mse", learn_inner_lr=kind)
        batch = regression_batch(
            sum(SHARDS[world]), 5, 6, generator=torch.Generator().manual_seed(13)
        )
        for _ in range(5):  # past the warm-up calls: the later ones replay
            for p in (*opt.model.parameters(), *opt.inner_lr.parameters()):
                p.grad = None
            got = opt.meta_gradient(*shard(batch, rank, world))
        want = single.meta_gradient(*batch)
        results[f"graphed/{kind}"] = {
            "grad": relative(flat_grads(opt), flat_grads(single)),
            "query_loss": relative(got.query_loss, want.query_loss),
            "captures": opt.cuda_graphs.captures,
        }


def steps_case(rank, world, results):
    """Several outer steps (Adam, learned per-step rates, chunks of 2 tasks within each rank, the
    consistency check every step): every rank's parameters bitwise equal, and the single-process
    run's to round-off."""
    for backend in ("fused", "reference"):
        torch.manual_seed(200 + rank)
        model = sinusoid_mlp()
        opt = maml_ext.MetaOptimizer(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-3),
            inner_lr=0.01,
            loss="mse",
            learn_inner_lr="per_step",
            backend=backend,
            distributed=True,
            consistency_check_every=1,
            max_tasks_per_call=2,
        )
        single_model = copy.deepcopy(model)
        single = maml_ext.MetaOptimizer(
            single_model,
            torch.optim.Adam(single_model.parameters(), lr=1e-3),
            inner_lr=0.01,
            loss="mse",
            learn_inner_lr="per_step",
            backend=backend,
        )
        initial = flat_params(opt).clone()
        generator = torch.Generator().manual_seed(9)
        for _ in range(4):
            batch = regression_batch(sum(SHARDS[world]), 5, 5, generator=generator)
            opt.step(*shard(batch, rank, world))
            single.step(*batch)
        mine = flat_params(opt)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        results[f"steps/{backend}"] = {
            "bitwise_equal_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
            "vs_single": relative(mine, flat_params(single)),
            "moved": relative(mine, initial),
            "communication_s": opt.reducer.last_communication_s,
        }


def non_finite_case(rank, world, results):
    """A NaN in rank 1's shard: every rank raises naming rank 1, and nothing is applied."""
    torch.manual_seed(300)
    model = sinusoid_mlp()
    opt = maml_ext.MetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner_lr=0.01,
        loss="mse",
        distributed=True,
    )
    before = flat_params(opt).clone()
    batch = shard(regression_batch(sum(SHARDS[world]), 5, 5), rank, world)
    if rank == 1:
        batch[2][0, 0, 0] = float("nan")
    try:
        opt.step(*batch)
        results["non_finite"] = "no error"
    except FloatingPointError as error:
        results["non_finite"] = str(error)
    results["non_finite_unchanged"] = torch.equal(before, flat_params(opt))


def divergence_case(rank, world, results):
    torch.manual_seed(400)
    opt = build(sinusoid_mlp(), rank, loss="mse", distributed=True, consistency_check_every=5)
    opt.reducer.check_consistency(list(opt.model.parameters()), force=True)  # equal: passes
    if rank == world - 1:
        with torch.no_grad():
            next(opt.model.parameters())[0, 0] += 1e-12
    try:
        opt.reducer.check_consistency(list(opt.model.parameters()), force=True)
        results["diverged"] = "no error"
    except dist_meta.RankDivergedError as error:
        results["diverged"] = str(error)


def evaluation_case(rank, world, results):
    """Few-shot evaluation split across ranks and gathered equals one process's, task by task."""
    from types import SimpleNamespace

    from maml_ext.experiments.fewshot.evaluate import evaluate_tasks
    from maml_ext.experiments.runtime import ONE_PROCESS, current_ranks

    generator = torch.Generator().manual_seed(10)
    dataset = SimpleNamespace(
        images=torch.randn(40, 1, 8, 8, dtype=torch.float64, generator=generator),
        labels=torch.arange(10).repeat_interleave(4),
    )
    preset = SimpleNamespace(name="tiny", ways=3, shots=1, queries=2)
    torch.manual_seed(11)
    meta = maml_ext.MetaOptimizer(
        conv_net(ways=3, channels=4, image=8), None, inner_lr=0.1, loss="cross_entropy"
    )
    options = dict(tasks=60, steps=[0, 1, 2], seed=12)  # chunks of 25, 25, 10 tasks
    split = evaluate_tasks(meta, dataset, preset, ranks=current_ranks(), **options)
    whole = evaluate_tasks(meta, dataset, preset, ranks=ONE_PROCESS, **options)
    results["evaluation_equal"] = all(
        torch.equal(split[k][name], whole[k][name]) and split[k][name].shape[0] == 60
        for k in whole
        for name in ("accuracy", "loss")
    )


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    out, timeout = Path(sys.argv[4]), float(sys.argv[5])
    fail = len(sys.argv) > 6 and sys.argv[6] == "fail"
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
    )
    results = {}
    try:
        meta_gradient_cases(rank, world, results)
        steps_case(rank, world, results)
        graphed_case(rank, world, results)
        non_finite_case(rank, world, results)
        divergence_case(rank, world, results)
        evaluation_case(rank, world, results)
    except BaseException:
        results["error"] = traceback.format_exc()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    if not fail:
        dist.barrier()
        return 0
    # A training loop where rank 1 raises before its third step; the others wait in the step.
    torch.manual_seed(500)
    model = sinusoid_mlp()
    opt = maml_ext.MetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        inner_lr=0.01,
        loss="mse",
        distributed=True,
    )
    try:
        for iteration in range(5):
            if rank == 1 and iteration == 2:
                raise RuntimeError("the data pipeline of this rank broke")
            opt.step(*shard(regression_batch(sum(SHARDS[world]), 5, 5), rank, world))
    except BaseException as error:
        if not isinstance(error, dist_meta.RankFailedError):
            dist_meta.report_failure(error)
        report = {"error": f"{type(error).__name__}: {error}", "time": time.time()}
        (out / f"failure{rank}.json").write_text(json.dumps(report))
        os._exit(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())

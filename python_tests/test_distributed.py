"""MetaOptimizer(distributed=True) on gloo, 2 and 3 processes on loopback with uneven shards:
the meta-gradient equals one process's on the concatenated batch (float64, 1e-12 relative),
fused and reference, every inner-rate kind, first and second order; after several steps the
ranks' parameters are bitwise equal and equal the single-process run's; a non-finite shard,
diverged parameters and a rank raising mid-run are named on every rank, within the timeout;
few-shot evaluation split across ranks equals one process's. The CLI under torchrun: sinusoid
on 2 processes survives a worker killed with SIGKILL (--max-restarts 1) by resuming from its
checkpoint, which then loads and resumes in one process.

Each world size is one set of processes running every case (python_tests/distributed_worker.py);
the tests below read what the ranks measured."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
GLOO_TIMEOUT_S = 30  # init_process_group(timeout=...): how long a rank waits for a dead peer
JOIN_TIMEOUT_S = 240  # the whole run of one world, on a busy 2-core machine

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def _run_world(world: int, out: Path, *, fail: bool) -> dict:
    # The test hosts the store, as torchrun's agent does, so it outlives any rank.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    args = [str(world), str(store.port), str(out), str(GLOO_TIMEOUT_S)] + (["fail"] if fail else [])
    start = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs, codes = [], []
    try:
        for process in processes:
            remaining = max(1.0, JOIN_TIMEOUT_S - (time.monotonic() - start))
            output, _ = process.communicate(timeout=remaining)
            outputs.append(output)
            codes.append(process.returncode)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    ranks = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results:\n{outputs[rank]}"
        ranks.append(json.loads(path.read_text()))
        assert "error" not in ranks[-1], ranks[-1]["error"]
    failures = {
        rank: json.loads((out / f"failure{rank}.json").read_text())
        for rank in range(world)
        if (out / f"failure{rank}.json").exists()
    }
    return {
        "ranks": ranks,
        "codes": codes,
        "outputs": outputs,
        "failures": failures,
        "seconds": time.monotonic() - start,
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def world(request, tmp_path_factory):
    size = request.param
    # The 3-rank world ends with rank 1 raising mid-run.
    return size, _run_world(size, tmp_path_factory.mktemp(f"world{size}"), fail=size == 3)


def test_meta_gradient_equals_one_process_on_the_concatenated_batch(world):
    size, run = world
    for rank, results in enumerate(run["ranks"]):
        cases = [key for key in results if key.count("/") == 2]
        # backends × (MLP second order: 4 rate kinds, MLP first order: 2, conv: 2)
        assert len(cases) == 2 * (4 + 2 + 2)
        for key in cases:
            errors = results[key]
            assert errors["grad"] < 1e-12, (size, rank, key, errors)
            assert errors["query_loss"] < 1e-12, (size, rank, key, errors)
            assert errors["support_loss"] < 1e-12, (size, rank, key, errors)
            if key.endswith("conv"):
                assert errors["accuracy"] < 1e-14, (size, rank, key, errors)


def test_cuda_graph_path_with_chunks_and_all_reduce_equals_one_process(world):
    # The graph capture is the CPU stand-in of test_cuda_graph.py; the all-reduce runs after it.
    size, run = world
    for results in run["ranks"]:
        for kind in ("None", "per_step"):
            case = results[f"graphed/{kind}"]
            assert case["captures"] >= 1, case
            assert case["grad"] < 1e-12 and case["query_loss"] < 1e-12, (size, kind, case)


def test_steps_leave_bitwise_identical_parameters(world):
    size, run = world
    for backend in ("fused", "reference"):
        for results in run["ranks"]:
            case = results[f"steps/{backend}"]
            assert case["bitwise_equal_ranks"], (size, backend)
            assert case["moved"] > 1e-6  # the steps changed something
            assert case["vs_single"] < 1e-10, (size, backend, case)


def test_non_finite_shard_is_named_on_every_rank(world):
    _, run = world
    for results in run["ranks"]:
        assert "non-finite meta-step on rank(s) [1]" in results["non_finite"]
        assert results["non_finite_unchanged"]


def test_diverged_parameters_are_named_on_every_rank(world):
    size, run = world
    for results in run["ranks"]:
        assert f"the parameters of rank(s) [{size - 1}] differ from rank 0's" in results["diverged"]


def test_fewshot_evaluation_split_across_ranks_equals_one_process(world):
    _, run = world
    for results in run["ranks"]:
        assert results["evaluation_equal"]


def test_a_rank_raising_makes_the_others_fail_naming_it(world):
    size, run = world
    if size != 3:
        pytest.skip("the 3-rank world runs the failure")
    assert all(code != 0 for code in run["codes"]), run["outputs"]
    failures = run["failures"]
    assert "the data pipeline of this rank broke" in failures[1]["error"]
    for rank in (0, 2):
        assert "RankFailedError" in failures[rank]["error"], failures
        assert (
            "rank 1 failed: RuntimeError: the data pipeline of this rank broke"
            in (failures[rank]["error"])
        )
        # Within the group's timeout of rank 1's failure, not after a hang.
        assert failures[rank]["time"] - failures[1]["time"] < GLOO_TIMEOUT_S


# ---- the CLI under torchrun --------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers in /proc")
def test_torchrun_sinusoid_survives_a_killed_worker_and_resumes_with_another_world_size(
    tmp_path,
):
    import os
    import signal

    import torch

    from maml_ext import cli
    from maml_ext.experiments import sinusoid

    out = tmp_path / "run"
    checkpoint = out / sinusoid.CHECKPOINT_NAME
    iterations = 600
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "maml_ext",
        "train",
        "sinusoid",
        "--iterations",
        str(iterations),
        "--checkpoint-every",
        "25",
        "--out",
        str(out),
        "--dist-timeout",
        "30",
    ]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    start = time.monotonic()
    agent = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Kill one worker (SIGKILL: no chance to clean up) once a checkpoint exists.
        while not checkpoint.exists():
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() - start < JOIN_TIMEOUT_S, "no checkpoint appeared"
            time.sleep(0.05)
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = agent.communicate(timeout=JOIN_TIMEOUT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, output
    assert "resuming sinusoid from iteration" in output, output
    state = torch.load(checkpoint, weights_only=True)
    assert state["iteration"] == iterations and state["world_size"] == 2
    assert json.loads((out / "sinusoid_eval.json").read_text())["world_size"] == 2
    # The final checkpoint loads into a MetaOptimizer ...
    model = sinusoid.make_sinusoid_model().double()
    meta = __import__("maml_ext").MetaOptimizer(
        model, torch.optim.Adam(model.parameters()), inner_lr=0.01, loss="mse"
    )
    meta.load_state_dict(state["meta_optimizer"])
    # ... and the run continues in one process (another world size) from it.
    assert (
        cli.main(
            [
                "train",
                "sinusoid",
                "--resume",
                "--iterations",
                str(iterations + 10),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert torch.load(checkpoint, weights_only=True)["iteration"] == iterations + 10


# ---- what the CLI's runs across processes rest on, in one process -------------------------------


def test_shares_cover_the_meta_batch_and_streams_differ():
    from maml_ext.experiments.runtime import Ranks

    for world in (1, 2, 3, 7):
        for total in (world, 10, 25, 32):
            shares = [Ranks(rank, world).share(total) for rank in range(world)]
            assert [first for first, _ in shares] == [
                sum(count for _, count in shares[:rank]) for rank in range(world)
            ]
            counts = [count for _, count in shares]
            assert sum(counts) == total and max(counts) - min(counts) <= 1 and min(counts) >= 1
    seeds = {Ranks(r, 3).stream_seed(0, iteration) for r in range(3) for iteration in range(50)}
    assert len(seeds) == 150
    assert Ranks(1, 3).stream_seed(5, 7) == Ranks(1, 2).stream_seed(5, 7)  # any world size


def test_sinusoid_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path):
    import torch

    from maml_ext.experiments import sinusoid

    options = dict(eval_tasks=5, plot_tasks=0, progress=False, verbose=False, log_every=5)
    sinusoid.train_sinusoid(iterations=20, out_dir=str(tmp_path / "whole"), **options)
    sinusoid.train_sinusoid(
        iterations=10, checkpoint_every=4, out_dir=str(tmp_path / "split"), **options
    )
    sinusoid.train_sinusoid(iterations=20, resume=True, out_dir=str(tmp_path / "split"), **options)
    whole = torch.load(tmp_path / "whole" / "sinusoid_models.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "sinusoid_models.pt", weights_only=True)
    for name, value in whole["maml"].items():
        assert torch.equal(value, split["maml"][name]), name
    state = torch.load(tmp_path / "split" / sinusoid.CHECKPOINT_NAME, weights_only=True)
    assert state["iteration"] == 20 and state["world_size"] == 1
    curves = [
        json.loads((tmp_path / run / "sinusoid_eval.json").read_text())["train_curves"]["MAML"]
        for run in ("whole", "split")
    ]
    assert curves[0] == curves[1]
    with pytest.raises(Exception, match="cannot change to 7"):
        sinusoid.train_sinusoid(
            iterations=30, resume=True, seed=7, out_dir=str(tmp_path / "split"), **options
        )

"""Meta-steps per second with the global meta-batch fixed: one process with 2 intra-op threads
against 2 processes (torch.distributed, gloo on loopback) with 1 thread each, and the share of a
step spent in the all-reduce.

    python bench/distributed_scaling.py --all [--steps 200] [--omniglot-steps 8] [--data-dir DIR]

runs every configuration as a subprocess and prints a Markdown table. One configuration:

    python bench/distributed_scaling.py --workload sinusoid --threads 2
    torchrun --standalone --nproc-per-node 2 bench/distributed_scaling.py --workload omniglot

Workloads (the presets' own shapes, fused backend, second order, Adam):
- sinusoid: MLP 1-40-40-1, meta-batch 25, K = 1, 10 support + 10 query points;
- omniglot: the omniglot-5w1s preset (conv4, 64 channels, 28×28), meta-batch 32, K = 1, tasks
  from the real Omniglot training split (--data-dir; the loading is not timed).

Per configuration: ``--warmup`` steps, then ``--steps`` timed steps; steps/s is the timed steps
over their wall time on rank 0. "all-reduce" is the mean wall time of the MetaOptimizer's
all-reduce per step (MetaGradientReducer.last_communication_s: the transfer plus any wait for the
slower rank); "pure all-reduce" is the same buffer all-reduced right after a barrier, the
transfer alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# As the tests find it: $MAML_EXT_OMNIGLOT_DIR, else shared/data/omniglot beside the checkout
# (or beside the worktrees' folder).
DEFAULT_OMNIGLOT = os.environ.get("MAML_EXT_OMNIGLOT_DIR") or next(
    (
        str(base / "shared" / "data" / "omniglot")
        for base in (ROOT.parent, ROOT.parent.parent)
        if (base / "shared" / "data" / "omniglot").is_dir()
    ),
    str(ROOT.parent / "shared" / "data" / "omniglot"),
)


def _sinusoid(rank_share: int, meta_batch: int):
    from maml_ext.experiments.sinusoid import make_sinusoid_model
    from maml_ext.tasks.sinusoid import Sinusoid

    source = Sinusoid(support=10, query=10, seed=1)
    torch.manual_seed(0)
    model = make_sinusoid_model()

    def batch():
        b = source.sample(rank_share)
        return b.support_x, b.support_y, b.query_x, b.query_y

    return model, "mse", 0.01, 1, batch


def _omniglot(rank_share: int, data_dir: str):
    from maml_ext.experiments.fewshot.data import load_split, make_sampler
    from maml_ext.experiments.presets import get_preset

    preset = get_preset("omniglot-5w1s")
    data = load_split(preset, data_dir, "train")
    sampler = make_sampler(data, preset, rank_share, 1, "cpu")
    torch.manual_seed(0)
    model = preset.build_model()

    def batch():
        b = sampler.sample()
        return b.support_x, b.support_y, b.query_x, b.query_y

    return model, "cross_entropy", preset.inner_lr, preset.inner_steps, batch


def run_one(args) -> dict:
    import torch.distributed as dist

    import maml_ext
    from maml_ext.experiments.runtime import Ranks

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    ranks = Ranks(dist.get_rank(), world) if world > 1 else Ranks()
    meta_batch = 25 if args.workload == "sinusoid" else 32
    _, share = ranks.share(meta_batch)
    if args.workload == "sinusoid":
        model, loss, inner_lr, steps, batch = _sinusoid(share, meta_batch)
    else:
        model, loss, inner_lr, steps, batch = _omniglot(share, args.data_dir)
    opt = maml_ext.MetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        inner_lr=inner_lr,
        inner_steps=steps,
        loss=loss,
        backend="fused",
        distributed=ranks.distributed,
    )
    batches = [batch() for _ in range(args.warmup + args.steps)]  # sampling is not timed
    for b in batches[: args.warmup]:
        opt.step(*b)
    if ranks.distributed:
        dist.barrier()
    communication = 0.0
    start = time.perf_counter()
    for b in batches[args.warmup :]:
        opt.step(*b)
        communication += opt.reducer.last_communication_s if opt.reducer else 0.0
    seconds = time.perf_counter() - start
    result = {
        "workload": args.workload,
        "processes": world,
        "threads": args.threads,
        "meta_batch": meta_batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_per_s": args.steps / seconds,
        "step_ms": 1e3 * seconds / args.steps,
        "allreduce_ms": 1e3 * communication / args.steps,
    }
    if ranks.distributed:
        buffer = torch.zeros(result["parameters"] + 4 + world)
        pure = []
        for _ in range(20):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buffer)
            pure.append(time.perf_counter() - t)
        result["pure_allreduce_ms"] = 1e3 * sorted(pure)[len(pure) // 2]
        dist.destroy_process_group()
    return result


def run_all(args) -> None:
    rows = []
    for workload in ("sinusoid", "omniglot"):
        for processes, threads in ((1, 2), (2, 1)):
            common = [
                str(Path(__file__).resolve()),
                "--workload",
                workload,
                "--threads",
                str(threads),
                "--steps",
                str(args.steps if workload == "sinusoid" else args.omniglot_steps),
                "--warmup",
                str(args.warmup),
                "--data-dir",
                str(args.data_dir),
            ]
            if processes == 1:
                command = [sys.executable, *common]
            else:
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    str(processes),
                    *common,
                ]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            output = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, check=True
            ).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| workload | processes × threads | meta-steps/s | ms/step | all-reduce ms/step "
        "(share) | pure all-reduce ms |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = f"{r['allreduce_ms']:.2f} ({100 * r['allreduce_ms'] / r['step_ms']:.0f} %)"
        pure = f"{r['pure_allreduce_ms']:.3f}" if "pure_allreduce_ms" in r else "-"
        print(
            f"| {r['workload']} (T={r['meta_batch']}, {r['parameters']} params) | "
            f"{r['processes']} × {r['threads']} | {r['steps_per_s']:.3g} | {r['step_ms']:.4g} | "
            f"{share if r['processes'] > 1 else '-'} | {pure} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="run every configuration")
    parser.add_argument("--workload", choices=("sinusoid", "omniglot"), default="sinusoid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="timed steps (sinusoid)")
    parser.add_argument("--omniglot-steps", type=int, default=8, help="timed steps (--all)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data-dir", default=str(DEFAULT_OMNIGLOT))
    args = parser.parse_args()
    if args.all:
        run_all(args)
        return
    result = run_one(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

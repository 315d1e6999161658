"""Meta-RL navigation from one seed under different meta-gradient estimators: training returns by
blocks of iterations (bench/NOTES.md, "first order holds, second order degrades").

    .venv/bin/python bench/rl_inner_estimators.py --iterations 160 [--seed 0] [--runs DIR] \\
        [--variants reinforce lvc first-order]

Each variant trains ``train_rl("rl-navigation2d", seed=SEED, pretrain=False, threads=1)`` in
its own folder (``reinforce``: the paper's exact second-order meta-gradient of the sampled
inner loss; ``lvc``: ProMP's low-variance curvature, ``inner_estimator="lvc"``; ``first-order``:
J = I), or reads the folder's log when the run is already there, then prints the mean pre- and
post-adaptation return and KL of each block of ``--block`` iterations. Training is
deterministic on the CPU at one thread, so a variant's blocks repeat run for run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "reinforce": {"inner_estimator": "reinforce", "first_order": False},
    "lvc": {"inner_estimator": "lvc", "first_order": False},
    "first-order": {"inner_estimator": "reinforce", "first_order": True},
}


def block_means(log: Path, block: int) -> list[tuple[int, int, float, float, float]]:
    """(first, last iteration, mean pre return, mean post return, mean KL) per block."""
    with log.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["phase"] == "maml"]
    blocks = []
    for start in range(0, len(rows), block):
        part = rows[start : start + block]

        def mean(key, part=part):
            return sum(float(row[key]) for row in part) / len(part)

        blocks.append(
            (start, start + len(part) - 1, mean("pre_return"), mean("post_return"), mean("kl"))
        )
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=160)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/rl_inner_estimators")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()

    from maml_ext.rl.train import train_rl

    for name in args.variants:
        out = Path(args.runs) / (name if args.seed == 0 else f"{name}-seed{args.seed}")
        log = out / "log.csv"
        if not log.exists():
            train_rl(
                "rl-navigation2d",
                out_dir=str(out),
                iterations=args.iterations,
                seed=args.seed,
                pretrain=False,
                threads=1,
                progress=False,
                verbose=False,
                **VARIANTS[name],
            )
        print(f"{name}: mean training return before / after adaptation, and KL")
        for first, last, pre, post, kl in block_means(log, args.block):
            print(f"  {first:4d}-{last:<4d} {pre:7.1f} / {post:7.1f}   KL {kl:.4f}")


if __name__ == "__main__":
    main()

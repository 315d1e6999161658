"""2D navigation by the scale of the policy's actions: 0.1 (the preset's, since session 11) is the
authors' code (its environment sits in rllab's ``normalize`` wrapper: a policy action in [-1, 1]
moves the point by up to 0.1); 1 is the environment's own units, clipped to ±0.1 (the preset's
before).

    .venv/bin/python bench/rl_action_scale.py --action-scale 0.1 [--iterations 100] [--seed 0] \\
        [--out runs/rl_action_scale] [--threads 2] [--inner-estimator reinforce]

Trains ``rl-navigation2d`` with ``env_options=(("action_scale", SCALE),)`` (MAML, then the
pretrained baseline), then runs the evaluation protocol (40 test tasks, 0-3 steps) and prints its
table (``eval.json`` in the run folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--action-scale", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inner-estimator", default="reinforce")
    parser.add_argument("--out", default="runs/rl_action_scale")
    args = parser.parse_args()

    from maml_ext.rl import train
    from maml_ext.rl.evaluate import evaluate_rl_checkpoint, return_table

    name = "rl-navigation2d"
    train.RL_PRESETS[name] = dataclasses.replace(
        train.RL_PRESETS[name], env_options=(("action_scale", args.action_scale),)
    )
    out = Path(args.out) / f"scale{args.action_scale:g}-{args.inner_estimator}-seed{args.seed}"
    train.train_rl(
        name,
        out_dir=str(out),
        iterations=args.iterations,
        seed=args.seed,
        inner_estimator=args.inner_estimator,
        threads=args.threads,
        progress=False,
    )
    report = evaluate_rl_checkpoint(str(out / "checkpoint.pt"), threads=args.threads, verbose=False)
    print(return_table(report))


if __name__ == "__main__":
    main()

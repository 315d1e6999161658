"""Short iMAML runs on Omniglot 5-way 1-shot that differ in one setting, to find why a run fails.

    .venv/bin/python bench/imaml_rate_check.py --data-dir ../shared/data/omniglot \\
        'lr0.1={"inner_lr": 0.1}' 'damping1={"inner_lr": 0.4, "cg_damping": 1.0}'

Each ``NAME=JSON`` names a variant of :data:`BASE`, session 9's iMAML settings (5 proximal steps
of 0.4, λ 2, 5 CG steps; meta-batch 8, split by alphabet, as bench/algorithms.py trains): JSON keys
``inner_lr``/``inner_steps`` change the preset, the others the algorithm's options. Each variant
meta-trains ``--iterations`` steps at one thread, logging the training query loss, accuracy and
support loss every 10 steps, then is tested on ``--tasks`` held-out tasks after its inner steps.
Prints each log and accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from algorithms import preset_for, train_on_alphabet_split  # noqa: E402  (beside this file)

PRESET_KEYS = ("inner_lr", "inner_steps")
# What every variant starts from (fixed here, so that bench/NOTES.md's commands keep their meaning
# when bench/algorithms.py's iMAML entry changes).
BASE = {"inner_lr": 0.4, "inner_steps": 5, "lam": 2.0, "cg_steps": 5, "cg_damping": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=JSON")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--runs", default="runs/imaml_rate_check")
    args = parser.parse_args()

    from maml_ext.experiments.fewshot import evaluate_checkpoint

    torch.set_num_threads(1)
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        change = json.loads(spec)
        settings = {**BASE, **change}
        preset, _ = preset_for("5w1s", "imaml", args.iterations, 64, 8)
        preset = preset.with_overrides(**{k: v for k, v in settings.items() if k in PRESET_KEYS})
        options = {k: v for k, v in settings.items() if k not in PRESET_KEYS}
        out = Path(args.runs) / name
        started = time.perf_counter()
        train_on_alphabet_split(preset, args.data_dir, out, args.iterations, options, log_every=10)
        report = evaluate_checkpoint(
            out / "checkpoint.pt",
            tasks=args.tasks,
            steps=[preset.inner_steps],
            out="",
            progress=False,
            verbose=False,
        )
        seconds = time.perf_counter() - started
        row = report["results"]["maml"][str(preset.inner_steps)]
        test = f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f} %"
        print(f"== {name} {change}: {seconds:.0f} s, test accuracy {test}", flush=True)
        print((out / "log.csv").read_text(), flush=True)


if __name__ == "__main__":
    main()

"""The test protocol's curve two ways, on the same tasks in one process, alternating per chunk:
``adapt(steps=k)`` for every k (K(K+1)/2 inner steps per task) against ``adapt_steps`` (K).

    .venv/bin/python bench/eval_protocol_speed.py CHECKPOINT [--steps 10] [--chunks 2]
        [--threads 1]

Prints both wall times, their ratio and the largest difference between the two accuracies (0:
the same weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_ext.experiments.fewshot import EVAL_CHUNK, load_checkpoint  # noqa: E402
from maml_ext.experiments.fewshot.checkpoint import read_checkpoint  # noqa: E402
from maml_ext.experiments.fewshot.data import load_split, make_sampler  # noqa: E402
from maml_ext.experiments.presets import FewShotPreset  # noqa: E402
from maml_ext.experiments.runtime import weights_per_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=2, help=f"chunks of {EVAL_CHUNK} tasks")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = read_checkpoint(args.checkpoint)
    preset, settings = FewShotPreset.from_dict(state["preset"]), state["settings"]
    test = load_split(
        preset,
        settings["data_dir"],
        "test",
        split_by=settings["split_by"],
        split_seed=settings["split_seed"],
        cache_dir=settings.get("cache_dir"),
    )
    meta = load_checkpoint(args.checkpoint, device="cpu", outer_optimizer=False)
    sampler = make_sampler(test, preset, EVAL_CHUNK, 0, "cpu")
    steps = list(range(args.steps + 1))

    def accuracy(weights, batch):
        return (meta.predict(weights, batch.query_x).argmax(-1) == batch.query_y).float().mean(1)

    def per_k(batch):
        return {
            k: accuracy(
                weights_per_task(meta.model, EVAL_CHUNK)
                if k == 0
                else meta.adapt(batch.support_x, batch.support_y, steps=k),
                batch,
            )
            for k in steps
        }

    def one_loop(batch):
        trajectory = meta.adapt_steps(batch.support_x, batch.support_y, steps)
        return {k: accuracy(weights, batch) for k, weights in trajectory}

    seconds = {"per-k adapt": 0.0, "adapt_steps": 0.0}
    worst = 0.0
    for _ in range(args.chunks):
        batch = sampler.sample()
        results = {}
        for name, protocol in (("per-k adapt", per_k), ("adapt_steps", one_loop)):
            started = time.perf_counter()
            results[name] = protocol(batch)
            seconds[name] += time.perf_counter() - started
        for k in steps:
            difference = (results["per-k adapt"][k] - results["adapt_steps"][k]).abs().max()
            worst = max(worst, difference.item())
    print(
        f"{preset.name}, steps 0..{args.steps}, {EVAL_CHUNK * args.chunks} tasks, "
        f"{args.threads} thread(s): per-k adapt {seconds['per-k adapt']:.1f} s, adapt_steps "
        f"{seconds['adapt_steps']:.1f} s, ratio "
        f"{seconds['per-k adapt'] / seconds['adapt_steps']:.2f}x; largest accuracy difference "
        f"{worst}"
    )


if __name__ == "__main__":
    main()

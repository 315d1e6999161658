"""The report's few-shot runs (Omniglot on the minimal splits): first against second order at one
budget, and the long run of omniglot-5w1s with its evaluation against the pretrained baseline.

Each run goes through :class:`~maml_ext.experiments.report_cache.RunCache`, keyed by every
setting that changes its numbers (data folder excepted: the same data in another place gives
the same run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from maml_ext.experiments.report_cache import RunCache

__all__ = ["FewShotScale", "fewshot_run", "long_run", "step_timing"]

# Meta-trained on five alphabets, validated on Latin, tested on the two never seen in training:
# the split of the README's Omniglot run (see maml_ext/experiments/fewshot/__init__.py).
SPLIT_BY = "alphabet"
SPLIT_SEED = 0
BACKEND = "fused"


def _train_settings(
    preset: str, *, iterations: int, meta_batch: int, first_order: bool, queries, val_tasks, seed
) -> dict:
    return dict(
        preset=preset,
        iterations=iterations,
        meta_batch=meta_batch,
        first_order=first_order,
        queries=queries,
        val_tasks=val_tasks,
        seed=seed,
        split_by=SPLIT_BY,
        split_seed=SPLIT_SEED,
        backend=BACKEND,
    )


def _read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_and_evaluate(
    folder: Path,
    settings: dict,
    *,
    data_dir,
    cache_dir,
    validate_every: int,
    checkpoint_every: int,
    eval_tasks: int,
    eval_steps: int,
    baseline_iterations: int | None,
    threads: int | None,
) -> dict:
    """Meta-trains (resuming a run that an interruption left in ``folder/run``), then runs the
    test protocol; returns the summary, the evaluation and the log rows."""
    from maml_ext.experiments.fewshot import evaluate_checkpoint, train_fewshot

    run_dir = folder / "run"
    resume = (run_dir / "checkpoint.pt").exists()
    common = dict(
        out_dir=run_dir,
        iterations=settings["iterations"],
        backend=settings["backend"],
        checkpoint_every=checkpoint_every,
        validate_every=validate_every,
        data_dir=data_dir,
        cache_dir=cache_dir,
        progress=False,
        verbose=False,
        cpu_threads=threads,
    )
    if resume:
        summary = train_fewshot(settings["preset"], resume=True, **common)
    else:
        summary = train_fewshot(
            settings["preset"],
            meta_batch=settings["meta_batch"],
            first_order=settings["first_order"],
            queries=settings["queries"],
            val_tasks=settings["val_tasks"],
            seed=settings["seed"],
            split_by=settings["split_by"],
            split_seed=settings["split_seed"],
            **common,
        )
    evaluation = evaluate_checkpoint(
        run_dir / "checkpoint.pt",
        data_dir=data_dir,
        cache_dir=cache_dir,
        tasks=eval_tasks,
        steps=eval_steps,
        baseline=baseline_iterations is not None,
        baseline_iterations=baseline_iterations or 1,
        backend=settings["backend"],
        out=str(folder / "eval.json"),
        progress=False,
        verbose=False,
        cpu_threads=threads,
    )
    rows = _read_log(run_dir)
    train_rows = [row for row in rows if row["phase"] == "train"]
    return {
        "iterations": summary["iteration"],
        "train_seconds": train_rows[-1]["seconds"] if train_rows else summary["seconds"],
        "seconds_per_step": (train_rows[-1]["seconds"] / summary["iteration"])
        if train_rows
        else None,
        "best_val": summary["best_val"],
        "last_val": summary["last_val"],
        "eval": evaluation["results"],
        "eval_seconds": evaluation["seconds"],
        "log": rows,
    }


@dataclasses.dataclass(frozen=True)
class FewShotScale:
    """How large the few-shot runs are. ``full()``: this report's budget on a 2-core CPU;
    ``quick()``: the same plumbing in seconds (tiny tasks, a few iterations), for tests."""

    compare_iterations: dict[str, int]  # preset -> iterations of each order's run
    long_iterations: int
    meta_batch: int
    queries: int | None  # query images per class (None: the preset's)
    val_tasks: int
    eval_tasks: int
    eval_steps: int  # tested after 0..eval_steps SGD steps
    baseline_iterations: int  # the pretrained baseline's training steps
    switch_pairs: int  # task pairs of the switching experiment
    # preset -> (test tasks, most test steps) of the comparison runs where not eval_tasks and
    # eval_steps: 20-way tasks cost 4x the images, and each k re-adapts from θ.
    compare_eval: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    timing_repeats: int = 3  # timed meta-steps per preset and order (step_timing)

    def compare_test(self, preset: str) -> tuple[int, int]:
        return self.compare_eval.get(preset, (self.eval_tasks, self.eval_steps))

    @classmethod
    def full(cls) -> FewShotScale:
        return cls(
            # About 10 and 20 minutes of second-order training each at one thread here.
            compare_iterations={"omniglot-5w1s": 500, "omniglot-20w1s": 100},
            # About an hour at one thread here (~1.1 s per meta-step of 8 tasks).
            long_iterations=3000,
            meta_batch=8,
            queries=None,  # the preset's 15
            val_tasks=100,
            eval_tasks=600,
            eval_steps=10,
            baseline_iterations=5000,
            # ~7 min per method here: 4 adaptations of up to 10 steps and 5 scorings per pair.
            switch_pairs=100,
            # 200 tasks after up to 5 steps (the paper's for 20-way): ~5 min per run here,
            # against ~40 min for 600 tasks after up to 10.
            compare_eval={"omniglot-20w1s": (200, 5)},
        )

    @classmethod
    def quick(cls) -> FewShotScale:
        return cls(
            compare_iterations={"omniglot-5w1s": 2, "omniglot-20w1s": 2},
            long_iterations=3,
            meta_batch=2,
            queries=1,
            val_tasks=2,
            eval_tasks=4,
            eval_steps=3,
            baseline_iterations=2,
            switch_pairs=4,
            timing_repeats=1,
        )


def fewshot_run(
    cache: RunCache,
    preset: str,
    first_order: bool,
    scale: FewShotScale,
    *,
    data_dir,
    cache_dir=None,
    seed: int = 0,
    threads: int | None = 1,
) -> dict:
    """One arm of the first- against second-order comparison: ``preset`` for
    ``scale.compare_iterations[preset]`` iterations, validated at the end only (so the training
    time is the meta-steps' alone), tested on ``scale.compare_test(preset)``."""
    settings = _train_settings(
        preset,
        iterations=scale.compare_iterations[preset],
        meta_batch=scale.meta_batch,
        first_order=first_order,
        queries=scale.queries,
        val_tasks=scale.val_tasks,
        seed=seed,
    )
    eval_tasks, eval_steps = scale.compare_test(preset)
    settings |= {"eval_tasks": eval_tasks, "eval_steps": eval_steps}
    name = f"{preset}-{'first' if first_order else 'second'}-order"
    return cache.run(
        name,
        settings,
        lambda folder: _train_and_evaluate(
            folder,
            settings,
            data_dir=data_dir,
            cache_dir=cache_dir,
            validate_every=0,
            checkpoint_every=0,
            eval_tasks=eval_tasks,
            eval_steps=eval_steps,
            baseline_iterations=None,
            threads=threads,
        ),
    )


def long_run_settings(scale: FewShotScale, seed: int = 0) -> dict:
    return _train_settings(
        "omniglot-5w1s",
        iterations=scale.long_iterations,
        meta_batch=scale.meta_batch,
        first_order=False,
        queries=scale.queries,
        val_tasks=scale.val_tasks,
        seed=seed,
    ) | {
        "eval_tasks": scale.eval_tasks,
        "eval_steps": scale.eval_steps,
        "baseline_iterations": scale.baseline_iterations,
    }


def long_run(
    cache: RunCache,
    scale: FewShotScale,
    *,
    data_dir,
    cache_dir=None,
    seed: int = 0,
    threads: int | None = 1,
) -> tuple[dict, Path]:
    """omniglot-5w1s, second order, for ``scale.long_iterations`` iterations, validated every
    tenth of the run, tested with the pretrained baseline on the same tasks. Returns the result
    and the run's folder (its checkpoint, baseline.pt and learning_curve.png)."""
    settings = long_run_settings(scale, seed)
    every = max(1, scale.long_iterations // 10)
    result = cache.run(
        "omniglot-5w1s-long",
        settings,
        lambda folder: _train_and_evaluate(
            folder,
            settings,
            data_dir=data_dir,
            cache_dir=cache_dir,
            validate_every=every,
            checkpoint_every=every,
            eval_tasks=scale.eval_tasks,
            eval_steps=scale.eval_steps,
            baseline_iterations=scale.baseline_iterations,
            threads=threads,
        ),
    )
    return result, cache.folder("omniglot-5w1s-long", settings) / "run"


def step_timing(
    cache: RunCache,
    preset: str,
    first_order: bool,
    scale: FewShotScale,
    *,
    data_dir,
    cache_dir=None,
    threads: int | None = 1,
) -> dict:
    """Seconds per meta-step of ``preset`` at the comparison's settings, measured apart from
    training: one warm-up step, then ``scale.timing_repeats`` timed steps on one batch of
    training tasks (the median is reported). Training's own wall time shares the machine with
    whatever else runs; this is meant to run when nothing else does (the last, all-cached run of
    the report), and records the load average to show it."""
    settings = {
        "preset": preset,
        "first_order": first_order,
        "meta_batch": scale.meta_batch,
        "queries": scale.queries,
        "repeats": scale.timing_repeats,
        "threads": threads,
        "backend": BACKEND,
    }

    def compute(folder: Path) -> dict:
        import os
        import statistics
        import time

        from maml_ext.experiments.fewshot.checkpoint import build_meta_optimizer
        from maml_ext.experiments.fewshot.data import load_split, make_sampler
        from maml_ext.experiments.presets import get_preset
        from maml_ext.experiments.runtime import intra_op_threads

        shape = get_preset(preset).with_overrides(
            meta_batch=scale.meta_batch, first_order=first_order, queries=scale.queries
        )
        data = load_split(
            shape, data_dir, "train", split_by=SPLIT_BY, split_seed=SPLIT_SEED, cache_dir=cache_dir
        )
        batch = make_sampler(data, shape, scale.meta_batch, 0, "cpu").sample()
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        with intra_op_threads(threads):
            meta = build_meta_optimizer(shape, backend=BACKEND)
            meta.step(*tensors)
            seconds = []
            for _ in range(scale.timing_repeats):
                started = time.perf_counter()
                meta.step(*tensors)
                seconds.append(time.perf_counter() - started)
        return {
            "median_s": statistics.median(seconds),
            "seconds": seconds,
            "load_average": os.getloadavg()[0],
        }

    name = f"{preset}-{'first' if first_order else 'second'}-order-timing"
    return cache.run(name, settings, compute)

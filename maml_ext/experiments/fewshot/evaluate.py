"""The paper's few-shot test protocol (``python -m maml_ext eval CHECKPOINT``).

``tasks`` (600) test tasks are drawn with a fixed seed from the test classes, which training never
saw; each is adapted with plain SGD on its support set (``MetaOptimizer.adapt`` with ``steps=k``,
the trained inner rates) and scored on its query set (the preset's query count); reported for
every k in 0..``steps``: the mean accuracy and its 95% confidence interval,
``1.96 * std / sqrt(n)`` (std with ddof = 1). Tasks are drawn :data:`EVAL_CHUNK` at a time from one
sampler seeded with ``seed``, so the same seed gives the same tasks for every checkpoint, backend
and device, and the first n tasks of a longer evaluation are the n tasks of a shorter one.
With ``baseline=True`` the network of :mod:`~maml_ext.experiments.fewshot.baseline` is scored on
the same tasks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from maml_ext.checkpoint import write_text_atomic
from maml_ext.experiments.fewshot.baseline import (
    BASELINE_BATCH,
    BASELINE_LR,
    DEFAULT_BASELINE_ITERATIONS,
    baseline_meta_optimizer,
    cached_baseline,
    pretrain_baseline,
    save_baseline,
)
from maml_ext.experiments.fewshot.checkpoint import load_checkpoint, read_checkpoint
from maml_ext.experiments.fewshot.data import load_split, make_sampler
from maml_ext.experiments.presets import ConfigurationError, FewShotPreset
from maml_ext.experiments.reporting import (
    DEFAULT_EVAL_SEED,
    accuracy_table,
    mean_ci95,
    progress_bar,
    require_progress_bars,
)
from maml_ext.experiments.runtime import (
    ONE_PROCESS,
    Ranks,
    check_count,
    current_ranks,
    default_device,
    intra_op_threads,
)

from ...types import PathLike
from ...validation import check_step_counts

__all__ = ["EVAL_CHUNK", "per_step_accuracy", "evaluate_tasks", "summarise", "evaluate_checkpoint"]

# Tasks are drawn this many at a time: part of the definition of "the tasks of a seed".
EVAL_CHUNK = 25

Evaluation = dict[int, dict[str, torch.Tensor]]

_BASELINE_DESCRIPTION = (
    "the same network trained as one softmax classifier over all meta-training classes (no "
    "meta-learning), then per test task a fresh zero-initialised N-way head and the whole network "
    "fine-tuned with MetaOptimizer.adapt at the same inner learning rate and steps as MAML"
)


def per_step_accuracy(
    meta_optimizer, support_x, support_y, query_x, query_y, steps: Sequence[int]
) -> Evaluation:
    """Per-task query accuracy and loss ``{k: {"accuracy": [T], "loss": [T]}}`` after k inner
    steps for each k in ``steps`` (0: the unadapted weights), from one inner loop per task
    (``MetaOptimizer.adapt_steps``: scoring 0..K costs K steps, not K(K + 1)/2)."""
    results = {}
    for k, weights in meta_optimizer.adapt_steps(support_x, support_y, steps):
        logits = meta_optimizer.predict(weights, query_x)
        accuracy = (logits.argmax(-1) == query_y).float().mean(1)
        loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction="none")
        results[k] = {"accuracy": accuracy.cpu(), "loss": loss.view_as(query_y).mean(1).cpu()}
    return results


def evaluate_tasks(
    meta_optimizer,
    dataset,
    preset: FewShotPreset,
    *,
    tasks: int,
    steps: Sequence[int],
    seed: int,
    device=None,
    progress: str | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> Evaluation:
    """:func:`per_step_accuracy` over ``tasks`` tasks drawn from ``dataset`` with ``seed``,
    ``EVAL_CHUNK`` at a time: ``{k: {"accuracy": [tasks], "loss": [tasks]}}``. ``progress``: the
    label of a progress bar (None: no bar). Across processes (``ranks``) every rank draws every
    chunk (the same tasks as one process), adapts to every ``world_size``-th chunk, and the
    results are gathered in order on every rank: the same values as one process."""
    if tasks < 1:
        raise ConfigurationError(f"tasks: expected a positive number, got {tasks}")
    sampler = make_sampler(dataset, preset, EVAL_CHUNK, seed, device)
    parts: dict[int, dict[str, list[torch.Tensor]]] = {
        k: {"accuracy": [], "loss": []} for k in steps
    }
    bar = progress_bar(
        bool(progress) and ranks.main, description=progress, total=tasks, leave=False
    )
    done = 0
    dtype = next(meta_optimizer.model.parameters()).dtype
    chunk = -1
    while done < tasks:
        take = min(EVAL_CHUNK, tasks - done)
        batch = sampler.sample()
        chunk += 1
        if chunk % ranks.world_size != ranks.rank:
            done += take
            bar.update(take)
            continue
        batch = batch.to(dtype=dtype) if batch.support_x.dtype != dtype else batch
        sx, sy, qx, qy = (
            t[:take] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        )
        for k, values in per_step_accuracy(meta_optimizer, sx, sy, qx, qy, steps).items():
            parts[k]["accuracy"].append(values["accuracy"])
            parts[k]["loss"].append(values["loss"])
        done += take
        bar.update(take)
    bar.close()
    if ranks.distributed:
        # Chunk c was computed by rank c % world_size: interleave the ranks' lists back.
        everyone = ranks.gather(
            {k: {n: [v.cpu() for v in vs] for n, vs in by.items()} for k, by in parts.items()}
        )
        chunks = -(-tasks // EVAL_CHUNK)
        parts = {
            k: {
                name: [
                    everyone[c % ranks.world_size][k][name][c // ranks.world_size]
                    for c in range(chunks)
                ]
                for name in by_name
            }
            for k, by_name in parts.items()
        }
    return {
        k: {name: torch.cat(values) for name, values in by_name.items()}
        for k, by_name in parts.items()
    }


def summarise(evaluation: Evaluation) -> dict[str, dict]:
    """``{str(k): {"accuracy": mean, "ci95": half width, "std": std, "loss": mean loss}}``."""
    summary = {}
    for k in sorted(evaluation):
        mean, half, std = mean_ci95(evaluation[k]["accuracy"])
        summary[str(k)] = {
            "accuracy": mean,
            "ci95": half,
            "std": std,
            "loss": evaluation[k]["loss"].double().mean().item(),
        }
    return summary


def evaluate_checkpoint(
    checkpoint: PathLike,
    data_dir: PathLike | None = None,
    *,
    tasks: int = 600,
    steps: int | Sequence[int] = 10,
    seed: int = DEFAULT_EVAL_SEED,
    out: PathLike | None = None,
    split: str = "test",
    backend: str = "auto",
    device=None,
    baseline: bool = False,
    baseline_iterations: int = DEFAULT_BASELINE_ITERATIONS,
    baseline_path: PathLike | None = None,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    verbose: bool = True,
    cpu_threads: int | None = None,
) -> dict:
    """The paper's test protocol on a training checkpoint (see the module docstring).

    ``data_dir`` and ``cache_dir`` default to the training run's; the split (by character or
    alphabet, split seed) is always the training run's, so the test classes are the ones it never
    saw. ``steps``: an int scores after 0..steps inner steps, a collection after exactly those
    step counts. Writes JSON to ``out`` (default ``eval.json`` beside the checkpoint; nothing when
    ``out`` is ""), prints the table when ``verbose``, and returns the dict written:
    ``results["maml"][str(k)] = {"accuracy", "ci95", "std", "loss"}`` for k = 0..steps, and
    ``results["baseline"]`` too with ``baseline=True``. The pretrained baseline is cached in
    ``baseline_path`` (default ``baseline.pt`` beside the checkpoint) and reused when its settings
    match.
    """
    checkpoint = Path(checkpoint)
    check_count("tasks", tasks)
    if isinstance(steps, int) and not isinstance(steps, bool):
        check_count("steps", steps, allow_zero=True)
        step_list = list(range(steps + 1))
    else:  # only these step counts (one inner loop still runs to the largest)
        try:
            step_list = check_step_counts("steps", steps)
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
    if split not in ("train", "val", "test"):
        raise ConfigurationError(f"split: expected train, val or test, got {split!r}")
    try:
        state = read_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigurationError(str(error)) from error
    if progress:
        require_progress_bars()
    preset = FewShotPreset.from_dict(state["preset"])
    settings = state["settings"]
    data_dir = data_dir if data_dir is not None else settings["data_dir"]
    cache_dir = cache_dir if cache_dir is not None else settings.get("cache_dir")
    device = torch.device(device if device is not None else default_device())
    split_options = dict(
        split_by=settings["split_by"], split_seed=settings["split_seed"], cache_dir=cache_dir
    )
    # Under torchrun the test tasks are split across the processes; rank 0 prints and writes.
    ranks = current_ranks()
    verbose = verbose and ranks.main

    with intra_op_threads(cpu_threads if device.type == "cpu" else None):
        test_data = load_split(preset, data_dir, split, **split_options)
        meta = load_checkpoint(checkpoint, device=device, backend=backend, outer_optimizer=False)
        started = time.perf_counter()
        results = {
            "maml": summarise(
                evaluate_tasks(
                    meta,
                    test_data,
                    preset,
                    tasks=tasks,
                    steps=step_list,
                    seed=seed,
                    device=device,
                    progress="MAML test tasks" if progress else None,
                    ranks=ranks,
                )
            )
        }
        seconds = {"maml": time.perf_counter() - started}
        baseline_info = None
        if baseline:
            path = (
                Path(baseline_path)
                if baseline_path is not None
                else checkpoint.with_name("baseline.pt")
            )
            baseline_settings = {
                "preset": preset.name,
                "data_dir": str(data_dir),
                **split_options,
                "cache_dir": None,
                "iterations": baseline_iterations,
                "batch_size": BASELINE_BATCH,
                "lr": BASELINE_LR,
                "seed": settings["seed"],
            }
            started = time.perf_counter()
            model = _pretrained_baseline(
                path,
                baseline_settings,
                preset,
                data_dir,
                split_options,
                device,
                progress and ranks.main,
                save=ranks.main,
            )
            seconds["baseline_pretraining"] = time.perf_counter() - started
            started = time.perf_counter()
            base_meta = baseline_meta_optimizer(
                preset, model.to(device), device=device, backend=backend
            )
            results["baseline"] = summarise(
                evaluate_tasks(
                    base_meta,
                    test_data,
                    preset,
                    tasks=tasks,
                    steps=step_list,
                    seed=seed,
                    device=device,
                    progress="baseline test tasks" if progress else None,
                    ranks=ranks,
                )
            )
            seconds["baseline"] = time.perf_counter() - started
            baseline_info = {
                "description": _BASELINE_DESCRIPTION,
                "file": str(path),
                **baseline_settings,
            }

    report = {
        "checkpoint": str(checkpoint),
        "preset": preset.name,
        "first_order": preset.first_order,
        "algorithm": preset.algorithm,
        "algorithm_options": settings.get("algorithm_options", {}),
        "trained_iterations": int(state["iteration"]),
        "split": split,
        "split_by": settings["split_by"],
        "split_seed": settings["split_seed"],
        "data_dir": str(data_dir),
        "classes": (int(test_data.labels.max()) + 1) * int(getattr(test_data, "rotations", 1)),
        "tasks": tasks,
        "steps": steps if isinstance(steps, int) else step_list,
        "paper_eval_steps": preset.paper_eval_steps,
        "seed": seed,
        "task_chunk": EVAL_CHUNK,
        "ways": preset.ways,
        "shots": preset.shots,
        "queries_per_class": preset.queries,
        "inner_lr": preset.inner_lr,
        "backend": meta.backend,
        "device": str(device),
        "confidence_interval": "1.96 * std / sqrt(tasks), std with ddof=1",
        "results": results,
        "baseline": baseline_info,
        "seconds": seconds,
    }
    if verbose:
        print(
            f"{preset.name} ({preset.algorithm}, {state['iteration']} iterations): {split} "
            f"accuracy on {tasks} tasks "
            f"({preset.ways}-way {preset.shots}-shot, {preset.queries} queries/class, seed {seed}) "
            f"after k inner steps of {preset.inner_lr}; mean ± 95% CI"
        )
        # Your own data (image folders) has no paper row to mark.
        paper_row = None if preset.dataset == "folder" else preset.paper_eval_steps
        print(accuracy_table(results, paper_row))
    if out != "" and ranks.main:
        out_path = Path(out) if out is not None else checkpoint.with_name("eval.json")
        write_text_atomic(out_path, json.dumps(report, indent=2) + "\n")
        report["file"] = str(out_path)
        if verbose:
            print(f"wrote {out_path}")
    return report


def _pretrained_baseline(
    path: Path,
    settings: dict,
    preset: FewShotPreset,
    data_dir,
    split_options: dict,
    device,
    progress: bool,
    save: bool = True,
) -> torch.nn.Module:
    """The baseline cached at ``path`` for ``settings``, or one pretrained now and saved there
    (when ``save``: under torchrun every rank pretrains the same one and rank 0 saves it)."""
    model = cached_baseline(path, settings, preset)
    if model is None:
        train_data = load_split(preset, data_dir, "train", **split_options)
        model = pretrain_baseline(
            preset,
            train_data,
            iterations=settings["iterations"],
            seed=settings["seed"],
            device=device,
            progress=progress,
        )
        if save:
            save_baseline(model, settings, path)
    return model

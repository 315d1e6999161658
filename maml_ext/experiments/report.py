"""``python -m maml_ext report``: the paper's claims, measured, as ``RESULTS.md`` with its figures.

Sections (issue 15):

1. sinusoid at the paper's scale (70,000 meta-iterations), MAML against the pretrained baseline,
   with the best 0-step error any fixed network can reach on the same test tasks;
2. first against second order: sinusoid, Omniglot 5-way 1-shot and 20-way 1-shot, same budget
   and seeds, accuracy and time per meta-step;
3. more steps at test time than in training: error / accuracy against test steps 0..10 (PNG);
4. Omniglot 5-way 1-shot at about an hour of training here, with its learning curve;
5. the task-switching question (:mod:`maml_ext.experiments.task_switching`).

Every run goes through a :class:`~maml_ext.experiments.report_cache.RunCache` (default
``runs/report-cache``): a run whose settings are unchanged is read back instead of repeated, and
RESULTS.md says which were. ``quick=True`` runs the same code on tiny budgets (seconds; for tests),
into its own cache keys.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from maml_ext.checkpoint import write_text_atomic
from maml_ext.experiments.presets import ConfigurationError, get_preset
from maml_ext.experiments.report_cache import RunCache
from maml_ext.experiments.report_fewshot import FewShotScale, fewshot_run, long_run, step_timing
from maml_ext.experiments.reporting import DEFAULT_EVAL_SEED, mean_ci95, require_plotting

from ..types import PathLike

__all__ = ["SinusoidScale", "SECTIONS", "run_report"]

SECTIONS = ("sinusoid", "order", "long", "switching")
# RESULTS.md is written to the output folder, its PNGs to this folder inside it.
FIGURES = "results"
SWITCH_STEPS = (1, 5, 10)
TEST_STEPS = 10
# The task-switching pairs come from their own seed, apart from the test protocol's tasks.
SWITCH_SEED = DEFAULT_EVAL_SEED + 1
# Published figures quoted beside ours (full Omniglot background set; Finn et al. 2017, table 1).
PAPER_OMNIGLOT = {
    "omniglot-5w1s": {"second": 98.7, "first": 98.3},
    "omniglot-20w1s": {"second": 95.8, "first": 89.4},
}
# The independent torch.func + torch.compile run of the paper's sinusoid configuration
# (70,000 iterations): MSE after 0 / 1 / 5 / 10 steps.
REFERENCE_SINUSOID = {
    "MAML": (3.18, 0.356, 0.182, 0.116),
    "pretrained": (3.15, 2.56, 1.91, 1.55),
}
SINUSOID_TABLE_STEPS = (0, 1, 5, 10)


@dataclass(frozen=True)
class SinusoidScale:
    iterations: int
    eval_tasks: int
    switch_pairs: int

    @classmethod
    def full(cls) -> SinusoidScale:
        # 10,000 test tasks: with 600, the mean squared amplitude of the draw moves the 0-step
        # error by ±0.22 (95%), more than the differences the table is read for.
        return cls(iterations=70000, eval_tasks=10000, switch_pairs=2000)

    @classmethod
    def quick(cls) -> SinusoidScale:
        return cls(iterations=20, eval_tasks=20, switch_pairs=8)


# --------------------------------------------------------------------------------------------
# Sinusoid


def _sinusoid_settings(scale: SinusoidScale, first_order: bool, seed: int) -> dict:
    return dict(
        iterations=scale.iterations,
        eval_tasks=scale.eval_tasks,
        eval_steps=list(range(TEST_STEPS + 1)),
        first_order=first_order,
        seed=seed,
        backend="fused",
    )


def _sinusoid_run(cache: RunCache, scale: SinusoidScale, first_order: bool, seed: int) -> dict:
    from maml_ext.experiments.sinusoid import train_sinusoid

    settings = _sinusoid_settings(scale, first_order, seed)
    name = f"sinusoid-{'first' if first_order else 'second'}-order"

    def compute(folder: Path) -> dict:
        report = train_sinusoid(
            iterations=settings["iterations"],
            out_dir=str(folder),
            seed=seed,
            backend=settings["backend"],
            first_order=first_order,
            eval_tasks=settings["eval_tasks"],
            eval_steps=settings["eval_steps"],
            progress=False,
            verbose=False,
            cpu_threads=1,
        )
        report["floor"] = _sinusoid_floor(scale.eval_tasks)
        return report

    return cache.run(name, settings, compute) | {"folder": str(cache.folder(name, settings))}


def sinusoid_mean_function(x: torch.Tensor, amplitude_range, phase_range) -> torch.Tensor:
    """E[A sin(x − φ)] over A ~ U(amplitude_range), φ ~ U(phase_range) =
    E[A] (cos(x − b) − cos(x − a)) / (b − a): the best fixed prediction in mean squared error."""
    low, high = amplitude_range
    first, last = phase_range
    return (low + high) / 2 * (torch.cos(x - last) - torch.cos(x - first)) / (last - first)


def _grid_tasks(seed: int, count: int):
    """``count`` sinusoid tasks from ``seed`` (10 support points each) with their 100-point grids
    over the input range: the tasks every sinusoid section scores on."""
    from maml_ext.experiments.sinusoid import Sinusoid

    source = Sinusoid(support=10, query=0, seed=seed)
    tasks = source.sample(count)
    grid_x, grid_y = source.grid(tasks.amplitude, tasks.phase, 100)
    return source, tasks, grid_x, grid_y


def _trained_sinusoid_models(maml_run: dict) -> tuple[float, dict]:
    """The inner rate and the two networks ``{"MAML", "pretrained"}`` saved by a sinusoid run."""
    from maml_ext.experiments.sinusoid import make_sinusoid_model

    saved = torch.load(Path(maml_run["folder"]) / "sinusoid_models.pt", weights_only=True)
    models = {}
    for method, key in (("MAML", "maml"), ("pretrained", "pretrained")):
        models[method] = make_sinusoid_model()
        models[method].load_state_dict(saved[key])
    return saved["config"]["inner_lr"], models


def _sinusoid_floor(eval_tasks: int) -> dict:
    """The 0-step error of the best fixed network for the task distribution, the mean function
    E[A] · E_φ[sin(x − φ)] (= −(2/π) E[A] cos x for φ ~ U[0, π]), on the test tasks' grids."""
    source, _, grid_x, grid_y = _grid_tasks(DEFAULT_EVAL_SEED, eval_tasks)
    best = sinusoid_mean_function(grid_x.double(), source.amplitude_range, source.phase_range)
    mean, ci95, _ = mean_ci95(((grid_y.double() - best) ** 2).flatten(1).mean(1))
    return {"mse": mean, "ci95": ci95}


def _sinusoid_test_steps(cache: RunCache, scale: SinusoidScale, maml_run: dict) -> dict:
    """Per-task error after 0..TEST_STEPS SGD steps on the test tasks of section 1, one step at a
    time, summarised robustly as well: the median, the tasks that adaptation made worse than
    before it (a non-finite error counts as worse), and the mean over the other tasks."""
    from maml_ext.experiments import task_switching as switching

    settings = {
        "tasks": scale.eval_tasks,
        "steps": TEST_STEPS,
        "seed": DEFAULT_EVAL_SEED,
        "models": Path(maml_run["folder"]).name,
    }

    def compute(folder: Path) -> dict:
        inner_lr, models = _trained_sinusoid_models(maml_run)
        _, tasks, grid_x, grid_y = _grid_tasks(DEFAULT_EVAL_SEED, scale.eval_tasks)
        results = {}
        for method, model in models.items():
            score = switching.per_task_mse(model)
            weights = switching.repeat_weights(model, scale.eval_tasks)
            with torch.no_grad():
                before = score(weights, grid_x, grid_y)
            by_step = {}
            for k in range(TEST_STEPS + 1):
                if k:
                    weights = switching.functional_sgd(
                        model,
                        weights,
                        tasks.support_x,
                        tasks.support_y,
                        1,
                        inner_lr,
                        "mse",
                    )
                with torch.no_grad():
                    mse = score(weights, grid_x, grid_y).double()
                worse = ~(mse <= before)
                mean, ci95, _ = mean_ci95(mse)
                rest = mean_ci95(mse[~worse]) if bool((~worse).any()) else (math.nan, 0.0, 0.0)
                by_step[str(k)] = {
                    "mse": mean,
                    "ci95": ci95,
                    "median": mse.median().item(),
                    "worse": int(worse.sum()) if k else 0,
                    "mse_rest": rest[0] if k else mean,
                    "ci95_rest": rest[1] if k else ci95,
                }
            results[method] = by_step
        return {"tasks": scale.eval_tasks, "results": results}

    return cache.run("sinusoid-test-steps", settings, compute)


def _sinusoid_switching(cache: RunCache, scale: SinusoidScale, maml_run: dict) -> dict:
    from maml_ext.experiments import task_switching as switching

    settings = {
        "pairs": scale.switch_pairs,
        "steps": list(SWITCH_STEPS),
        "seed": SWITCH_SEED,
        "models": Path(maml_run["folder"]).name,
    }

    def compute(folder: Path) -> dict:
        inner_lr, models = _trained_sinusoid_models(maml_run)
        _, tasks, grid_x, grid_y = _grid_tasks(SWITCH_SEED, 2 * scale.switch_pairs)
        half = scale.switch_pairs

        def task(part: slice):
            return (tasks.support_x[part], tasks.support_y[part], grid_x[part], grid_y[part])

        results = {}
        for method, model in models.items():
            start = switching.repeat_weights(model, half)
            results[method] = {
                str(k): switching.summarise_switching(
                    switching.switching_scores(
                        model,
                        start,
                        task(slice(0, half)),
                        task(slice(half, None)),
                        k,
                        inner_lr,
                        "mse",
                        switching.per_task_mse(model),
                    )
                )
                for k in SWITCH_STEPS
            }
        return {"metric": "MSE", "results": results}

    return cache.run("sinusoid-switching", settings, compute)


# --------------------------------------------------------------------------------------------
# Omniglot task switching


def _omniglot_switching(
    cache: RunCache, scale: FewShotScale, run_dir: Path, data_dir, cache_dir, threads
) -> dict:
    from maml_ext.experiments import task_switching as switching
    from maml_ext.experiments.fewshot import load_checkpoint
    from maml_ext.experiments.fewshot.baseline import baseline_meta_optimizer, cached_baseline
    from maml_ext.experiments.fewshot.checkpoint import read_checkpoint
    from maml_ext.experiments.fewshot.data import load_split, make_sampler
    from maml_ext.experiments.presets import FewShotPreset
    from maml_ext.experiments.runtime import intra_op_threads

    settings = {
        "pairs": scale.switch_pairs,
        "steps": list(SWITCH_STEPS),
        "seed": SWITCH_SEED,
        "run": run_dir.parent.name,
    }
    chunk = min(20, scale.switch_pairs)  # pairs per vmapped batch: bounds the activations' memory

    def compute(folder: Path) -> dict:
        state = read_checkpoint(run_dir / "checkpoint.pt")
        preset = FewShotPreset.from_dict(state["preset"])
        split = dict(
            split_by=state["settings"]["split_by"], split_seed=state["settings"]["split_seed"]
        )
        baseline_file = run_dir / "baseline.pt"
        saved = torch.load(baseline_file, map_location="cpu", weights_only=True)
        pretrained = cached_baseline(baseline_file, saved["settings"], preset)
        models = {
            "MAML": load_checkpoint(run_dir / "checkpoint.pt", outer_optimizer=False).model,
            "pretrained": baseline_meta_optimizer(preset, pretrained).model,
        }
        scores = {m: {k: {} for k in SWITCH_STEPS} for m in models}
        with intra_op_threads(threads):
            test_data = load_split(preset, data_dir, "test", cache_dir=cache_dir, **split)
            sampler = make_sampler(test_data, preset, chunk, SWITCH_SEED, "cpu")
            for _ in range(-(-scale.switch_pairs // chunk)):
                a, b = sampler.sample(), sampler.sample()
                pair_a = (a.support_x, a.support_y, a.query_x, a.query_y)
                pair_b = (b.support_x, b.support_y, b.query_x, b.query_y)
                for method, model in models.items():
                    start = switching.repeat_weights(model, chunk)
                    for k in SWITCH_STEPS:
                        part = switching.switching_scores(
                            model,
                            start,
                            pair_a,
                            pair_b,
                            k,
                            preset.inner_lr,
                            "cross_entropy",
                            switching.per_task_accuracy(model),
                        )
                        for condition, values in part.items():
                            scores[method][k].setdefault(condition, []).append(values)
        results = {
            method: {
                str(k): switching.summarise_switching(
                    {c: torch.cat(v)[: scale.switch_pairs] for c, v in by_condition.items()}
                )
                for k, by_condition in by_k.items()
            }
            for method, by_k in scores.items()
        }
        return {"metric": "accuracy", "preset": preset.name, "results": results}

    return cache.run("omniglot-switching", settings, compute)


# --------------------------------------------------------------------------------------------
# Figures


def _plot_test_steps(path: Path, sinusoid: dict, omniglot: dict | None) -> None:
    plt = require_plotting("the report's figures")
    panels = 2 if omniglot is not None else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axis = axes[0][0]
    for method, color in (("MAML", "tab:blue"), ("pretrained", "tab:orange")):
        by_step = sinusoid["results"][method]
        steps = sorted(int(k) for k in by_step)
        # The mean over all tasks is infinite once a task diverges: plot the mean over the tasks
        # that adaptation did not make worse (with its interval), and the median.
        means = [by_step[str(k)]["mse_rest"] for k in steps]
        bands = [by_step[str(k)]["ci95_rest"] for k in steps]
        axis.errorbar(
            steps,
            means,
            yerr=bands,
            label=f"{method}: mean, tasks not made worse",
            color=color,
            marker="o",
            capsize=3,
        )
        medians = [by_step[str(k)]["median"] for k in steps]
        axis.plot(steps, medians, color=color, linestyle="--", label=f"{method}: median")
    axis.set(
        xlabel="SGD steps at test time (trained with 1)",
        ylabel="MSE on the task's grid",
        title=f"Sinusoid, K = 10, {sinusoid['tasks']} test tasks",
        yscale="log",
    )
    axis.legend()
    if omniglot is not None:
        axis = axes[0][1]
        for method, label, color in (
            ("maml", "MAML", "tab:blue"),
            ("baseline", "pretrained", "tab:orange"),
        ):
            by_step = omniglot["eval"].get(method)
            if not by_step:
                continue
            steps = sorted(int(k) for k in by_step)
            means = [100 * by_step[str(k)]["accuracy"] for k in steps]
            bands = [100 * by_step[str(k)]["ci95"] for k in steps]
            axis.errorbar(steps, means, yerr=bands, label=label, color=color, marker="o", capsize=3)
        axis.set(
            xlabel="SGD steps at test time (trained with 1)",
            ylabel="accuracy (%)",
            title="Omniglot 5-way 1-shot, held-out alphabets",
        )
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_switching(path: Path, switching: dict, title: str, ylabel: str, scale: float) -> None:
    from maml_ext.experiments.task_switching import CONDITIONS

    plt = require_plotting("the report's figures")
    methods = list(switching["results"])
    figure, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False)
    for axis, method in zip(axes[0], methods):
        by_k = switching["results"][method]
        steps = sorted(int(k) for k in by_k)
        for condition in CONDITIONS:
            means = [scale * by_k[str(k)][condition]["mean"] for k in steps]
            bands = [scale * by_k[str(k)][condition]["ci95"] for k in steps]
            axis.errorbar(steps, means, yerr=bands, label=condition, marker="o", capsize=3)
        axis.set(xlabel="SGD steps per adaptation (k)", ylabel=ylabel, title=f"{title}: {method}")
        if switching["metric"] == "MSE":
            axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_learning_curve(path: Path, rows: Sequence[dict], title: str) -> None:
    from maml_ext.experiments.reporting import plot_learning_curve

    plot_learning_curve(rows, path, title)


# --------------------------------------------------------------------------------------------
# RESULTS.md


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _steps(k: int) -> str:
    return f"{k} step" + ("" if k == 1 else "s")


def _mse(cell: dict) -> str:
    return f"{cell['mse']:.3f} ± {cell['ci95']:.3f}"


def _acc(cell: dict) -> str:
    return f"{100 * cell['accuracy']:.2f} ± {100 * cell['ci95']:.2f}"


def _machine() -> list[str]:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    from maml_ext import __version__

    return [
        f"- machine: {model}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{numpy.__version__}, maml_ext {__version__}",
    ]


def _sinusoid_section(second: dict, per_task: dict) -> list[str]:
    config = second["config"]
    tasks = per_task["tasks"]
    lines = [
        "## 1. Sinusoid regression at the paper's scale",
        "",
        f"MLP 1-40-40-1, K = {config['support']}, one inner step of {config['inner_lr']}, "
        f"{config['meta_batch']} tasks per meta-batch, Adam {config['outer_lr']}, "
        f"{config['iterations']} iterations, fused backend. Test: {config['eval_tasks']} tasks "
        f"(seed {second['eval_seed']}), each fine-tuned with SGD ({config['inner_lr']}) on its 10 "
        f"support points and scored on {config['eval_query_points']} evenly spaced points over "
        "[-5, 5]; MSE, mean ± 95% interval. A mean over tasks is infinite once one task's SGD "
        "diverges, so the rows under each method summarise the same per-task errors robustly: "
        "the median, the number of tasks that adaptation made worse than before it, and the mean "
        "over the others.",
        "",
    ]
    header = ["method"] + [_steps(k) for k in SINUSOID_TABLE_STEPS]
    rows = []
    for method in ("MAML", "pretrained"):
        by_step = per_task["results"][method]
        rows += [
            [f"**{method}**"]
            + [_mse(second["results"][method][str(k)]) for k in SINUSOID_TABLE_STEPS],
            [f"{method}: median"]
            + [f"{by_step[str(k)]['median']:.3f}" for k in SINUSOID_TABLE_STEPS],
            [f"{method}: tasks made worse"]
            + [f"{by_step[str(k)]['worse']} of {tasks}" for k in SINUSOID_TABLE_STEPS],
            [f"{method}: mean over the others"]
            + [
                f"{by_step[str(k)]['mse_rest']:.3f} ± {by_step[str(k)]['ci95_rest']:.3f}"
                for k in SINUSOID_TABLE_STEPS
            ],
        ]
    rows.append(["best fixed network (the mean function)", _mse(second["floor"]), "", "", ""])
    for method, values in REFERENCE_SINUSOID.items():
        rows.append([f"{method}, reference run (torch.func, issue 15)"] + [f"{v}" for v in values])
    lines += _table(header, rows)
    seconds = second["seconds"]
    lines += [
        "",
        f"Training: MAML {seconds['maml_training']:.0f} s "
        f"({1000 * seconds['maml_training'] / config['iterations']:.3f} ms per meta-step), "
        f"pretrained {seconds['pretrained_training']:.0f} s, evaluation "
        f"{seconds['evaluation']:.1f} s, one thread.",
        "",
        "The reference rows come from a different draw of test tasks. The 0-step error is set by "
        "the draw's amplitudes: no fixed network does better than the mean function, whose error "
        "on these tasks is given.",
        "",
    ]
    return lines


def _test_steps_section(per_task: dict, long: dict | None, figure: str | None) -> list[str]:
    lines = [
        "## 3. More steps at test time than in training",
        "",
        "Both networks were trained with one inner step. Left: sinusoid MSE against test steps "
        "0..10 (section 1's tasks); right: Omniglot accuracy of section 4's run.",
        "",
    ]
    if figure:
        lines += [f"![test steps]({figure})", ""]
    header = ["sinusoid", *(str(k) for k in range(TEST_STEPS + 1))]
    rows = []
    for method, by_step in per_task["results"].items():
        steps = sorted(by_step, key=int)
        rows.append([f"{method}: median"] + [f"{by_step[k]['median']:.3f}" for k in steps])
        rows.append([f"{method}: tasks made worse"] + [str(by_step[k]["worse"]) for k in steps])
    lines += _table(header, rows) + [""]
    if long is not None:
        header = ["Omniglot 5w1s", *(str(k) for k in sorted(map(int, long["eval"]["maml"])))]
        rows = []
        for method, label in (("maml", "MAML"), ("baseline", "pretrained")):
            by_step = long["eval"].get(method)
            if by_step:
                steps = sorted(by_step, key=int)
                rows.append([label] + [f"{100 * by_step[k]['accuracy']:.2f}" for k in steps])
        lines += _table(header, rows) + [""]
    return lines


def _order_section(sinusoid: dict | None, fewshot: dict[str, dict[str, dict]]) -> list[str]:
    lines = [
        "## 2. First order against second order",
        "",
        'The paper: "performance is nearly the same without the second derivative". Same '
        "settings, seed and budget for both, one thread. Sinusoid: time per meta-step is the "
        "training wall time over the iterations (task sampling and Adam included). Omniglot: "
        '"s per meta-step" is the median of timed fused steps on one batch, measured after all '
        'training (the 1-minute load average beside it); "training s per iteration" is the '
        "training wall time over the iterations, which shared the machine with the report's "
        "other processes.",
        "",
    ]
    if sinusoid is not None:
        header = ["sinusoid", *(_steps(k) for k in SINUSOID_TABLE_STEPS), "ms per meta-step"]
        rows = []
        for order, run in sinusoid.items():
            cells = [_mse(run["results"]["MAML"][str(k)]) for k in SINUSOID_TABLE_STEPS]
            ms = 1000 * run["seconds"]["maml_training"] / run["config"]["iterations"]
            rows.append([f"MAML, {order} order", *cells, f"{ms:.3f}"])
        lines += _table(header, rows) + [""]
    for preset_name, by_order in fewshot.items():
        preset = get_preset(preset_name)
        any_run = next(iter(by_order.values()))
        last = max(int(k) for k in any_run["eval"]["maml"])
        paper_k = min(preset.paper_eval_steps, last)
        header = [
            preset_name,
            f"accuracy after {paper_k} steps (paper's)",
            f"after {last} steps",
            "s per meta-step",
            "training s per iteration",
            "published (full Omniglot)",
        ]
        rows = []
        for order, run in by_order.items():
            evaluation = run["eval"]["maml"]
            timing = run.get("timing")
            rows.append(
                [
                    f"{order} order",
                    _acc(evaluation[str(paper_k)]),
                    _acc(evaluation[str(last)]),
                    f"{timing['median_s']:.3f} (load {timing['load_average']:.1f})"
                    if timing
                    else "",
                    f"{run['seconds_per_step']:.2f}",
                    f"{PAPER_OMNIGLOT.get(preset_name, {}).get(order, '')}",
                ]
            )
        lines += [
            f"{preset_name}: {any_run['iterations']} iterations of {_meta_batch(any_run)} tasks, "
            f"tested on held-out alphabets ({_eval_tasks(any_run)} tasks).",
            "",
            *_table(header, rows),
            "",
        ]
    return lines


def _meta_batch(run: dict) -> str:
    return str(run.get("meta_batch", "?"))


def _eval_tasks(run: dict) -> str:
    return str(run.get("eval_tasks", "?"))


def _long_section(run: dict, curve: str | None) -> list[str]:
    evaluation = run["eval"]
    steps = sorted(int(k) for k in evaluation["maml"])
    header = ["inner steps", "MAML", "pretrained baseline"]
    rows = []
    for k in steps:
        base = evaluation.get("baseline", {}).get(str(k))
        rows.append([str(k), _acc(evaluation["maml"][str(k)]), _acc(base) if base else ""])
    best = run.get("best_val") or {}
    lines = [
        "## 4. Omniglot 5-way 1-shot at about an hour of training",
        "",
        f"{run['iterations']} iterations of {_meta_batch(run)} tasks (second order, fused "
        f"backend, one thread) in {run['train_seconds'] / 60:.1f} min "
        f"({run['seconds_per_step']:.2f} s per iteration with validation); meta-trained on five "
        "alphabets of the minimal splits, validated on a sixth, tested on the two never seen in "
        f"training: {_eval_tasks(run)} tasks, accuracy (%) after k SGD steps, mean ± 95% interval."
        " The paper: 98.7 % after 60,000 iterations of 32 tasks on the full background set.",
        "",
        *_table(header, rows),
        "",
    ]
    if best:
        lines += [
            f"Best validation accuracy: {100 * best.get('accuracy', float('nan')):.2f} %.",
            "",
        ]
    if curve:
        lines += [f"![learning curve]({curve})", ""]
    return lines


def _switching_lines(name: str, switching: dict, figure: str | None, scale: float) -> list[str]:
    from maml_ext.experiments.task_switching import CONDITIONS, DIFFERENCES

    unit = "MSE" if switching["metric"] == "MSE" else "accuracy (%)"
    lines = [f"### {name} ({unit})", ""]
    header = ["method", "k", *CONDITIONS, *(d[0] for d in DIFFERENCES)]
    rows = []
    for method, by_k in switching["results"].items():
        for k, summary in by_k.items():
            cells = [
                f"{scale * summary[c]['mean']:.3f} ± {scale * summary[c]['ci95']:.3f}"
                for c in (*CONDITIONS, *(d[0] for d in DIFFERENCES))
            ]
            rows.append([method, k, *cells])
    lines += _table(header, rows) + [""]
    if figure:
        lines += [f"![{name} task switching]({figure})", ""]
    return lines


def _switching_answer(sinusoid: dict | None, omniglot: dict | None) -> list[str]:
    """A paragraph built from the numbers: for each method, at which k adapting from φ_A (and
    coming back from φ_AB) was better, worse or no different from adapting from θ."""
    from maml_ext.experiments.task_switching import DIFFERENCES

    sentences = []
    for name, run, lower_is_better in (("Sinusoid", sinusoid, True), ("Omniglot", omniglot, False)):
        if run is None:
            continue
        for method, by_k in run["results"].items():
            clauses = []
            for label, (key, _, _) in zip(("to B from φ_A", "back to A from φ_AB"), DIFFERENCES):
                verdicts: dict[str, list[str]] = {}
                for k, summary in by_k.items():
                    mean, ci95 = summary[key]["mean"], summary[key]["ci95"]
                    if not math.isfinite(mean) or abs(mean) <= ci95:
                        verdict = "no different (within the interval)"
                    elif (mean < 0) == lower_is_better:
                        verdict = "better"
                    else:
                        verdict = "worse"
                    verdicts.setdefault(verdict, []).append(k)
                parts = [f"{v} at k = {', '.join(ks)}" for v, ks in verdicts.items()]
                clauses.append(f"adapting {label} was {'; '.join(parts)}")
            sentences.append(f"{name}, {method}: " + ", and ".join(clauses) + ".")
    return [
        "**Answer from the numbers** (each against adapting from θ on the same tasks, paired "
        "95% intervals): " + " ".join(sentences),
        "",
    ]


def _runs_section(cache: RunCache) -> list[str]:
    rows = []
    for name, folder in cache.records:
        result_file = folder / "result.json"
        if not result_file.exists():
            continue
        finished = datetime.datetime.fromtimestamp(
            result_file.stat().st_mtime, datetime.timezone.utc
        )
        settings = json.loads(result_file.read_text())["settings"]
        rows.append(
            [
                name,
                "reused" if name in cache.hits else "run now",
                f"{finished:%Y-%m-%d %H:%M}",
                "`" + json.dumps(settings, separators=(",", ":")) + "`",
            ]
        )
    return [
        "## The runs",
        "",
        "Each run is cached under its name and the hash of its settings; a run is reused only "
        "while its settings are the same.",
        "",
        *_table(["run", "this time", "finished (UTC)", "settings"], rows),
        "",
    ]


def _write_results(out: Path, parts: dict, command: str, cache: RunCache, quick: bool) -> Path:
    figures = {}
    if "sinusoid_steps" in parts:
        figures["steps"] = f"{FIGURES}/test_steps.png"
        _plot_test_steps(out / figures["steps"], parts["sinusoid_steps"], parts.get("long"))
    if "long" in parts:
        figures["curve"] = f"{FIGURES}/omniglot_learning_curve.png"
        _plot_learning_curve(
            out / figures["curve"], parts["long"]["log"], "omniglot-5w1s, held-out alphabets"
        )
    for key, title, ylabel, scale in (
        ("sinusoid_switching", "Sinusoid", "MSE", 1.0),
        ("omniglot_switching", "Omniglot 5-way 1-shot", "accuracy (%)", 100.0),
    ):
        if key in parts:
            figures[key] = f"{FIGURES}/{key}.png"
            _plot_switching(out / figures[key], parts[key], title, ylabel, scale)

    lines = [
        "# Results: the paper's claims, measured",
        "",
        "Written by the command below; every number here comes from its runs (reused from its "
        "cache where the settings were unchanged).",
        "",
        f"    {command}",
        "",
        f"- written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        + (" (--quick: tiny budgets, for tests; not results)" if quick else ""),
        *_machine(),
        "- runs read from the cache: " + (", ".join(cache.hits) if cache.hits else "none"),
        "",
    ]
    if "sinusoid" in parts:
        lines += _sinusoid_section(parts["sinusoid"]["second"], parts["sinusoid_steps"])
    if "order" in parts or "sinusoid" in parts:
        lines += _order_section(parts.get("sinusoid"), parts.get("order", {}))
    if "sinusoid_steps" in parts:
        lines += _test_steps_section(
            parts["sinusoid_steps"], parts.get("long"), figures.get("steps")
        )
    if "long" in parts:
        lines += _long_section(parts["long"], figures.get("curve"))
    if "sinusoid_switching" in parts or "omniglot_switching" in parts:
        lines += [
            "## 5. Is an adapted network still a good place to adapt from?",
            "",
            "For pairs of test tasks (A, B): adapt θ to A in k steps (φ_A), then φ_A to B, then "
            "back to A; compared with adapting to each from θ. Conditions: `A from θ`, `B from "
            "θ`, `B from φ_A` (θ → A → B, scored on B), `A after B` (θ → A → B, scored on A), "
            "`A from φ_AB` (θ → A → B → A). Plain SGD with the method's inner rate everywhere.",
            "",
        ]
        if "sinusoid_switching" in parts:
            lines += _switching_lines(
                "Sinusoid", parts["sinusoid_switching"], figures.get("sinusoid_switching"), 1.0
            )
        if "omniglot_switching" in parts:
            lines += _switching_lines(
                "Omniglot 5-way 1-shot",
                parts["omniglot_switching"],
                figures.get("omniglot_switching"),
                100.0,
            )
        lines += _switching_answer(parts.get("sinusoid_switching"), parts.get("omniglot_switching"))
    lines += _runs_section(cache)
    path = out / "RESULTS.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The command


def run_report(
    out: PathLike = "docs",
    *,
    data_dir: PathLike | None = None,
    cache_dir: PathLike | None = "runs/report-cache",
    quick: bool = False,
    sections: Sequence[str] = SECTIONS,
    threads: int | None = 1,
    command: str | None = None,
    verbose: bool = True,
) -> Path:
    """Runs (or reads from the cache) the report's ``sections`` and writes ``out/RESULTS.md`` with
    them and its PNGs (in ``out/results``); returns its path. Sections run in parallel processes
    share the cache; a last run of all of them then reads every run back. The Omniglot sections
    need ``data_dir``."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigurationError(
            f"sections: expected some of {', '.join(SECTIONS)}, got {', '.join(unknown)}"
        )
    needs_omniglot = any(s in sections for s in ("order", "long", "switching"))
    if needs_omniglot and data_dir is None:
        raise ConfigurationError(
            "data_dir (--data-dir): the Omniglot folder is needed for the few-shot sections "
            "(e.g. ../shared/data/omniglot); or run only --sections sinusoid"
        )
    require_plotting("the report's figures")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="maml_ext-report-") as scratch:
        cache = RunCache(cache_dir, scratch=scratch)
        return _run_sections(
            out, cache, cache_dir, data_dir, quick, sections, threads, command, verbose
        )


def _run_sections(out, cache, cache_dir, data_dir, quick, sections, threads, command, verbose):
    sinusoid_scale = SinusoidScale.quick() if quick else SinusoidScale.full()
    fewshot_scale = FewShotScale.quick() if quick else FewShotScale.full()
    data_cache = None if cache_dir is None else Path(cache_dir) / "omniglot-arrays"
    fewshot = dict(data_dir=data_dir, cache_dir=data_cache, threads=threads)
    parts: dict = {}

    def say(text: str) -> None:
        if verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    if "sinusoid" in sections or "switching" in sections:
        say("sinusoid, second order")
        second = _sinusoid_run(cache, sinusoid_scale, first_order=False, seed=0)
        parts["sinusoid"] = {"second": second}
        say("sinusoid, 0..10 test steps per task")
        parts["sinusoid_steps"] = _sinusoid_test_steps(cache, sinusoid_scale, second)
        if "sinusoid" in sections:
            say("sinusoid, first order")
            parts["sinusoid"]["first"] = _sinusoid_run(cache, sinusoid_scale, True, seed=0)
    if "order" in sections:
        parts["order"] = {}
        for preset in fewshot_scale.compare_iterations:
            parts["order"][preset] = {}
            for order in ("second", "first"):
                say(f"{preset}, {order} order")
                run = fewshot_run(cache, preset, order == "first", fewshot_scale, **fewshot)
                run |= {
                    "meta_batch": fewshot_scale.meta_batch,
                    "eval_tasks": fewshot_scale.compare_test(preset)[0],
                }
                parts["order"][preset][order] = run
    if "long" in sections or "switching" in sections:
        say("omniglot-5w1s, the long run")
        run, run_dir = long_run(cache, fewshot_scale, **fewshot)
        parts["long"] = run | {
            "meta_batch": fewshot_scale.meta_batch,
            "eval_tasks": fewshot_scale.eval_tasks,
        }
    if "switching" in sections:
        say("task switching: sinusoid")
        parts["sinusoid_switching"] = _sinusoid_switching(
            cache, sinusoid_scale, parts["sinusoid"]["second"]
        )
        say("task switching: Omniglot")
        parts["omniglot_switching"] = _omniglot_switching(
            cache, fewshot_scale, run_dir, data_dir, data_cache, threads
        )
    if "order" in parts:
        # Timed last, apart from training: training shares the machine with the report's other
        # processes, and the steps are timed best when every run is done.
        for preset, by_order in parts["order"].items():
            for order, run in by_order.items():
                say(f"{preset}, {order} order: timing the meta-step")
                run["timing"] = step_timing(
                    cache, preset, order == "first", fewshot_scale, **fewshot
                )
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    command = command or "python -m maml_ext report " + " ".join(sys.argv[2:])
    path = _write_results(out, parts, command, cache, quick)
    say(f"wrote {path}")
    return path

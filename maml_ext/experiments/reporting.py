"""What the experiments report, defined once: the test-task seed, confidence intervals, text
tables, progress bars, plots and the training run log.

Progress bars (tqdm) and plots (matplotlib) belong to the optional ``experiments`` extra; they are
imported when first used, through :func:`maml_ext._optional.require`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from maml_ext._optional import require
from maml_ext.checkpoint import write_atomic, write_text_atomic

from ..types import PathLike

__all__ = [
    "DEFAULT_EVAL_SEED",
    "LOG_COLUMNS",
    "MeanCI",
    "mean_ci95",
    "text_table",
    "accuracy_table",
    "mse_table",
    "progress_bar",
    "require_progress_bars",
    "require_plotting",
    "RunLog",
    "plot_learning_curve",
    "plot_sinusoid_adaptation",
]

# Test tasks come from their own seed, independent of the training seed, so runs with different
# training seeds (and every checkpoint, backend and device) face the same tasks.
DEFAULT_EVAL_SEED = 20170309
# The columns of a few-shot run's log.csv (and the keys of each log.jsonl row).
LOG_COLUMNS = ("iteration", "phase", "loss", "accuracy", "accuracy_ci95", "support_loss", "seconds")


# --------------------------------------------------------------------------------------------
# Confidence intervals and tables


class MeanCI(NamedTuple):
    mean: float
    ci95: float  # half width of the 95% confidence interval of the mean
    std: float  # sample standard deviation (ddof = 1)


def mean_ci95(values) -> MeanCI:
    """The mean of ``values`` and its 95% confidence interval, ``1.96 * std / sqrt(n)`` with the
    sample standard deviation (ddof = 1); a single value has half width and std 0."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = values.mean().item()
    if values.numel() == 1:
        return MeanCI(mean, 0.0, 0.0)
    std = values.std(correction=1).item()
    return MeanCI(mean, 1.96 * std / math.sqrt(values.numel()), std)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a dashed line under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def accuracy_table(results: dict[str, dict[str, dict]], mark_steps: int | None = None) -> str:
    """The few-shot test table: a row per number of inner steps (``mark_steps``'s row marked
    "(paper)"), a column per method, cells "accuracy ± ci95 %"."""
    methods = list(results)
    steps = sorted({int(k) for by_step in results.values() for k in by_step})
    rows = []
    for k in steps:
        cells = []
        for method in methods:
            cell = results[method].get(str(k))
            cells.append(
                f"{100 * cell['accuracy']:.2f} ± {100 * cell['ci95']:.2f} %" if cell else ""
            )
        rows.append([f"{k}" + (" (paper)" if k == mark_steps else "")] + cells)
    return text_table(["steps"] + methods, rows)


def mse_table(results: dict[str, dict[str, dict]], steps: Sequence[int]) -> str:
    """The sinusoid table: a row per method, a column per number of steps, cells "mse ± ci95"."""
    header = ["method"] + [f"{s} step" + ("" if s == 1 else "s") for s in steps]
    rows = [
        [method]
        + [f"{by_steps[str(s)]['mse']:.3f} ± {by_steps[str(s)]['ci95']:.3f}" for s in steps]
        for method, by_steps in results.items()
    ]
    return text_table(header, rows)


# --------------------------------------------------------------------------------------------
# Progress bars


class _NoProgressBar:
    """What a disabled progress bar does: nothing (and it needs no tqdm)."""

    def __init__(self, iterable: Iterable | None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def require_progress_bars():
    """tqdm's bar class; commands that show progress call it before they start."""
    return require("tqdm.auto", "the progress bar (progress=True)").tqdm


def progress_bar(
    enabled: bool,
    iterable: Iterable | None = None,
    *,
    description: str,
    total: int | None = None,
    initial: int = 0,
    leave: bool = True,
):
    """A tqdm bar when ``enabled`` (tqdm is in the ``experiments`` extra), else a silent one."""
    if not enabled:
        return _NoProgressBar(iterable)
    tqdm = require_progress_bars()
    return tqdm(
        iterable, desc=description, total=total, initial=initial, leave=leave, dynamic_ncols=True
    )


# --------------------------------------------------------------------------------------------
# Plots


def require_plotting(purpose: str):
    """matplotlib's pyplot on the file-only Agg backend; commands that plot call it before they
    start, so a missing extra is reported before hours of training rather than after."""
    matplotlib = require("matplotlib", purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", purpose)


def _save_png_atomic(figure, path: PathLike) -> None:
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def plot_learning_curve(rows: Sequence[dict], path: PathLike, title: str) -> None:
    """Train (window means) and validation accuracy (with its confidence band) against
    iterations, from a :class:`RunLog`'s rows, as a PNG written atomically."""
    plt = require_plotting("the learning curve (learning_curve.png)")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for phase, label, style in (
        ("train", "train (query, after adaptation)", dict(color="tab:blue", alpha=0.7)),
        ("val", "validation (held-out classes)", dict(color="tab:orange", marker="o")),
    ):
        points = [
            (row["iteration"], row["accuracy"])
            for row in rows
            if row.get("phase") == phase and row.get("accuracy") is not None
        ]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, label=label, **style)
    bands = [
        (row["iteration"], row["accuracy"], row.get("accuracy_ci95") or 0.0)
        for row in rows
        if row.get("phase") == "val" and row.get("accuracy") is not None
    ]
    if bands:
        xs, ys, hs = zip(*bands)
        axis.fill_between(
            xs,
            [y - h for y, h in zip(ys, hs)],
            [y + h for y, h in zip(ys, hs)],
            color="tab:orange",
            alpha=0.2,
        )
    axis.set_xlabel("meta-iteration")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.set_title(title)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right")
    figure.tight_layout()
    _save_png_atomic(figure, path)
    plt.close(figure)


def plot_sinusoid_adaptation(
    path: PathLike, tasks, maml: dict[int, dict], pretrained: dict[int, dict], inner_lr: float
) -> None:
    """Saves a PNG with, for each kept test task (a :class:`~maml_ext.tasks.SinusoidBatch`), the
    true sine, its support points, MAML before and after 1 and the most steps, and the pretrained
    baseline after the most steps. ``maml``/``pretrained``: ``{steps: {"predictions": ...}}``."""
    plt = require_plotting("the sinusoid plot (sinusoid_adaptation.png)")
    most_steps = max(maml)
    num_plots = maml[0]["predictions"].shape[0]
    columns = min(num_plots, 2)
    rows = math.ceil(num_plots / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    grid_x = tasks.query_x[:num_plots, :, 0].cpu()
    curves = [
        (maml[0]["predictions"], "MAML, 0 steps", dict(color="tab:blue", linestyle=":")),
        (
            maml[1]["predictions"] if 1 in maml else None,
            "MAML, 1 step",
            dict(color="tab:blue", linestyle="--"),
        ),
        (maml[most_steps]["predictions"], f"MAML, {most_steps} steps", dict(color="tab:blue")),
        (
            pretrained[most_steps]["predictions"],
            f"pretrained, {most_steps} steps",
            dict(color="tab:orange"),
        ),
    ]
    for task, axis in enumerate(axes.flat):
        if task >= num_plots:
            axis.set_visible(False)
            continue
        axis.plot(
            grid_x[task], tasks.query_y[task, :, 0].cpu(), color="black", label="true function"
        )
        for predictions, label, style in curves:
            if predictions is not None:
                axis.plot(grid_x[task], predictions[task, :, 0], label=label, **style)
        axis.scatter(
            tasks.support_x[task, :, 0].cpu(),
            tasks.support_y[task, :, 0].cpu(),
            color="black",
            marker="^",
            zorder=3,
            label=f"{tasks.support_x.shape[1]} support points",
        )
        axis.set_title(
            f"A = {tasks.amplitude[task].item():.2f}, phase = {tasks.phase[task].item():.2f}"
        )
        axis.set_xlabel("x")
    axes.flat[0].legend(fontsize="small")
    figure.suptitle(f"K-shot sinusoid regression, SGD fine-tuning with step size {inner_lr}")
    figure.tight_layout()
    _save_png_atomic(figure, path)
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# The run log of few-shot training


class RunLog:
    """``log.jsonl`` and ``log.csv`` (columns :data:`LOG_COLUMNS`) under ``out_dir``, appended row
    by row, all rows kept for the plot.

    Opening it keeps the rows up to iteration ``keep_until`` (what the checkpoint being resumed
    covers; -1 for a fresh run) and rewrites both files atomically with just those rows.
    """

    def __init__(self, out_dir: Path, keep_until: int):
        self.jsonl_path = out_dir / "log.jsonl"
        self.csv_path = out_dir / "log.csv"
        self.rows: list[dict] = []
        if self.jsonl_path.is_file():
            # A killed run may have logged beyond its checkpoint (and left half a line).
            for line in self.jsonl_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and row.get("iteration", math.inf) <= keep_until:
                        self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        write_text_atomic(self.jsonl_path, "".join(json.dumps(row) + "\n" for row in self.rows))
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.csv_path, buffer.getvalue())

    def append(self, row: dict) -> None:
        row = {column: row.get(column) for column in LOG_COLUMNS}
        self.rows.append(row)
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=LOG_COLUMNS, lineterminator="\n").writerow(
                {k: ("" if v is None else v) for k, v in row.items()}
            )

    def rows_of(self, phase: str) -> list[dict]:
        """The rows of one phase ("train" or "val"), in order."""
        return [row for row in self.rows if row["phase"] == phase]

"""Few-shot image classification with MAML: training, the paper's test protocol, and a baseline.

Training (``python -m maml_ext train <preset> --data-dir DIR --out OUT``, :func:`train_fewshot`)
meta-trains a preset's network on the meta-training classes and writes, under ``OUT``:

- ``log.csv`` and ``log.jsonl``: one row per ``log_every`` iterations (phase ``train``: mean query
  loss and accuracy of the window) and per validation (phase ``val``: accuracy after the training
  number of inner steps on ``val_tasks`` fixed tasks from the held-out validation classes);
- ``learning_curve.png``: train and validation accuracy against iterations;
- ``checkpoint.pt``: everything needed to continue exactly (see :mod:`maml_ext.checkpoint`),
  written atomically every ``checkpoint_every`` iterations and at the end; ``best.pt``: the
  checkpoint with the best validation accuracy so far.

``resume=True`` continues from ``OUT/checkpoint.pt``: the same parameters, optimiser state, task
stream and RNG states, so N iterations in one go and N/2 + resume + N/2 give bit-identical weights
on the CPU. Rows logged after that checkpoint (by a run that was killed) are dropped.

Data splits. Omniglot: characters (default) or whole alphabets (``split_by="alphabet"``: train on
some alphabets, test on others) are cut into train / val / test by :class:`Omniglot`'s default
fractions (1100 : 100 : 423, the MAML code's split of the full 1623 characters) with a fixed split
seed (0 by default). On the two minimal archives (8 alphabets, 242 characters) that gives
164 / 15 / 63 characters by character, or by alphabet 5 / 1 / 2 alphabets (152 / 26 / 64
characters: Balinese, Greek, Japanese_(katakana), Korean, Tagalog / Latin / Early_Aramaic,
Sanskrit); every character counts 4 times (its rotations). miniImageNet: Ravi & Larochelle's train / val / test files.

Evaluation (``python -m maml_ext eval CHECKPOINT``, :func:`evaluate_checkpoint`) follows the
paper: ``tasks`` (600) test tasks drawn with a fixed seed from the test classes, which training
never saw; each is adapted with plain SGD on its support set (``MetaOptimizer.adapt`` with
``steps=k``, the trained inner rates) and scored on its query set (the preset's query count);
reported for every k in 0..``steps``: the mean accuracy and its 95% confidence interval,
``1.96 * std / sqrt(n)`` (std with ddof = 1). Tasks are drawn 25 at a time from one sampler seeded
with ``seed``, so the same seed gives the same tasks for every checkpoint, backend and device,
and the first n tasks of a longer evaluation are the n tasks of a shorter one.

Baseline (``eval --baseline``, :func:`pretrain_baseline`): the same network trained without
meta-learning, fine-tuned the same way. It is trained as an ordinary classifier over all
meta-training classes jointly (a softmax head with one output per training class, rotations
included; Adam 1e-3, batches of 64 images, ``baseline_iterations`` steps, batch norm with batch
statistics as in MAML). For each test task its head is replaced by a fresh N-way linear layer
initialised to zero (so the 0-step accuracy is chance and no random head favours a class), and the
whole network is then fine-tuned exactly like MAML's: ``MetaOptimizer.adapt`` with the preset's
inner learning rate, k = 0..``steps`` steps, on the same 600 tasks.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from maml_ext.checkpoint import (
    CHECKPOINT_FORMAT,
    build_meta_optimizer,
    read_checkpoint,
    remove_stale_temporaries,
    save_atomic,
)
from maml_ext.experiments.presets import PRESETS, ConfigurationError, FewShotPreset, get_preset

__all__ = [
    "DEFAULT_EVAL_SEED",
    "EVAL_CHUNK",
    "load_split",
    "per_step_accuracy",
    "evaluate_tasks",
    "summarise",
    "train_fewshot",
    "pretrain_baseline",
    "baseline_meta_optimizer",
    "evaluate_checkpoint",
]

# Test and validation tasks come from their own seeds, independent of the training seed.
DEFAULT_EVAL_SEED = 20170309
DEFAULT_VAL_SEED = 1234
# Tasks are drawn this many at a time: part of the definition of "the tasks of a seed".
EVAL_CHUNK = 25
LOG_COLUMNS = ("iteration", "phase", "loss", "accuracy", "accuracy_ci95", "support_loss",
               "seconds")
DEFAULT_BASELINE_ITERATIONS = 5000
BASELINE_BATCH = 64
BASELINE_FORMAT = "maml_ext.fewshot.baseline/1"

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Data


def load_split(preset: FewShotPreset, data_dir: PathLike, split: str, *,
               split_by: str = "character", split_seed: int = 0,
               cache_dir: Optional[PathLike] = None):
    """The ``split`` ("train", "val", "test") of the preset's dataset, read from ``data_dir``.

    Omniglot: ``split_by`` is "character" or "alphabet" and ``split_seed`` seeds the cut (see the
    module docstring). miniImageNet has fixed splits; both options are ignored.
    Missing or damaged data raises :class:`ConfigurationError` with the loader's explanation.
    """
    from maml_ext.tasks._data_errors import DatasetError

    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise ConfigurationError(f"data folder {data_dir} does not exist (--data-dir)")
    try:
        if preset.dataset == "omniglot":
            from maml_ext.tasks import Omniglot

            if split_by not in ("character", "alphabet"):
                raise ConfigurationError(f"split_by: expected 'character' or 'alphabet', got {split_by!r}")
            return Omniglot(data_dir, split, split_by=split_by, seed=split_seed, rotations=True,
                            cache_dir=cache_dir)
        from maml_ext.tasks import MiniImageNet

        return MiniImageNet(data_dir, split, cache_dir=cache_dir)
    except (FileNotFoundError, DatasetError) as error:
        raise ConfigurationError(f"cannot load {preset.dataset} {split!r} from {data_dir}: {error}") from error


def _sampler(dataset, preset: FewShotPreset, meta_batch: int, seed: int, device):
    from maml_ext.tasks import TaskSampler

    try:
        return TaskSampler(dataset, ways=preset.ways, shots=preset.shots, queries=preset.queries,
                           meta_batch=meta_batch, seed=seed, device=device)
    except ValueError as error:
        split = getattr(dataset, "split", "?")
        raise ConfigurationError(f"the {split!r} split cannot give {preset.name} tasks: {error}") from error


# --------------------------------------------------------------------------------------------
# Evaluation


def _base_weights(meta_optimizer, tasks: int) -> Dict[str, torch.Tensor]:
    """The model's own weights repeated per task: the "adapted" weights after 0 steps."""
    return {name: p.detach().unsqueeze(0).expand(tasks, *p.shape).contiguous()
            for name, p in meta_optimizer.model.named_parameters() if p.requires_grad}


def per_step_accuracy(meta_optimizer, support_x, support_y, query_x, query_y,
                      steps: Sequence[int]) -> Dict[int, Dict[str, torch.Tensor]]:
    """Per-task query accuracy and loss ``{k: {"accuracy": [T], "loss": [T]}}`` after k inner
    steps for each k in ``steps`` (0: the unadapted weights), via ``MetaOptimizer.adapt``."""
    results = {}
    for k in steps:
        if k == 0:
            weights = _base_weights(meta_optimizer, support_x.shape[0])
        else:
            weights = meta_optimizer.adapt(support_x, support_y, steps=k)
        logits = meta_optimizer.predict(weights, query_x)
        accuracy = (logits.argmax(-1) == query_y).float().mean(1)
        loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction="none")
        results[k] = {"accuracy": accuracy.cpu(), "loss": loss.view_as(query_y).mean(1).cpu()}
    return results


def evaluate_tasks(meta_optimizer, dataset, preset: FewShotPreset, *, tasks: int,
                   steps: Sequence[int], seed: int, device=None,
                   progress: Optional[str] = None) -> Dict[int, Dict[str, torch.Tensor]]:
    """:func:`per_step_accuracy` over ``tasks`` tasks drawn from ``dataset`` with ``seed``,
    ``EVAL_CHUNK`` at a time: ``{k: {"accuracy": [tasks], "loss": [tasks]}}``."""
    if tasks < 1:
        raise ConfigurationError(f"tasks: expected a positive number, got {tasks}")
    sampler = _sampler(dataset, preset, EVAL_CHUNK, seed, device)
    parts: Dict[int, Dict[str, List[torch.Tensor]]] = {k: {"accuracy": [], "loss": []} for k in steps}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tasks, desc=progress, dynamic_ncols=True, leave=False)
    done = 0
    dtype = next(meta_optimizer.model.parameters()).dtype
    while done < tasks:
        take = min(EVAL_CHUNK, tasks - done)
        batch = sampler.sample()
        batch = batch.to(dtype=dtype) if batch.support_x.dtype != dtype else batch
        sx, sy, qx, qy = (t[:take] for t in (batch.support_x, batch.support_y, batch.query_x,
                                             batch.query_y))
        for k, values in per_step_accuracy(meta_optimizer, sx, sy, qx, qy, steps).items():
            parts[k]["accuracy"].append(values["accuracy"])
            parts[k]["loss"].append(values["loss"])
        done += take
        if bar is not None:
            bar.update(take)
    if bar is not None:
        bar.close()
    return {k: {name: torch.cat(values) for name, values in by_name.items()}
            for k, by_name in parts.items()}


def mean_ci95(values) -> tuple:
    """``(mean, 1.96 * std / sqrt(n), std)`` with the sample standard deviation (ddof = 1)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    mean = values.mean().item()
    if values.numel() < 2:
        return mean, 0.0, 0.0
    std = values.std(correction=1).item()
    return mean, 1.96 * std / math.sqrt(values.numel()), std


def summarise(evaluation: Dict[int, Dict[str, torch.Tensor]]) -> Dict[str, dict]:
    """``{str(k): {"accuracy": mean, "ci95": half width, "std": std, "loss": mean loss}}``."""
    summary = {}
    for k in sorted(evaluation):
        mean, half, std = mean_ci95(evaluation[k]["accuracy"])
        summary[str(k)] = {"accuracy": mean, "ci95": half, "std": std,
                           "loss": evaluation[k]["loss"].double().mean().item()}
    return summary


def format_table(results: Dict[str, Dict[str, dict]], mark_steps: Optional[int] = None) -> str:
    """Rows: inner steps; columns: methods, "accuracy ± ci95" in percent."""
    methods = list(results)
    steps = sorted({int(k) for by_step in results.values() for k in by_step})
    header = ["steps"] + methods
    rows = []
    for k in steps:
        label = f"{k}" + (" (paper)" if k == mark_steps else "")
        cells = []
        for method in methods:
            cell = results[method].get(str(k))
            cells.append(f"{100 * cell['accuracy']:.2f} ± {100 * cell['ci95']:.2f} %" if cell else "")
        rows.append([label] + cells)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Logs and the learning curve


class _RunLog:
    """``log.jsonl`` and ``log.csv``, appended row by row (flushed), all rows kept for the plot."""

    def __init__(self, out_dir: Path, keep_until: int):
        self.jsonl_path = out_dir / "log.jsonl"
        self.csv_path = out_dir / "log.csv"
        self.rows: List[dict] = []
        if self.jsonl_path.is_file():
            # Resuming: keep what the checkpoint covers; a killed run may have logged beyond it
            # (and may have left half a line).
            for line in self.jsonl_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and row.get("iteration", math.inf) <= keep_until:
                        self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        _write_text_atomic(self.jsonl_path, text)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _write_text_atomic(self.csv_path, buffer.getvalue())

    def append(self, row: dict) -> None:
        row = {column: row.get(column) for column in LOG_COLUMNS}
        self.rows.append(row)
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=LOG_COLUMNS, lineterminator="\n").writerow(
                {k: ("" if v is None else v) for k, v in row.items()})


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def plot_learning_curve(rows: Sequence[dict], path: PathLike, title: str) -> None:
    """Train (window means) and validation accuracy against iterations, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for phase, label, style in (("train", "train (query, after adaptation)", dict(color="tab:blue", alpha=0.7)),
                                ("val", "validation (held-out classes)", dict(color="tab:orange", marker="o"))):
        points = [(row["iteration"], row["accuracy"]) for row in rows
                  if row.get("phase") == phase and row.get("accuracy") is not None]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, label=label, **style)
        if phase == "val":
            bands = [(row["iteration"], row["accuracy"], row.get("accuracy_ci95") or 0.0)
                     for row in rows if row.get("phase") == "val" and row.get("accuracy") is not None]
            if bands:
                xs, ys, hs = zip(*bands)
                axis.fill_between(xs, [y - h for y, h in zip(ys, hs)], [y + h for y, h in zip(ys, hs)],
                                  color="tab:orange", alpha=0.2)
    axis.set_xlabel("meta-iteration")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.set_title(title)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def _intra_op_threads(threads: Optional[int]):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _positive(name: str, value, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


_FIXED_ON_RESUME = ("seed", "split_by", "split_seed", "val_tasks", "val_seed")


def train_fewshot(
    preset: Union[str, FewShotPreset],
    data_dir: Optional[PathLike] = None,
    out_dir: Optional[PathLike] = None,
    *,
    iterations: Optional[int] = None,
    backend: Optional[str] = None,
    first_order: Optional[bool] = None,
    meta_batch: Optional[int] = None,
    seed: Optional[int] = None,
    checkpoint_every: Optional[int] = None,
    validate_every: Optional[int] = None,
    val_tasks: Optional[int] = None,
    log_every: Optional[int] = None,
    resume: bool = False,
    split_by: Optional[str] = None,
    split_seed: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    device=None,
    progress: bool = True,
    verbose: bool = True,
    cpu_threads: Optional[int] = None,
    stop_after: Optional[int] = None,
) -> dict:
    """Meta-trains ``preset`` (a name in :data:`PRESETS` or a :class:`FewShotPreset`); see the
    module docstring for what it writes under ``out_dir`` (default ``runs/<preset>``).

    Options left None take the preset's value (iterations, meta_batch, first_order) or the
    defaults: seed 0, backend "auto", checkpoint and validation every 500 iterations (0: only at
    the end), 100 validation tasks, a log row every 50 iterations, character split with split seed
    0, device "cuda" when available else "cpu". With ``resume=True`` every setting comes from
    ``out_dir/checkpoint.pt``; ``iterations`` may extend the run, and ``data_dir``, ``cache_dir``,
    ``backend``, ``device`` and the checkpoint, validation and log intervals may change; the
    others must match. ``stop_after`` ends this call after that many iterations (for tests and
    time-sliced jobs; the run stays resumable). Returns a summary dict.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    out = Path(out_dir if out_dir is not None else f"runs/{preset.name}")
    checkpoint_path = out / "checkpoint.pt"
    given = dict(seed=seed, split_by=split_by, split_seed=split_seed, val_tasks=val_tasks)

    if resume:
        if not checkpoint_path.is_file():
            raise ConfigurationError(f"--resume: no checkpoint at {checkpoint_path} to continue")
        try:
            state = read_checkpoint(checkpoint_path)
        except ValueError as error:
            raise ConfigurationError(str(error)) from error
        saved_preset = FewShotPreset.from_dict(state["preset"])
        if saved_preset.name != preset.name:
            raise ConfigurationError(f"{checkpoint_path} is a {saved_preset.name!r} run, not {preset.name!r}")
        for name, value in (("meta_batch", meta_batch), ("first_order", first_order)):
            if value is not None and value != getattr(saved_preset, name):
                raise ConfigurationError(f"--resume: the run was started with {name}="
                                         f"{getattr(saved_preset, name)!r}; it cannot change to {value!r}")
        settings = dict(state["settings"])
        for name, value in given.items():
            if value is not None and value != settings[name]:
                raise ConfigurationError(f"--resume: the run was started with {name}="
                                         f"{settings[name]!r}; it cannot change to {value!r}")
        preset = saved_preset
        start_iteration = int(state["iteration"])
        if iterations is not None:
            settings["iterations"] = iterations
        for name, value in (("data_dir", data_dir), ("cache_dir", cache_dir), ("backend", backend),
                            ("device", device), ("checkpoint_every", checkpoint_every),
                            ("validate_every", validate_every), ("log_every", log_every)):
            if value is not None:
                settings[name] = str(value) if name in ("data_dir", "cache_dir", "device") else value
    else:
        if checkpoint_path.exists():
            raise ConfigurationError(f"{checkpoint_path} exists: pass --resume to continue that run, "
                                     f"or choose another --out")
        if data_dir is None:
            raise ConfigurationError(f"{preset.name} needs --data-dir: the folder holding the "
                                     f"{preset.dataset} data")
        state = None
        preset = preset.with_overrides(meta_batch=meta_batch, first_order=first_order)
        start_iteration = 0
        settings = {
            "iterations": iterations if iterations is not None else preset.iterations,
            "seed": 0 if seed is None else seed,
            "split_by": "character" if split_by is None else split_by,
            "split_seed": 0 if split_seed is None else split_seed,
            "val_tasks": 100 if val_tasks is None else val_tasks,
            "val_seed": DEFAULT_VAL_SEED,
            "data_dir": str(data_dir),
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "backend": backend or "auto",
            "device": str(device) if device is not None else _default_device(),
            "checkpoint_every": 500 if checkpoint_every is None else checkpoint_every,
            "validate_every": 500 if validate_every is None else validate_every,
            "log_every": 50 if log_every is None else log_every,
        }
    _positive("iterations", settings["iterations"])
    _positive("checkpoint_every", settings["checkpoint_every"], allow_zero=True)
    _positive("validate_every", settings["validate_every"], allow_zero=True)
    _positive("log_every", settings["log_every"])
    _positive("val_tasks", settings["val_tasks"])
    if settings["backend"] not in ("auto", "reference", "fused"):
        raise ConfigurationError(f"backend: expected auto, reference or fused, got {settings['backend']!r}")
    if settings["iterations"] < start_iteration:
        raise ConfigurationError(f"iterations={settings['iterations']} but {checkpoint_path} is "
                                 f"already at iteration {start_iteration}")

    device_ = torch.device(settings["device"])
    # The run seeds and restores torch's global RNG (saved in checkpoints); fork it so that the
    # caller's stream is left as it was.
    rng_devices = [device_] if device_.type == "cuda" else []
    with _intra_op_threads(cpu_threads if device_.type == "cpu" else None), \
            torch.random.fork_rng(devices=rng_devices):
        return _train(preset, settings, out, state, start_iteration, device_, progress, verbose,
                      stop_after)


def _train(preset: FewShotPreset, settings: dict, out: Path, state: Optional[dict],
           start_iteration: int, device: torch.device, progress: bool, verbose: bool,
           stop_after: Optional[int]) -> dict:
    split = dict(split_by=settings["split_by"], split_seed=settings["split_seed"],
                 cache_dir=settings["cache_dir"])
    train_data = load_split(preset, settings["data_dir"], "train", **split)
    val_data = load_split(preset, settings["data_dir"], "val", **split)

    # Initial weights from the seed, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        meta = build_meta_optimizer(preset, device=device, backend=settings["backend"])
    sampler = _sampler(train_data, preset, preset.meta_batch, settings["seed"], device)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"

    window: List[List[float]] = []
    best_val, elapsed = None, 0.0
    if state is not None:
        meta.load_state_dict(state["meta_optimizer"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        window = [list(values) for values in state.get("log_window", [])]
        best_val = state.get("best_val")
        elapsed = float(state.get("seconds", 0.0))
        remove_stale_temporaries(checkpoint_path)
    else:
        torch.manual_seed(settings["seed"])
    # A fresh run starts fresh logs; a resumed one keeps the rows its checkpoint covers.
    log = _RunLog(out, keep_until=start_iteration if state is not None else -1)

    def checkpoint_state(iteration: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "maml",
            "meta_optimizer": meta.state_dict(),
            "preset": preset.to_dict(),
            "settings": dict(settings),
            "iteration": iteration,
            "sampler": sampler.state_dict(),
            "rng": _rng_state(),
            "log_window": window,
            "best_val": best_val,
            "seconds": elapsed,
            "torch_version": str(torch.__version__),
        }

    iterations = settings["iterations"]
    end = iterations if stop_after is None else min(iterations, start_iteration + stop_after)
    title = f"{preset.name}{' (first order)' if preset.first_order else ''}, seed {settings['seed']}"
    if verbose:
        print(f"{preset.name}: {len(train_data.labels)} training images, {sampler.num_classes} "
              f"training classes, {preset.ways}-way {preset.shots}-shot, {preset.queries} queries/class, "
              f"meta-batch {preset.meta_batch}, {preset.inner_steps} inner step(s) of {preset.inner_lr}, "
              f"backend {meta.backend}, device {device}; iterations {start_iteration}..{iterations}")

    from tqdm.auto import tqdm

    bar = tqdm(total=iterations, initial=start_iteration, desc=preset.name, disable=not progress,
               dynamic_ncols=True)
    pending: List[tuple] = []   # (loss, accuracy, support loss) tensors not yet synchronised
    last_val = None
    started = time.perf_counter()

    def flush_pending() -> None:
        for values in pending:
            window.append([float(v) for v in torch.stack(values).tolist()])
        pending.clear()

    iteration = start_iteration
    try:
        for iteration in range(start_iteration + 1, end + 1):
            batch = sampler.sample()
            result = meta.step(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
            pending.append((result.query_loss, result.query_accuracy, result.support_loss))
            bar.update(1)
            if iteration % 10 == 0 or iteration % settings["log_every"] == 0 or iteration == end:
                flush_pending()
                recent = window[-10:] or [[math.nan] * 3]
                postfix = {"loss": f"{sum(v[0] for v in recent) / len(recent):.3f}",
                           "acc": f"{sum(v[1] for v in recent) / len(recent):.3f}"}
                if last_val is not None:
                    postfix["val"] = f"{last_val:.3f}"
                bar.set_postfix(postfix)
            now_elapsed = elapsed + time.perf_counter() - started
            if iteration % settings["log_every"] == 0 or iteration == iterations:
                flush_pending()
                if window:
                    means = [sum(column) / len(window) for column in zip(*window)]
                    log.append({"iteration": iteration, "phase": "train", "loss": means[0],
                                "accuracy": means[1], "support_loss": means[2],
                                "seconds": round(now_elapsed, 3)})
                window.clear()
            every = settings["validate_every"]
            if (every and iteration % every == 0) or iteration == iterations:
                evaluation = evaluate_tasks(meta, val_data, preset, tasks=settings["val_tasks"],
                                            steps=[preset.inner_steps], seed=settings["val_seed"],
                                            device=device)[preset.inner_steps]
                accuracy, half, _ = mean_ci95(evaluation["accuracy"])
                last_val = accuracy
                log.append({"iteration": iteration, "phase": "val",
                            "loss": evaluation["loss"].double().mean().item(), "accuracy": accuracy,
                            "accuracy_ci95": half, "seconds": round(now_elapsed, 3)})
                if best_val is None or accuracy > best_val["accuracy"]:
                    best_val = {"iteration": iteration, "accuracy": accuracy, "ci95": half}
                    elapsed_now = elapsed + time.perf_counter() - started
                    flush_pending()
                    saved = checkpoint_state(iteration)
                    saved["seconds"] = elapsed_now
                    save_atomic(saved, out / "best.pt")
            every = settings["checkpoint_every"]
            if (every and iteration % every == 0) or iteration == end:
                flush_pending()
                saved = checkpoint_state(iteration)
                saved["seconds"] = elapsed + time.perf_counter() - started
                save_atomic(saved, checkpoint_path)
                plot_learning_curve(log.rows, out / "learning_curve.png", title)
    finally:
        bar.close()
    seconds = elapsed + time.perf_counter() - started
    plot_learning_curve(log.rows, out / "learning_curve.png", title)
    train_rows = [row for row in log.rows if row["phase"] == "train"]
    val_rows = [row for row in log.rows if row["phase"] == "val"]
    summary = {
        "preset": preset.name,
        "iteration": iteration,
        "finished": iteration >= iterations,
        "backend": meta.backend,
        "device": str(device),
        "seconds": seconds,
        "last_train": train_rows[-1] if train_rows else None,
        "last_val": val_rows[-1] if val_rows else None,
        "best_val": best_val,
        "files": {name: str(out / name) for name in
                  ("checkpoint.pt", "best.pt", "log.csv", "log.jsonl", "learning_curve.png")
                  if (out / name).exists()},
    }
    if verbose:
        line = f"{preset.name}: iteration {iteration}/{iterations} in {seconds:.1f} s"
        if val_rows:
            line += (f"; validation accuracy {100 * val_rows[-1]['accuracy']:.2f} ± "
                     f"{100 * val_rows[-1]['accuracy_ci95']:.2f} %")
        print(line)
        print(f"wrote {checkpoint_path}, {out / 'log.csv'}, {out / 'learning_curve.png'}")
    return summary


def _make_trainer(name: str):
    def train(**options) -> dict:
        return train_fewshot(name, **options)

    train.__name__ = train.__qualname__ = "train_" + name.replace("-", "_")
    # What the command line checks its options against: train_fewshot's, less the preset.
    signature = inspect.signature(train_fewshot)
    train.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    train.__doc__ = f"``train_fewshot({name!r}, **options)``: {PRESETS[name].description}."
    return train


# One function per preset, for the command line's registry ("maml_ext.experiments.fewshot:NAME").
for _name in PRESETS:
    globals()["train_" + _name.replace("-", "_")] = _make_trainer(_name)
del _name


# --------------------------------------------------------------------------------------------
# The baseline: the same network without meta-learning, fine-tuned the same way


def _classification_batch(dataset, generator: torch.Generator, size: int, device):
    """``size`` random images of the dataset (rotations included) and their class ids."""
    rotations = int(getattr(dataset, "rotations", 1))
    count = dataset.images.shape[0]
    index = torch.randint(count * rotations, (size,), generator=generator)
    image_index, rotation = index % count, index // count
    x = dataset.images[image_index]
    for turns in range(1, rotations):
        turned = rotation == turns
        if turned.any():
            x[turned] = torch.rot90(x[turned], turns, dims=(-2, -1))
    prepare = getattr(dataset, "prepare_batch", None)
    x = prepare(x) if prepare is not None else x
    y = dataset.labels[image_index].long() * rotations + rotation
    return x.to(device), y.to(device)


def pretrain_baseline(preset: FewShotPreset, train_data, *, iterations: int, seed: int = 0,
                      batch_size: int = BASELINE_BATCH, lr: float = 1e-3, device="cpu",
                      progress: bool = False):
    """The preset's network trained as one classifier over all of ``train_data``'s classes
    (rotations included): Adam, cross-entropy, batches of ``batch_size`` images. Returns the
    model, whose last layer has one output per training class."""
    classes = int(train_data.labels.max()) + 1
    classes *= int(getattr(train_data, "rotations", 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = preset.with_overrides(ways=classes).build_model().to(device)
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    from tqdm.auto import tqdm

    bar = tqdm(range(iterations), desc="baseline pretraining", disable=not progress, dynamic_ncols=True)
    for iteration in bar:
        x, y = _classification_batch(train_data, generator, batch_size, device)
        loss = F.cross_entropy(model(x), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        if progress and iteration % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model


def baseline_meta_optimizer(preset: FewShotPreset, pretrained, *, device="cpu", backend="auto"):
    """A MetaOptimizer (no outer optimiser) for the pretrained body with a fresh zero-initialised
    ``preset.ways``-way head, fine-tuned with the preset's inner learning rate."""
    from maml_ext import MetaOptimizer

    model = preset.build_model().to(device)
    body = {name: value for name, value in pretrained.state_dict().items()
            if not name.startswith(_head_prefix(model))}
    missing = model.load_state_dict(body, strict=False)
    head = _head_prefix(model)
    if any(not name.startswith(head) for name in missing.missing_keys) or missing.unexpected_keys:
        raise ValueError(f"pretrained network does not match {preset.name}: {missing}")
    last = model[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return MetaOptimizer(model, None, inner_lr=preset.inner_lr, inner_steps=1, backend=backend)


def _head_prefix(model) -> str:
    return f"{len(model) - 1}."


# --------------------------------------------------------------------------------------------
# The test protocol


def evaluate_checkpoint(
    checkpoint: PathLike,
    data_dir: Optional[PathLike] = None,
    *,
    tasks: int = 600,
    steps: int = 10,
    seed: int = DEFAULT_EVAL_SEED,
    out: Optional[PathLike] = None,
    split: str = "test",
    backend: str = "auto",
    device=None,
    baseline: bool = False,
    baseline_iterations: int = DEFAULT_BASELINE_ITERATIONS,
    baseline_path: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    verbose: bool = True,
    cpu_threads: Optional[int] = None,
) -> dict:
    """The paper's test protocol on a training checkpoint (see the module docstring).

    ``data_dir`` and ``cache_dir`` default to the training run's; the split (by character or
    alphabet, split seed) is always the training run's, so the test classes are the ones it never
    saw. Writes JSON to ``out`` (default ``eval.json`` beside the checkpoint; nothing when
    ``out`` is ""), prints the table when ``verbose``, and returns the dict written:
    ``results["maml"][str(k)] = {"accuracy", "ci95", "std", "loss"}`` for k = 0..steps, and
    ``results["baseline"]`` too with ``baseline=True``. The pretrained baseline is cached in
    ``baseline_path`` (default ``baseline.pt`` beside the checkpoint) and reused when its settings
    match.
    """
    from maml_ext.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    _positive("tasks", tasks)
    _positive("steps", steps, allow_zero=True)
    if split not in ("train", "val", "test"):
        raise ConfigurationError(f"split: expected train, val or test, got {split!r}")
    try:
        state = read_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigurationError(str(error)) from error
    preset = FewShotPreset.from_dict(state["preset"])
    settings = state["settings"]
    data_dir = data_dir if data_dir is not None else settings["data_dir"]
    cache_dir = cache_dir if cache_dir is not None else settings.get("cache_dir")
    device = torch.device(device if device is not None else _default_device())
    split_options = dict(split_by=settings["split_by"], split_seed=settings["split_seed"],
                         cache_dir=cache_dir)

    with _intra_op_threads(cpu_threads if device.type == "cpu" else None):
        test_data = load_split(preset, data_dir, split, **split_options)
        meta = load_checkpoint(checkpoint, device=device, backend=backend, outer_optimizer=False)
        step_list = list(range(steps + 1))
        started = time.perf_counter()
        results = {"maml": summarise(evaluate_tasks(
            meta, test_data, preset, tasks=tasks, steps=step_list, seed=seed, device=device,
            progress="MAML test tasks" if progress else None))}
        seconds = {"maml": time.perf_counter() - started}
        baseline_info = None
        if baseline:
            started = time.perf_counter()
            path = Path(baseline_path) if baseline_path is not None else checkpoint.with_name("baseline.pt")
            baseline_settings = {
                "preset": preset.name, "data_dir": str(data_dir), **split_options,
                "cache_dir": None, "iterations": baseline_iterations, "batch_size": BASELINE_BATCH,
                "lr": 1e-3, "seed": settings["seed"],
            }
            model = _cached_baseline(path, baseline_settings, preset)
            if model is None:
                train_data = load_split(preset, data_dir, "train", **split_options)
                model = pretrain_baseline(preset, train_data, iterations=baseline_iterations,
                                          seed=settings["seed"], device=device, progress=progress)
                save_atomic({"format": BASELINE_FORMAT, "settings": baseline_settings,
                             "num_classes": model[-1].out_features,
                             "model": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
            seconds["baseline_pretraining"] = time.perf_counter() - started
            started = time.perf_counter()
            base_meta = baseline_meta_optimizer(preset, model.to(device), device=device, backend=backend)
            results["baseline"] = summarise(evaluate_tasks(
                base_meta, test_data, preset, tasks=tasks, steps=step_list, seed=seed,
                device=device, progress="baseline test tasks" if progress else None))
            seconds["baseline"] = time.perf_counter() - started
            baseline_info = {
                "description": "the same network trained as one softmax classifier over all "
                               "meta-training classes (no meta-learning), then per test task a "
                               "fresh zero-initialised N-way head and the whole network "
                               "fine-tuned with MetaOptimizer.adapt at the same inner learning "
                               "rate and steps as MAML",
                "file": str(path), **baseline_settings,
            }

    report = {
        "checkpoint": str(checkpoint),
        "preset": preset.name,
        "first_order": preset.first_order,
        "trained_iterations": int(state["iteration"]),
        "split": split,
        "split_by": settings["split_by"],
        "split_seed": settings["split_seed"],
        "data_dir": str(data_dir),
        "classes": (int(test_data.labels.max()) + 1) * int(getattr(test_data, "rotations", 1)),
        "tasks": tasks,
        "steps": steps,
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
        print(f"{preset.name} ({state['iteration']} iterations): {split} accuracy on {tasks} tasks "
              f"({preset.ways}-way {preset.shots}-shot, {preset.queries} queries/class, seed {seed}) "
              f"after k inner steps of {preset.inner_lr}; mean ± 95% CI")
        print(format_table(results, preset.paper_eval_steps))
    if out != "":
        out_path = Path(out) if out is not None else checkpoint.with_name("eval.json")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out_path, json.dumps(report, indent=2) + "\n")
        report["file"] = str(out_path)
        if verbose:
            print(f"wrote {out_path}")
    return report


def _cached_baseline(path: Path, settings: dict, preset: FewShotPreset):
    """The pretrained baseline saved at ``path`` when it was made with ``settings``, else None."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(saved, dict) or saved.get("format") != BASELINE_FORMAT or saved.get("settings") != settings:
        return None
    model = preset.with_overrides(ways=int(saved["num_classes"])).build_model()
    model.load_state_dict(saved["model"])
    return model

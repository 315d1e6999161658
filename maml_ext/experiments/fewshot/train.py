"""Meta-training a few-shot preset (``python -m maml_ext train <preset>``), resumable exactly.

:func:`train_fewshot` resolves the run's settings (a new run, or ``resume=True`` from
``OUT/checkpoint.pt``) and hands them to a :class:`FewShotTraining`, which owns the run's state
(the MetaOptimizer, the task sampler, the log and the checkpoints) and steps it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from maml_ext.checkpoint import remove_stale_temporaries, save_atomic
from maml_ext.experiments.algorithms import (
    default_outer_schedule,
    outer_scheduler,
    resolve_options,
)
from maml_ext.experiments.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    build_meta_optimizer,
    read_checkpoint,
)
from maml_ext.experiments.fewshot.data import load_split, make_sampler
from maml_ext.experiments.fewshot.evaluate import evaluate_tasks
from maml_ext.experiments.presets import ConfigurationError, FewShotPreset, get_preset
from maml_ext.experiments.reporting import (
    RunLog,
    mean_ci95,
    plot_learning_curve,
    progress_bar,
    require_plotting,
    require_progress_bars,
)
from maml_ext.experiments.runtime import (
    check_count,
    current_ranks,
    default_device,
    intra_op_threads,
    restarted_by_torchrun,
    rng_state,
    set_rng_state,
)

from ...types import PathLike

__all__ = ["train_fewshot", "FewShotTraining", "DEFAULT_VAL_SEED"]

# Validation tasks come from their own seed, independent of the training seed.
DEFAULT_VAL_SEED = 1234
# How often (in iterations) the progress bar's running means are refreshed.
_POSTFIX_EVERY = 10


def train_fewshot(
    preset: str | FewShotPreset,
    data_dir: PathLike | None = None,
    out_dir: PathLike | None = None,
    *,
    iterations: int | None = None,
    backend: str | None = None,
    first_order: bool | None = None,
    meta_batch: int | None = None,
    seed: int | None = None,
    checkpoint_every: int | None = None,
    validate_every: int | None = None,
    val_tasks: int | None = None,
    log_every: int | None = None,
    resume: bool = False,
    split_by: str | None = None,
    split_seed: int | None = None,
    cache_dir: PathLike | None = None,
    device=None,
    progress: bool = True,
    verbose: bool = True,
    cpu_threads: int | None = None,
    stop_after: int | None = None,
    algorithm: str | None = None,
    algorithm_options: dict | None = None,
    outer_schedule: str | None = None,
    inner_lr: float | None = None,
    inner_steps: int | None = None,
    msl_iterations: int | None = None,
    first_order_until: int | None = None,
    ways: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    image_size: int | None = None,
    backbone: str | None = None,
) -> dict:
    """Meta-trains ``preset`` (a name in :data:`~maml_ext.experiments.presets.PRESETS` or a
    :class:`FewShotPreset`); see :mod:`maml_ext.experiments.fewshot` for what it writes under
    ``out_dir`` (default ``runs/<preset>``).

    Options left None take the preset's value (iterations, meta_batch, first_order) or the
    defaults: seed 0, backend "auto", checkpoint and validation every 500 iterations (0: only at
    the end), 100 validation tasks, a log row every 50 iterations, character split with split seed
    0, device "cuda" when available else "cpu". With ``resume=True`` every setting comes from
    ``out_dir/checkpoint.pt``; ``iterations`` may extend the run, and ``data_dir``, ``cache_dir``,
    ``backend``, ``device`` and the checkpoint, validation and log intervals may change; the
    others must match. ``stop_after`` ends this call after that many iterations (for tests and
    time-sliced jobs; the run stays resumable). Returns a summary dict.

    ``ways``, ``shots``, ``queries``, ``backbone`` ("conv4" or "resnet12") and, for image
    folders, ``image_size`` change the preset's task shape and network; a resumed run must keep
    them.

    ``algorithm`` (default: the preset's, "maml" but for the MAML++ presets) picks the
    meta-learning algorithm of :mod:`maml_ext.experiments.algorithms`, ``algorithm_options`` its
    options (e.g. ``{"lam": 2.0}`` for iMAML; Reptile's ``anneal=True`` anneals ε over the run's
    iterations); ``outer_schedule`` "constant" or "cosine" (default: cosine for MAML++ only);
    ``inner_lr``, ``inner_steps``, ``msl_iterations``, ``first_order_until`` override the
    preset's. All of these are fixed for a resumed run.
    """
    task_shape = dict(
        ways=ways, shots=shots, queries=queries, image_size=image_size, backbone=backbone
    )
    if isinstance(preset, str):
        preset = get_preset(preset)
    out = Path(out_dir if out_dir is not None else f"runs/{preset.name}")
    checkpoint_path = out / "checkpoint.pt"
    ranks = current_ranks()
    if not resume and restarted_by_torchrun() and checkpoint_path.exists():
        resume = True  # torchrun restarted the workers after a failure: continue the run
    # Under torchrun rank 0 alone prints and writes (FewShotTraining).
    verbose, progress = verbose and ranks.main, progress and ranks.main
    if resume:
        changes = dict(
            iterations=iterations,
            data_dir=data_dir,
            cache_dir=cache_dir,
            backend=backend,
            device=device,
            checkpoint_every=checkpoint_every,
            validate_every=validate_every,
            log_every=log_every,
        )
        # What the task streams and splits depend on: a resumed run must keep it.
        fixed = dict(
            meta_batch=meta_batch,
            first_order=first_order,
            algorithm=algorithm,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            msl_iterations=msl_iterations,
            first_order_until=first_order_until,
            outer_schedule=outer_schedule,
            seed=seed,
            split_by=split_by,
            split_seed=split_seed,
            val_tasks=val_tasks,
        )
        preset, settings, state = _resumed_run(preset, checkpoint_path, fixed, changes)
        _check_resumed_options(settings, algorithm_options)
        _check_resumed_task_shape(preset, task_shape)
    else:
        if checkpoint_path.exists():
            raise ConfigurationError(
                f"{checkpoint_path} exists: pass --resume to continue that run, "
                f"or choose another --out"
            )
        if data_dir is None:
            raise ConfigurationError(
                f"{preset.name} needs --data-dir: the folder holding the {preset.dataset} data"
            )
        preset = preset.with_overrides(
            meta_batch=meta_batch,
            first_order=first_order,
            algorithm=algorithm,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            msl_iterations=msl_iterations,
            first_order_until=first_order_until,
        )
        if preset.algorithm == "fomaml":
            preset = preset.with_overrides(first_order=True)
        preset = preset.with_overrides(**task_shape)
        state = None
        settings = _new_run_settings(
            preset,
            iterations=iterations,
            seed=seed,
            split_by=split_by,
            split_seed=split_seed,
            val_tasks=val_tasks,
            data_dir=data_dir,
            cache_dir=cache_dir,
            backend=backend,
            device=device,
            checkpoint_every=checkpoint_every,
            validate_every=validate_every,
            log_every=log_every,
        )
        settings.update(
            _algorithm_settings(preset, algorithm_options, outer_schedule, settings["iterations"])
        )
    start_iteration = int(state["iteration"]) if state is not None else 0
    _check_settings(settings, start_iteration, checkpoint_path)
    # Fail now, not after the first hours of training, when the experiments extra is missing.
    require_plotting("the learning curve (learning_curve.png)")
    if progress:
        require_progress_bars()

    device = torch.device(settings["device"])
    # The run seeds and restores torch's global RNG (saved in checkpoints); fork it so that the
    # caller's stream is left as it was.
    rng_devices = [device] if device.type == "cuda" else []
    with (
        intra_op_threads(cpu_threads if device.type == "cpu" else None),
        torch.random.fork_rng(devices=rng_devices),
    ):
        training = FewShotTraining(preset, settings, out, device, state)
        end = settings["iterations"]
        if stop_after is not None:
            end = min(end, start_iteration + stop_after)
        if verbose:
            training.describe()
        training.run(end, progress)
        return training.summary(verbose)


def _new_run_settings(
    preset: FewShotPreset,
    *,
    iterations,
    seed,
    split_by,
    split_seed,
    val_tasks,
    data_dir,
    cache_dir,
    backend,
    device,
    checkpoint_every,
    validate_every,
    log_every,
) -> dict:
    """A new run's settings: the options given, the defaults for the others."""
    return {
        "iterations": iterations if iterations is not None else preset.iterations,
        "seed": 0 if seed is None else seed,
        "split_by": "character" if split_by is None else split_by,
        "split_seed": 0 if split_seed is None else split_seed,
        "val_tasks": 100 if val_tasks is None else val_tasks,
        "val_seed": DEFAULT_VAL_SEED,
        "data_dir": str(data_dir),
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "backend": backend or "auto",
        "device": str(device) if device is not None else default_device(),
        "checkpoint_every": 500 if checkpoint_every is None else checkpoint_every,
        "validate_every": 500 if validate_every is None else validate_every,
        "log_every": 50 if log_every is None else log_every,
    }


def _algorithm_settings(
    preset: FewShotPreset, options: dict | None, outer_schedule: str | None, iterations: int
) -> dict:
    """A new run's ``algorithm_options`` (resolved, so the checkpoint rebuilds the same
    meta-learner) and ``outer_schedule``."""
    options = dict(options or {})
    if options.get("anneal") is True:  # Reptile: anneal ε over the whole run
        options["anneal"] = iterations
    elif options.get("anneal") is False:
        options["anneal"] = None
    return {
        "algorithm_options": resolve_options(preset.algorithm, options),
        "outer_schedule": outer_schedule or default_outer_schedule(preset.algorithm),
    }


def _check_resumed_options(settings: dict, options: dict | None) -> None:
    """A resumed run keeps its algorithm's options: a given one must match the saved one."""
    saved = settings.get("algorithm_options") or {}
    for name, value in (options or {}).items():
        if value is None or (name == "anneal" and value is True and saved.get(name)):
            continue
        if saved.get(name) != value:
            raise ConfigurationError(
                f"--resume: the run was started with {name}={saved.get(name)!r}; "
                f"it cannot change to {value!r}"
            )


def _resumed_run(preset: FewShotPreset, checkpoint_path: Path, fixed: dict, changes: dict):
    """``(preset, settings, state)`` of the run saved at ``checkpoint_path``, with ``changes``
    (the options that may change; None: keep) applied and ``fixed`` (None: not given) checked
    against the saved values."""
    if not checkpoint_path.is_file():
        raise ConfigurationError(f"--resume: no checkpoint at {checkpoint_path} to continue")
    try:
        state = read_checkpoint(checkpoint_path)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    saved_preset = FewShotPreset.from_dict(state["preset"])
    if saved_preset.name != preset.name:
        raise ConfigurationError(
            f"{checkpoint_path} is a {saved_preset.name!r} run, not {preset.name!r}"
        )
    settings = dict(state["settings"])
    for name, value in fixed.items():
        if name in _PRESET_FIELDS:
            saved = getattr(saved_preset, name)
        elif name == "outer_schedule":
            saved = settings.get(name, "constant")
        else:
            saved = settings[name]
        if value is not None and value != saved:
            raise ConfigurationError(
                f"--resume: the run was started with {name}={saved!r}; "
                f"it cannot change to {value!r}"
            )
    for name, value in changes.items():
        if value is not None:
            settings[name] = str(value) if name in ("data_dir", "cache_dir", "device") else value
    return saved_preset, settings, state


# Settings a run keeps in its preset (the others are in its settings).
_PRESET_FIELDS = (
    "meta_batch",
    "first_order",
    "algorithm",
    "inner_lr",
    "inner_steps",
    "msl_iterations",
    "first_order_until",
)


def _check_resumed_task_shape(saved: FewShotPreset, task_shape: dict) -> None:
    """The task shape and network of a resumed run cannot change (None: not given)."""
    for name, value in task_shape.items():
        if value is not None and value != getattr(saved, name):
            raise ConfigurationError(
                f"--resume: the run was started with {name}={getattr(saved, name)!r}; "
                f"it cannot change to {value!r}"
            )


def _check_settings(settings: dict, start_iteration: int, checkpoint_path: Path) -> None:
    check_count("iterations", settings["iterations"])
    check_count("checkpoint_every", settings["checkpoint_every"], allow_zero=True)
    check_count("validate_every", settings["validate_every"], allow_zero=True)
    check_count("log_every", settings["log_every"])
    check_count("val_tasks", settings["val_tasks"])
    if settings["backend"] not in ("auto", "reference", "fused"):
        raise ConfigurationError(
            f"backend: expected auto, reference or fused, got {settings['backend']!r}"
        )
    if settings["iterations"] < start_iteration:
        raise ConfigurationError(
            f"iterations={settings['iterations']} but {checkpoint_path} is "
            f"already at iteration {start_iteration}"
        )


def _due(iteration: int, every: int) -> bool:
    """Whether an ``every``-iterations event falls on ``iteration`` (never when ``every`` is 0)."""
    return every > 0 and iteration % every == 0


class _RowsInMemory:
    """The log of ranks other than 0 under torchrun: the rows, no files."""

    def __init__(self):
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def rows_of(self, phase: str) -> list[dict]:
        return [row for row in self.rows if row["phase"] == phase]


class FewShotTraining:
    """One meta-training run in progress: built fresh or from a checkpoint's ``state``, stepped
    by :meth:`run`, which logs, validates and checkpoints on the settings' intervals.

    The query loss, accuracy and support loss of each step stay on the device (``_pending``) until
    a log row or the progress bar needs them, then become floats in ``_window``: the steps since
    the last train row, which the checkpoint keeps so that a resumed run logs the same rows.
    """

    def __init__(
        self,
        preset: FewShotPreset,
        settings: dict,
        out: Path,
        device: torch.device,
        state: dict | None = None,
    ):
        self.preset, self.settings, self.out, self.device = preset, settings, out, device
        split = dict(
            split_by=settings["split_by"],
            split_seed=settings["split_seed"],
            cache_dir=settings["cache_dir"],
        )
        self.train_data = load_split(preset, settings["data_dir"], "train", **split)
        if preset.dataset == "folder" and not preset.channels:
            # The network's input channels come from the images (the checkpoint keeps them).
            self.preset = preset = preset.with_overrides(channels=self.train_data.channels)
        self.val_data = load_split(preset, settings["data_dir"], "val", **split)
        self.ranks = ranks = current_ranks()
        if preset.meta_batch < ranks.world_size:
            raise ConfigurationError(
                f"meta_batch: {preset.meta_batch} tasks cannot be shared by {ranks.world_size} "
                "processes (each needs at least one)"
            )
        # Initial weights from the seed, without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings["seed"])
            self.meta = build_meta_optimizer(
                preset,
                device=device,
                backend=settings["backend"],
                algorithm_options=settings.get("algorithm_options"),
                distributed=ranks.distributed,
            )
        self.scheduler = outer_scheduler(
            self.meta, settings.get("outer_schedule", "constant"), settings["iterations"]
        )
        # Across processes each rank draws its share of the meta-batch, from a stream reseeded
        # per (seed, rank, iteration) (Ranks.stream_seed), so that the tasks do not depend on
        # saved per-rank states and a run resumes with any number of processes.
        self.sampler = make_sampler(
            self.train_data, preset, ranks.share(preset.meta_batch)[1], settings["seed"], device
        )
        out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = out / "checkpoint.pt"

        self.iteration = 0
        self.best_val: dict | None = None
        self._window: list[list[float]] = []
        self._pending: list[tuple] = []
        self._last_val: float | None = None
        self._seconds_before = 0.0  # training time of earlier calls (a resumed run)
        self._started = time.perf_counter()
        if state is not None:
            self.meta.load_state_dict(state["meta_optimizer"])
            if self.scheduler is not None and state.get("outer_scheduler") is not None:
                self.scheduler.load_state_dict(state["outer_scheduler"])
            if not ranks.distributed:
                if state["sampler"] is not None:
                    self.sampler.load_state_dict(state["sampler"])
                else:  # saved by a run across processes: continue from the per-iteration stream
                    self.sampler.generator.manual_seed(
                        ranks.stream_seed(settings["seed"], int(state["iteration"]) + 1)
                    )
            set_rng_state(state["rng"])
            self.iteration = int(state["iteration"])
            self._window = [list(values) for values in state.get("log_window", [])]
            self.best_val = state.get("best_val")
            self._seconds_before = float(state.get("seconds", 0.0))
            if ranks.main:
                remove_stale_temporaries(self.checkpoint_path)
        else:
            torch.manual_seed(settings["seed"])
        # A fresh run starts fresh logs; a resumed one keeps the rows its checkpoint covers.
        if ranks.main:
            self.log = RunLog(out, keep_until=self.iteration if state is not None else -1)
        else:
            self.log = _RowsInMemory()

    @property
    def title(self) -> str:
        first_order = " (first order)" if self.preset.first_order else ""
        algorithm = "" if self.preset.algorithm == "maml" else f", {self.preset.algorithm}"
        return f"{self.preset.name}{first_order}{algorithm}, seed {self.settings['seed']}"

    def seconds(self) -> float:
        """Training time so far, earlier calls of a resumed run included."""
        return self._seconds_before + time.perf_counter() - self._started

    def describe(self) -> None:
        preset = self.preset
        print(
            f"{preset.name} ({preset.algorithm}): {len(self.train_data.labels)} training images, "
            f"{self.sampler.num_classes} training classes, {preset.ways}-way {preset.shots}-shot, "
            f"{preset.queries} queries/class, meta-batch {preset.meta_batch}, "
            f"{preset.inner_steps} inner step(s) of {preset.inner_lr}, "
            f"backend {self.meta.backend}, "
            f"device {self.device}; iterations {self.iteration}..{self.settings['iterations']}"
        )

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, end: int, progress: bool) -> None:
        """Meta-trains up to iteration ``end``, logging, validating and checkpointing on the way."""
        iterations = self.settings["iterations"]
        bar = progress_bar(
            progress, description=self.preset.name, total=iterations, initial=self.iteration
        )
        try:
            for iteration in range(self.iteration + 1, end + 1):
                self._step()
                self.iteration = iteration
                bar.update(1)
                if (
                    _due(iteration, _POSTFIX_EVERY)
                    or _due(iteration, self.settings["log_every"])
                    or iteration == end
                ):
                    bar.set_postfix(self._running_means())
                seconds = self.seconds()
                if _due(iteration, self.settings["log_every"]) or iteration == iterations:
                    self._log_train_window(seconds)
                if _due(iteration, self.settings["validate_every"]) or iteration == iterations:
                    self._validate(seconds)
                if _due(iteration, self.settings["checkpoint_every"]) or iteration == end:
                    self._save_checkpoint()
        finally:
            bar.close()
        if self.ranks.main:
            plot_learning_curve(self.log.rows, self.out / "learning_curve.png", self.title)

    def _step(self) -> None:
        if self.ranks.distributed:
            self.sampler.generator.manual_seed(
                self.ranks.stream_seed(self.settings["seed"], self.iteration + 1)
            )
        batch = self.sampler.sample()
        result = self.meta.step(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if self.scheduler is not None:
            self.scheduler.step()
        self._pending.append((result.query_loss, result.query_accuracy, result.support_loss))

    def _flush_pending(self) -> None:
        """Moves the pending per-step values to the window as floats (one device sync each)."""
        for values in self._pending:
            self._window.append([float(v) for v in torch.stack(values).tolist()])
        self._pending.clear()

    def _running_means(self) -> dict:
        """The progress bar's postfix: loss and accuracy of the last 10 steps, last validation."""
        self._flush_pending()
        recent = self._window[-10:] or [[math.nan] * 3]
        postfix = {
            "loss": f"{sum(v[0] for v in recent) / len(recent):.3f}",
            "acc": f"{sum(v[1] for v in recent) / len(recent):.3f}",
        }
        if self._last_val is not None:
            postfix["val"] = f"{self._last_val:.3f}"
        return postfix

    def _log_train_window(self, seconds: float) -> None:
        """A train row with the window's means (query loss, accuracy, support loss)."""
        self._flush_pending()
        if self._window:
            loss, accuracy, support_loss = (
                sum(column) / len(self._window) for column in zip(*self._window)
            )
            self.log.append(
                {
                    "iteration": self.iteration,
                    "phase": "train",
                    "loss": loss,
                    "accuracy": accuracy,
                    "support_loss": support_loss,
                    "seconds": round(seconds, 3),
                }
            )
        self._window.clear()

    def _validate(self, seconds: float) -> None:
        """A val row: accuracy after the training number of inner steps on the fixed validation
        tasks; ``best.pt`` when it is the best so far."""
        steps = self.preset.inner_steps
        evaluation = evaluate_tasks(
            self.meta,
            self.val_data,
            self.preset,
            tasks=self.settings["val_tasks"],
            steps=[steps],
            seed=self.settings["val_seed"],
            device=self.device,
            ranks=self.ranks,
        )[steps]
        accuracy, half, _ = mean_ci95(evaluation["accuracy"])
        self._last_val = accuracy
        self.log.append(
            {
                "iteration": self.iteration,
                "phase": "val",
                "loss": evaluation["loss"].double().mean().item(),
                "accuracy": accuracy,
                "accuracy_ci95": half,
                "seconds": round(seconds, 3),
            }
        )
        if self.best_val is None or accuracy > self.best_val["accuracy"]:
            self.best_val = {"iteration": self.iteration, "accuracy": accuracy, "ci95": half}
            self._save_checkpoint(self.out / "best.pt", plot=False)

    def _save_checkpoint(self, path: Path | None = None, plot: bool = True) -> None:
        """Everything :meth:`__init__` needs to continue exactly, written atomically to ``path``
        (default ``checkpoint.pt``); with ``plot``, the learning curve so far too. Under torchrun
        rank 0 alone writes (every rank holds the same state)."""
        self._flush_pending()
        if not self.ranks.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": "maml",
            "meta_optimizer": self.meta.state_dict(),
            "outer_scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "preset": self.preset.to_dict(),
            "settings": dict(self.settings),
            "iteration": self.iteration,
            # Across processes the tasks come from per-iteration streams: no state to keep.
            "sampler": None if self.ranks.distributed else self.sampler.state_dict(),
            "world_size": self.ranks.world_size,
            "rng": rng_state(),
            "log_window": self._window,
            "best_val": self.best_val,
            "seconds": self.seconds(),
            "torch_version": str(torch.__version__),
        }
        save_atomic(state, path if path is not None else self.checkpoint_path)
        if plot:
            plot_learning_curve(self.log.rows, self.out / "learning_curve.png", self.title)

    # ---- the result ---------------------------------------------------------------------------

    def summary(self, verbose: bool) -> dict:
        """What :func:`train_fewshot` returns (and prints when ``verbose``)."""
        iterations = self.settings["iterations"]
        seconds = self.seconds()
        train_rows, val_rows = self.log.rows_of("train"), self.log.rows_of("val")
        files = ("checkpoint.pt", "best.pt", "log.csv", "log.jsonl", "learning_curve.png")
        summary = {
            "preset": self.preset.name,
            "algorithm": self.preset.algorithm,
            "iteration": self.iteration,
            "finished": self.iteration >= iterations,
            "backend": self.meta.backend,
            "device": str(self.device),
            "seconds": seconds,
            "last_train": train_rows[-1] if train_rows else None,
            "last_val": val_rows[-1] if val_rows else None,
            "best_val": self.best_val,
            "files": {name: str(self.out / name) for name in files if (self.out / name).exists()},
        }
        if verbose:
            line = f"{self.preset.name}: iteration {self.iteration}/{iterations} in {seconds:.1f} s"
            if val_rows:
                line += (
                    f"; validation accuracy {100 * val_rows[-1]['accuracy']:.2f} ± "
                    f"{100 * val_rows[-1]['accuracy_ci95']:.2f} %"
                )
            print(line)
            print(
                f"wrote {self.checkpoint_path}, {self.out / 'log.csv'}, "
                f"{self.out / 'learning_curve.png'}"
            )
        return summary

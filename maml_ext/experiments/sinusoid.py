"""Sinusoid regression: MAML against a pretrained baseline.

Finn et al. 2017, section 5.1, Figure 2.

MAML meta-trains an MLP 1-40-40-1 (ReLU) with one inner SGD step (alpha = 0.01) on K = 10 support
points per task, 25 tasks per meta-batch, Adam (1e-3) on the mean MSE of the adapted weights on 10
query points. The baseline is the same network regressed on all tasks jointly: batches of tasks,
plain supervised MSE on all their points, Adam (1e-3), the same number of iterations.

Evaluation, on ``eval_tasks`` fresh tasks from a separate fixed seed: each network is fine-tuned per
task with plain SGD (alpha = 0.01) on the task's K = 10 support points, and scored by the mean
squared error against the true function on ``eval_query_points`` evenly spaced x over [-5, 5]
(the whole input range, so the score measures the recovered function, not 10 random points),
after 0, 1, 5 and 10 steps. Reported: the mean over tasks and its 95% confidence interval,
1.96 * std / sqrt(n) with the sample standard deviation (ddof = 1).
"""

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from maml_ext.checkpoint import save_atomic, write_text_atomic
from maml_ext.experiments.presets import ConfigurationError
from maml_ext.experiments.reporting import (
    DEFAULT_EVAL_SEED,
    mean_ci95,
    mse_table,
    plot_sinusoid_adaptation,
    progress_bar,
    require_plotting,
    require_progress_bars,
)
from maml_ext.experiments.runtime import (
    ONE_PROCESS,
    Ranks,
    check_count,
    current_ranks,
    intra_op_threads,
    restarted_by_torchrun,
    weights_per_task,
)
from maml_ext.tasks.sinusoid import Sinusoid, SinusoidBatch

__all__ = [
    "DEFAULT_ITERATIONS",
    "EVAL_STEPS",
    "make_sinusoid_model",
    "sgd_adapt",
    "predict_per_task",
    "evaluate_adaptation",
    "train_sinusoid",
]

# The paper's run (its Figure 2): about a minute of MAML on a 2-core CPU with the fused backend
# (timings in bench/NOTES.md); --iterations shortens it.
DEFAULT_ITERATIONS = 70000
EVAL_STEPS = (0, 1, 5, 10)

Weights = dict[str, torch.Tensor]
# adapt(support_x, support_y, steps) -> per-task weights; predict(weights, x) -> per-task outputs.
AdaptFn = Callable[[torch.Tensor, torch.Tensor, int], Weights]
PredictFn = Callable[[Weights, torch.Tensor], torch.Tensor]


def make_sinusoid_model(hidden: int = 40) -> nn.Sequential:
    """The paper's regressor: an MLP 1-40-40-1 with ReLU, taking ``[N, 1]`` inputs."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def predict_per_task(model: nn.Module, weights: Weights, x: torch.Tensor) -> torch.Tensor:
    """Outputs ``[T, N, *out]`` of ``model`` run on each task's ``x[t]`` with its ``weights[t]``."""

    def run_one(task_weights, task_x):
        return functional_call(model, task_weights, (task_x,))

    with torch.no_grad():
        return vmap(run_one)(weights, x)


def sgd_adapt(
    model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, inner_lr: float
) -> Weights:
    """Per-task weights after ``steps`` plain SGD steps of MSE on each task's support points.

    Independent of :class:`maml_ext.MetaOptimizer` on purpose: it fine-tunes the pretrained
    baseline, and the tests check that it agrees with ``MetaOptimizer.adapt``, so both methods are
    fine-tuned the same way.
    """

    def support_loss(task_weights, task_x, task_y):
        return F.mse_loss(functional_call(model, task_weights, (task_x,)), task_y)

    support_grad = vmap(grad(support_loss))
    weights = weights_per_task(model, support_x.shape[0])
    for _ in range(steps):
        grads = support_grad(weights, support_x, support_y)
        weights = {name: w - inner_lr * grads[name] for name, w in weights.items()}
    return weights


def evaluate_adaptation(
    adapt: AdaptFn,
    predict: PredictFn,
    base_weights: Callable[[int], Weights],
    tasks: SinusoidBatch,
    steps: Iterable[int] = EVAL_STEPS,
    keep_predictions: int = 0,
) -> dict[int, dict]:
    """Query MSE per task after each number of adaptation steps.

    ``base_weights(T)`` gives the unadapted per-task weights, used for 0 steps. Returns
    ``{steps: {"per_task_mse": [T] tensor, "predictions": [keep, Q, 1] tensor or None}}``; the
    predictions of the first ``keep_predictions`` tasks are kept for plots.
    """
    results = {}
    num_tasks = tasks.support_x.shape[0]
    for step_count in steps:
        if step_count == 0:
            weights = base_weights(num_tasks)
        else:
            weights = adapt(tasks.support_x, tasks.support_y, step_count)
        predictions = predict(weights, tasks.query_x).detach()
        per_task_mse = ((predictions - tasks.query_y) ** 2).flatten(1).mean(1)
        results[step_count] = {
            "per_task_mse": per_task_mse.cpu(),
            "predictions": predictions[:keep_predictions].cpu() if keep_predictions else None,
        }
    return results


def _summarise(evaluation: dict[int, dict]) -> dict[str, dict]:
    summary = {}
    for step_count, result in evaluation.items():
        mean, half_width, _ = mean_ci95(result["per_task_mse"])
        summary[str(step_count)] = {"mse": mean, "ci95": half_width}
    return summary


class _LossCurve:
    """``[iteration, mean loss]`` rows, one per ``log_every`` iterations (and the last), shown on
    the progress bar as ``label``. One device sync per window rather than per step: cheap on the
    CPU, matters on a GPU."""

    def __init__(self, iterations: int, log_every: int, bar, label: str):
        self.iterations, self.log_every, self.bar, self.label = iterations, log_every, bar, label
        self.rows: list[list[float]] = []
        self._window: list[torch.Tensor] = []

    def add(self, iteration: int, loss: torch.Tensor) -> None:
        self._window.append(loss.detach())
        if len(self._window) == self.log_every or iteration == self.iterations - 1:
            mean_loss = torch.stack(self._window).mean().item()
            self.rows.append([iteration + 1, mean_loss])
            self.bar.set_postfix({self.label: f"{mean_loss:.3f}"})
            self._window = []


def _train_maml(
    optimizer,
    task_source: Sinusoid,
    iterations: int,
    meta_batch: int,
    device,
    log_every: int,
    progress: bool,
    *,
    ranks: Ranks = ONE_PROCESS,
    seed: int = 0,
    start: int = 0,
    curve_state: dict | None = None,
    checkpoint=None,
    checkpoint_every: int = 0,
) -> list[list[float]]:
    """MAML's iterations ``start .. iterations - 1``. Across processes each rank draws its share
    of the meta-batch from its own stream (:meth:`Ranks.stream_seed`) and the MetaOptimizer
    all-reduces; ``checkpoint(iterations_done, curve)`` runs every ``checkpoint_every``
    iterations and at the end (when given)."""
    bar = progress_bar(progress and ranks.main, range(start, iterations), description="MAML")
    curve = _LossCurve(iterations, log_every, bar, "query_mse")
    if curve_state is not None:
        curve.rows = [list(row) for row in curve_state["rows"]]
        curve._window = [torch.tensor(value) for value in curve_state["window"]]
    _, share = ranks.share(meta_batch)
    for iteration in bar:
        if ranks.distributed:
            task_source.generator.manual_seed(ranks.stream_seed(seed, iteration))
            batch = task_source.sample(share, device=device)
        else:
            batch = task_source.sample(meta_batch, device=device)
        result = optimizer.step(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        curve.add(iteration, result.query_loss)
        done = iteration + 1
        if checkpoint is not None and (
            (checkpoint_every and done % checkpoint_every == 0) or done == iterations
        ):
            checkpoint(done, curve)
    bar.close()
    return curve.rows


def _train_pretrained(
    model: nn.Module,
    task_source: Sinusoid,
    iterations: int,
    meta_batch: int,
    lr: float,
    device,
    log_every: int,
    progress: bool,
) -> list[list[float]]:
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    bar = progress_bar(progress, range(iterations), description="pretrained")
    curve = _LossCurve(iterations, log_every, bar, "mse")
    for iteration in bar:
        batch = task_source.sample(meta_batch, device=device)
        # Joint regression: every point of every task, no adaptation.
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        loss = F.mse_loss(model(x), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        curve.add(iteration, loss)
    bar.close()
    return curve.rows


def train_sinusoid(
    iterations: int = DEFAULT_ITERATIONS,
    out_dir: str | None = "runs/sinusoid",
    seed: int = 0,
    backend: str = "auto",
    meta_batch: int = 25,
    inner_lr: float = 0.01,
    outer_lr: float = 1e-3,
    inner_steps: int = 1,
    first_order: bool = False,
    support: int = 10,
    query: int = 10,
    eval_tasks: int = 600,
    eval_steps: Sequence[int] = EVAL_STEPS,
    eval_query_points: int = 100,
    eval_seed: int = DEFAULT_EVAL_SEED,
    plot_tasks: int = 4,
    device=None,
    progress: bool = True,
    log_every: int = 100,
    verbose: bool = True,
    cpu_threads: int | None = 1,
    algorithm: str = "maml",
    algorithm_options: dict | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> dict:
    """Meta-trains the sinusoid regressor with MAML, trains the pretrained baseline, evaluates both.

    ``algorithm`` meta-trains with another member of the MAML family instead (any of
    :data:`maml_ext.experiments.presets.ALGORITHMS` but ``mamlpp``, whose options are the few-shot
    presets'), with ``algorithm_options`` as for the few-shot presets (e.g. ``{"lam": 2.0}``;
    Reptile's ``anneal=True`` anneals ε over ``iterations``); results stay under "MAML".

    Writes ``sinusoid_eval.json`` (config, seeds, results, training curves, timings),
    ``sinusoid_adaptation.png`` and ``sinusoid_models.pt`` (both networks' state dicts) under
    ``out_dir`` (nothing is written when it is None), prints the result table when ``verbose``,
    and returns the dict written to the JSON file. ``results[method][str(steps)]`` holds
    ``{"mse": mean, "ci95": half_width}`` for ``method`` in ``("MAML", "pretrained")``.

    ``cpu_threads`` sets torch's intra-op threads for the run on a CPU device (restored afterwards;
    None leaves them alone). One by default: the network's 40-wide matrices are too small to gain
    from intra-op parallelism, and on a busy 2-core machine two threads made the reference backend
    several times slower.

    ``checkpoint_every``: write ``sinusoid_checkpoint.pt`` (MAML's state, atomically) under
    ``out_dir`` every N iterations and at the end of MAML's training; default 0 (none) in a new
    run in one process, 100 under torchrun or when resuming. ``resume``: continue MAML's
    training from that checkpoint (``iterations`` may extend it; the world size may differ); a
    worker that torchrun restarts resumes by itself.

    Under torchrun (torch.distributed initialised) the meta-batch is split across the processes,
    each drawing its share from its own stream (seed, rank, iteration), one all-reduce per step;
    rank 0 alone trains the baseline, evaluates and writes files, and the other ranks return
    ``{"rank": r}`` after MAML's training.
    """
    ranks = current_ranks()
    if checkpoint_every is None:
        checkpoint_every = 100 if ranks.distributed or resume else 0
    check_count("checkpoint_every", checkpoint_every, allow_zero=True)
    if ranks.distributed and meta_batch < ranks.world_size:
        raise ConfigurationError(
            f"meta_batch: {meta_batch} tasks cannot be shared by {ranks.world_size} processes "
            "(each needs at least one)"
        )
    eval_steps = tuple(sorted(set(int(s) for s in eval_steps) | {0}))
    device = torch.device(device) if device is not None else torch.device("cpu")
    options = _sinusoid_algorithm_options(algorithm, algorithm_options, iterations)
    config = dict(
        iterations=iterations,
        seed=seed,
        backend=backend,
        meta_batch=meta_batch,
        inner_lr=inner_lr,
        outer_lr=outer_lr,
        inner_steps=inner_steps,
        first_order=first_order,
        support=support,
        query=query,
        model="MLP 1-40-40-1 ReLU",
        eval_tasks=eval_tasks,
        eval_steps=list(eval_steps),
        eval_query_points=eval_query_points,
        eval_query="evenly spaced grid over x_range",
        eval_seed=eval_seed,
        device=str(device),
        cpu_threads=cpu_threads,
        algorithm=algorithm,
        algorithm_options=options,
    )
    # Fail now, not after training, when the experiments extra is missing.
    if out_dir is not None and min(plot_tasks, eval_tasks) > 0:
        require_plotting("the sinusoid plot (sinusoid_adaptation.png)")
    if progress:
        require_progress_bars()
    with intra_op_threads(cpu_threads if device.type == "cpu" else None):
        return _train_and_evaluate(
            config,
            device,
            out_dir,
            plot_tasks,
            progress,
            log_every,
            verbose,
            ranks=ranks,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )


def _sinusoid_algorithm_options(algorithm: str, options: dict | None, iterations: int) -> dict:
    from maml_ext.experiments.algorithms import resolve_options
    from maml_ext.experiments.presets import ConfigurationError

    if algorithm == "mamlpp":
        raise ConfigurationError(
            "sinusoid does not run --algorithm mamlpp (its options are the few-shot presets')"
        )
    options = dict(options or {})
    if options.get("anneal") is True:
        options["anneal"] = iterations
    elif options.get("anneal") is False:
        options["anneal"] = None
    return resolve_options(algorithm, options)


def _other_meta_learner(algorithm: str, model: nn.Module, outer_optimizer, config: dict):
    """iMAML or Reptile for the sinusoid regressor (MSE)."""
    from maml_ext import ImplicitMetaOptimizer, Reptile

    options = config["algorithm_options"]
    common = dict(
        inner_lr=config["inner_lr"],
        inner_steps=config["inner_steps"],
        loss="mse",
        backend=config["backend"],
    )
    if algorithm == "imaml":
        return ImplicitMetaOptimizer(
            model,
            outer_optimizer,
            lam=options["lam"],
            cg_steps=options["cg_steps"],
            cg_damping=options["cg_damping"],
            **common,
        )
    return Reptile(
        model,
        outer_lr=options["epsilon"],
        final_outer_lr=options["final_epsilon"],
        inner_optimizer=options["inner_optimizer"],
        anneal=options["anneal"],
        **common,
    )


CHECKPOINT_FORMAT = "maml_ext.sinusoid.checkpoint/1"
CHECKPOINT_NAME = "sinusoid_checkpoint.pt"
# What MAML's tasks and updates depend on: a resumed run must keep them.
_RESUME_FIXED = (
    "algorithm",
    "algorithm_options",
    "seed",
    "meta_batch",
    "inner_lr",
    "outer_lr",
    "inner_steps",
    "first_order",
    "support",
    "query",
)


def _read_resume_state(path: str, config: dict) -> dict:
    if not os.path.isfile(path):
        raise ConfigurationError(f"--resume: no checkpoint at {path} to continue")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling reports damage with many exception types
        raise ConfigurationError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigurationError(f"{path} is not a maml_ext sinusoid checkpoint")
    for name in _RESUME_FIXED:
        if state["config"][name] != config[name]:
            raise ConfigurationError(
                f"--resume: the run was started with {name}={state['config'][name]!r}; "
                f"it cannot change to {config[name]!r}"
            )
    if state["iteration"] > config["iterations"]:
        raise ConfigurationError(
            f"iterations={config['iterations']} but {path} is already at iteration "
            f"{state['iteration']}"
        )
    return state


def _train_and_evaluate(
    config: dict,
    device: torch.device,
    out_dir: str | None,
    plot_tasks: int,
    progress: bool,
    log_every: int,
    verbose: bool,
    *,
    ranks: Ranks = ONE_PROCESS,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> dict:
    from maml_ext import MetaOptimizer
    from maml_ext.checkpoint import remove_stale_temporaries

    seed, iterations, meta_batch = config["seed"], config["iterations"], config["meta_batch"]
    support, query, inner_lr = config["support"], config["query"], config["inner_lr"]
    eval_tasks, eval_steps = config["eval_tasks"], tuple(config["eval_steps"])
    eval_query_points, eval_seed = config["eval_query_points"], config["eval_seed"]

    # Both networks start from the same weights, drawn from the seed without touching the caller's
    # global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        maml_model = make_sinusoid_model().to(device)
    pretrained_model = copy.deepcopy(maml_model)

    # Separate task streams, so the baseline's tasks do not depend on how many MAML draws.
    maml_tasks = Sinusoid(support=support, query=query, seed=seed)
    pretrained_tasks = Sinusoid(support=support, query=query, seed=seed + 1_000_003)

    outer_optimizer = torch.optim.Adam(maml_model.parameters(), lr=config["outer_lr"])
    algorithm = config.get("algorithm", "maml")
    if algorithm in ("maml", "fomaml", "metasgd", "anil"):
        meta_optimizer = MetaOptimizer(
            maml_model,
            outer_optimizer,
            inner_lr=inner_lr,
            inner_steps=config["inner_steps"],
            first_order=config["first_order"] or algorithm == "fomaml",
            loss="mse",
            backend=config["backend"],
            distributed=ranks.distributed,
            **{"metasgd": {"learn_inner_lr": "per_parameter"}, "anil": {"adapt": "head"}}.get(
                algorithm, {}
            ),
        )
    elif ranks.distributed:
        raise ConfigurationError(
            f"algorithm: {algorithm} does not run across processes yet; run it in one process "
            "(without torchrun) or pick one of maml, fomaml, metasgd, anil"
        )
    else:
        meta_optimizer = _other_meta_learner(algorithm, maml_model, outer_optimizer, config)

    checkpoint_path = None if out_dir is None else os.path.join(out_dir, CHECKPOINT_NAME)
    if checkpoint_path is not None and restarted_by_torchrun() and os.path.isfile(checkpoint_path):
        resume = True  # torchrun restarted the workers after a failure: continue the run
    state, start_iteration = None, 0
    if resume:
        if checkpoint_path is None:
            raise ConfigurationError("--resume needs an output folder (--out)")
        state = _read_resume_state(checkpoint_path, config)
        meta_optimizer.load_state_dict(state["meta_optimizer"])
        maml_tasks.load_state_dict(state["task_stream"])
        start_iteration = int(state["iteration"])
        if ranks.main:
            remove_stale_temporaries(checkpoint_path)
        if verbose and ranks.main:
            print(f"resuming sinusoid from iteration {start_iteration} of {iterations}")

    def checkpoint(done: int, curve: _LossCurve) -> None:
        window = [float(value) for value in curve._window]  # every rank: the same syncs
        if not ranks.main:
            return
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "iteration": done,
                "config": config,
                "meta_optimizer": meta_optimizer.state_dict(),
                "task_stream": maml_tasks.state_dict(),
                "curve": {"rows": curve.rows, "window": window},
                "world_size": ranks.world_size,
            },
            checkpoint_path,
        )

    start = time.perf_counter()
    maml_curve = _train_maml(
        meta_optimizer,
        maml_tasks,
        iterations,
        meta_batch,
        device,
        log_every,
        progress,
        ranks=ranks,
        seed=seed,
        start=start_iteration,
        curve_state=None if state is None else state["curve"],
        checkpoint=checkpoint if checkpoint_every and checkpoint_path else None,
        checkpoint_every=checkpoint_every,
    )
    maml_seconds = time.perf_counter() - start
    if not ranks.main:
        return {"experiment": "sinusoid", "rank": ranks.rank, "iteration": iterations}

    start = time.perf_counter()
    pretrained_curve = _train_pretrained(
        pretrained_model,
        pretrained_tasks,
        iterations,
        meta_batch,
        config["outer_lr"],
        device,
        log_every,
        progress,
    )
    pretrained_seconds = time.perf_counter() - start

    start = time.perf_counter()
    test_source = Sinusoid(support=support, query=0, seed=eval_seed)
    test_tasks = test_source.sample(eval_tasks, device=device)
    grid_x, grid_y = test_source.grid(test_tasks.amplitude, test_tasks.phase, eval_query_points)
    test_tasks = test_tasks._replace(query_x=grid_x, query_y=grid_y)
    keep = min(plot_tasks, eval_tasks)

    maml_eval = evaluate_adaptation(
        adapt=lambda sx, sy, steps: meta_optimizer.adapt(sx, sy, steps=steps),
        predict=meta_optimizer.predict,
        base_weights=lambda tasks: weights_per_task(maml_model, tasks),
        tasks=test_tasks,
        steps=eval_steps,
        keep_predictions=keep,
    )
    pretrained_eval = evaluate_adaptation(
        adapt=lambda sx, sy, steps: sgd_adapt(pretrained_model, sx, sy, steps, inner_lr),
        predict=lambda weights, x: predict_per_task(pretrained_model, weights, x),
        base_weights=lambda tasks: weights_per_task(pretrained_model, tasks),
        tasks=test_tasks,
        steps=eval_steps,
        keep_predictions=keep,
    )
    eval_seconds = time.perf_counter() - start

    results = {"MAML": _summarise(maml_eval), "pretrained": _summarise(pretrained_eval)}
    report = {
        "experiment": "sinusoid",
        "seed": seed,
        "eval_seed": eval_seed,
        "config": config,
        "results": results,
        "train_curves": {"MAML": maml_curve, "pretrained": pretrained_curve},
        "seconds": {
            "maml_training": maml_seconds,
            "pretrained_training": pretrained_seconds,
            "evaluation": eval_seconds,
        },
        "files": {},
        "world_size": ranks.world_size,
    }
    table = mse_table(results, eval_steps)
    if verbose:
        print(
            f"Query MSE on {eval_tasks} test tasks ({eval_query_points} grid points each) after "
            f"k SGD steps (step size {inner_lr}) on K={support} support points; mean ± 95% CI"
        )
        print(table)

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, "sinusoid_eval.json")
        plot_path = os.path.join(out_dir, "sinusoid_adaptation.png")
        models_path = os.path.join(out_dir, "sinusoid_models.pt")
        if keep:
            plot_sinusoid_adaptation(plot_path, test_tasks, maml_eval, pretrained_eval, inner_lr)
            report["files"]["plot"] = plot_path
        save_atomic(
            {
                "config": config,
                "maml": maml_model.state_dict(),
                "pretrained": pretrained_model.state_dict(),
            },
            models_path,
        )
        report["files"]["models"] = models_path
        report["files"]["json"] = json_path
        write_text_atomic(json_path, json.dumps(report, indent=2))
        if verbose:
            print(f"wrote {json_path}" + (f", {plot_path}" if keep else "") + f", {models_path}")
    return report

"""``python -m maml_ext eval DIR/checkpoint.pt`` for meta-RL runs: the paper's test protocol.

On ``tasks`` test tasks (drawn with a fixed seed, the same for every policy), each policy runs
``K`` rollouts (the preset's ``eval_rollouts``: 4,000 steps, as in the authors' test scripts),
takes a policy-gradient step on them (the inner step: α = 0.1 for the first step, 0.05 for every
later one), runs ``K`` new rollouts, and so on for ``steps`` steps. Reported: the
mean undiscounted return per task after 0..steps steps, its mean over tasks and a 95% interval
(1.96 standard errors), for

- ``maml``: the meta-learned policy;
- ``pretrained``: the same network trained by ``train`` with TRPO on the task distribution without
  the adaptation term, fine-tuned the same way;
- ``random``: a freshly initialised policy, fine-tuned the same way;
- ``oracle`` (navigation): a controller that knows the goal and moves straight at it with the
  largest allowed step (the optimum; the paper's oracle is a policy trained with the goal as input,
  which lies somewhat below it). It does not adapt: the same value at every step.

Writes ``eval.json`` and ``trajectories.png`` (MAML's paths before and after adaptation).
"""

from __future__ import annotations

import json
import math
import os

import torch

from maml_ext.checkpoint import write_text_atomic

from .metarl import TaskData, adapt
from .sampler import process_rollouts, sample_rollouts
from .train import intra_op_threads, load_rl_checkpoint, make_policy, make_preset_env

__all__ = ["evaluate_rl_checkpoint", "adaptation_returns", "oracle_returns"]

EVAL_SEED = 20261206


def adaptation_returns(env, policy, preset, tasks, rollouts, steps, seed, keep_paths=0):
    """Mean return per task ``[steps + 1, T]`` after 0..steps policy-gradient steps, and the
    first rollout's observations/masks of the first ``keep_paths`` tasks at each step."""
    layout = policy.layout()
    generator = torch.Generator(device=tasks.device).manual_seed(seed)
    params = policy.flat_parameters().expand(tasks.shape[0], -1).contiguous()
    returns, paths = [], []
    for step in range(steps + 1):
        batch = process_rollouts(
            sample_rollouts(env, layout, params, tasks, rollouts, generator),
            preset.discount,
            preset.gae_lambda,
        )
        returns.append(batch.episode_returns.mean(1))
        paths.append((batch.observations[:keep_paths, 0], batch.mask[:keep_paths, 0]))
        if step < steps:
            rates = preset.eval_inner_lrs
            lr = rates[0] if step == 0 else rates[min(step, len(rates) - 1)]
            params = adapt(layout, params, TaskData.of(batch), lr).detach()
    return torch.stack(returns), paths


@torch.no_grad()
def oracle_returns(env, tasks, rollouts) -> torch.Tensor:
    """Navigation: return per task of the controller that steps straight at the goal."""
    positions = env.reset(tasks, rollouts)
    goals = tasks[:, None, :].to(positions.dtype)
    alive = torch.ones(positions.shape[:2], dtype=torch.bool)
    total = torch.zeros(positions.shape[:2], dtype=positions.dtype)
    for _ in range(env.horizon):
        # the move that lands on the goal, in the policy's action units (the env scales them)
        positions, rewards, done = env.step((goals - positions) / env.action_scale)
        total = total + rewards * alive
        alive = alive & ~done
    return total.mean(1)


def _summary(per_task: torch.Tensor):
    count = per_task.shape[-1]
    mean = per_task.mean(-1)
    half = 1.96 * per_task.std(-1) / math.sqrt(count) if count > 1 else torch.zeros_like(mean)
    return [float(v) for v in mean], [float(v) for v in half]


def evaluate_rl_checkpoint(
    checkpoint: str,
    *,
    tasks: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    out: str | None = None,
    rollouts: int | None = None,
    threads: int | None = None,
    verbose: bool = True,
) -> dict:
    """Runs the protocol above; returns what it writes to ``eval.json``."""
    run = load_rl_checkpoint(checkpoint)
    preset, config = run.preset, run.config
    tasks = 40 if tasks is None else int(tasks)
    steps = 3 if steps is None else int(steps)
    seed = EVAL_SEED if seed is None else int(seed)
    rollouts = preset.eval_rollouts if rollouts is None else int(rollouts)
    if tasks < 2 or steps < 0 or rollouts < 1:
        raise ValueError(
            "tasks/steps/rollouts: expected tasks >= 2, steps >= 0 and rollouts >= 1, "
            f"got {tasks}, {steps}, {rollouts}"
        )
    folder = os.path.dirname(os.path.abspath(checkpoint))
    json_path = out or os.path.join(folder, "eval.json")
    from maml_ext.experiments.reporting import require_plotting

    plt = require_plotting("the trajectories plot (trajectories.png)")
    with intra_op_threads(threads):
        env = make_preset_env(preset)
        test_tasks = env.sample_tasks(tasks, torch.Generator().manual_seed(seed))
        random_policy = make_policy(env, preset, seed + 1)
        policies = {"maml": run.policy, "pretrained": run.pretrained, "random": random_policy}
        results, ci95, paths = {}, {}, {}
        for name, policy in policies.items():
            per_task, kept = adaptation_returns(
                env,
                policy,
                preset,
                test_tasks,
                rollouts,
                steps,
                seed + 2,
                keep_paths=4 if name == "maml" else 0,
            )
            results[name], ci95[name] = _summary(per_task)
            paths[name] = kept
        if preset.env == "navigation2d":
            mean, half = _summary(oracle_returns(env, test_tasks, rollouts).unsqueeze(0))
            results["oracle"], ci95["oracle"] = mean * (steps + 1), half * (steps + 1)
    report = {
        "checkpoint": os.path.abspath(checkpoint),
        "preset": config["preset"],
        "tasks": tasks,
        "rollouts": rollouts,
        "seed": seed,
        "inner_lrs": list(preset.eval_inner_lrs),
        "steps": list(range(steps + 1)),
        "returns": results,
        "ci95": ci95,
        "files": {"json": json_path},
    }
    if preset.env == "navigation2d":
        plot_path = os.path.join(os.path.dirname(json_path), "trajectories.png")
        _plot_paths(plt, plot_path, paths["maml"], test_tasks, steps)
        report["files"]["trajectories"] = plot_path
    write_text_atomic(json_path, json.dumps(report, indent=2))
    if verbose:
        print(
            f"{config['preset']}: mean return on {tasks} test tasks ({rollouts} rollouts each) "
            f"after k policy-gradient steps (α {preset.eval_inner_lrs}); mean ± 95% CI"
        )
        print(return_table(report))
        print(f"wrote {json_path}")
    return report


def return_table(report: dict) -> str:
    """The eval report as a text table: policies by rows, steps by columns."""
    steps = report["steps"]
    lines = ["policy      " + "".join(f"{f'{k} steps':>18}" for k in steps)]
    for name, values in report["returns"].items():
        cells = [f"{v:8.2f} ± {c:6.2f}" for v, c in zip(values, report["ci95"][name])]
        lines.append(f"{name:<12}" + "".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)


def _plot_paths(plt, path, kept, tasks, steps) -> None:
    from maml_ext.experiments.reporting import _save_png_atomic

    count = kept[0][0].shape[0]
    figure, axes = plt.subplots(1, count, figsize=(4 * count, 4), squeeze=False)
    for task, axis in enumerate(axes.flat):
        for step in sorted({0, min(1, steps), steps}):
            observations, mask = kept[step]
            points = observations[task][mask[task]]
            points = torch.cat([points, points[-1:]]) if len(points) else points
            axis.plot(points[:, 0], points[:, 1], label=f"{step} steps", marker=".", markersize=3)
        axis.scatter(
            [float(tasks[task, 0])],
            [float(tasks[task, 1])],
            marker="*",
            s=200,
            color="red",
            label="goal",
        )
        axis.set_xlim(-0.6, 0.6)
        axis.set_ylim(-0.6, 0.6)
        axis.set_aspect("equal")
        axis.set_title(f"test task {task}")
    axes.flat[0].legend(loc="best", fontsize=8)
    figure.suptitle("MAML on 2D navigation: a rollout before and after adaptation")
    figure.tight_layout()
    _save_png_atomic(figure, path)
    plt.close(figure)

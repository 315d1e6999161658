"""``python -m maml_ext train rl-*``: meta-train a Gaussian policy with MAML (TRPO or Adam outer
step), and a "pretrained" policy on the same task distribution without adaptation (plain TRPO on the
joint objective, the same number of iterations), for ``python -m maml_ext eval``.

Writes under ``out_dir``: ``checkpoint.pt`` (atomically; both policies, the RNG and optimiser
state: ``--resume`` continues bit for bit on the CPU at the same thread count), ``log.csv`` and
``log.jsonl`` (one row per iteration: mean pre- and post-adaptation return, surrogate, KL, line
search), ``learning_curve.png``.

Runs on torch/``torch.func`` (``MetaTRPO``'s default engine; the fused engine computes the same
step, bench/rl_step.py times both), with torch's intra-op threads unless ``threads`` says otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from maml_ext.checkpoint import remove_stale_temporaries, save_atomic, write_text_atomic
from maml_ext.experiments.presets import ConfigurationError

from .envs import environment_factory
from .metarl import INNER_ESTIMATORS, MetaAdam, MetaTRPO
from .policy import GaussianPolicy
from .sampler import process_rollouts, sample_rollouts

__all__ = ["RLPreset", "RL_PRESETS", "train_rl", "load_rl_checkpoint", "RL_CHECKPOINT_FORMAT"]

RL_CHECKPOINT_FORMAT = "maml_ext.rl.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_COLUMNS = (
    "phase",
    "iteration",
    "pre_return",
    "post_return",
    "surrogate_before",
    "surrogate_after",
    "kl",
    "line_search_step",
    "seconds",
)


@dataclass(frozen=True)
class RLPreset:
    """A meta-RL experiment: environment, meta-batch, rollouts, horizon and the paper's
    optimisation settings (appendix A.2)."""

    env: str
    description: str
    meta_batch: int
    rollouts: int = 20
    horizon: int = 100
    iterations: int = 100
    inner_lr: float = 0.1
    eval_inner_lrs: tuple[float, ...] = (0.1, 0.05)  # first test-time step, then every later one
    # Rollouts per test-time step: the authors' test scripts sample 4,000 steps per step (40
    # navigation rollouts of 100 steps, 20 locomotion rollouts of 200).
    eval_rollouts: int = 20
    # Whose Hessian enters the meta-gradient (metarl.py): "reinforce" (the paper's) or "lvc".
    inner_estimator: str = "reinforce"
    discount: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    adam_lr: float = 1e-2
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    env_options: tuple[tuple[str, float], ...] = ()  # extra keyword arguments of the environment
    notes: str = ""


RL_PRESETS: dict[str, RLPreset] = {
    "rl-navigation2d": RLPreset(
        "navigation2d",
        "2D point navigation, MAML with TRPO (paper sec. 5.3)",
        meta_batch=20,
        horizon=100,
        # The authors' code: its environment sits in rllab's normalize wrapper, which maps the
        # policy's [-1, 1] onto the ±0.1 bound (the paper does not say). Measured: test return
        # after 1/3 steps -13.5/-4.7 with it, -18.4/-9.5 without (bench/NOTES.md, session 11).
        env_options=(("action_scale", 0.1),),
        eval_rollouts=40,
        # ProMP's low-variance curvature: the same inner step, a meta-gradient whose sampled
        # Hessian does not degrade training (bench/NOTES.md, sessions 10-12). Mean over three
        # seeds, test return after 1/3 steps -9.9/-3.9 with it, -13.8/-4.4 with the paper's.
        inner_estimator="lvc",
        notes="reward -distance (the authors' code; the paper's text says squared distance); "
        "actions in [-1, 1] policy units scaled by 0.1 (the authors' normalize wrapper); "
        "meta-gradient with ProMP's LVC curvature (--inner-estimator reinforce: the paper's); "
        "40 rollouts per test step (the authors' test script)",
    ),
    "rl-halfcheetah-vel": RLPreset(
        "halfcheetah-vel",
        "HalfCheetah goal velocity (paper sec. 5.3)",
        40,
        horizon=200,
        iterations=500,
    ),
    "rl-halfcheetah-dir": RLPreset(
        "halfcheetah-dir",
        "HalfCheetah forward/backward (paper sec. 5.3)",
        40,
        horizon=200,
        iterations=500,
    ),
    "rl-ant-vel": RLPreset(
        "ant-vel", "Ant goal velocity (paper sec. 5.3)", 40, horizon=200, iterations=500
    ),
    "rl-ant-dir": RLPreset(
        "ant-dir", "Ant forward/backward (paper sec. 5.3)", 40, horizon=200, iterations=500
    ),
}


def make_preset_env(preset: RLPreset, device="cpu", dtype=torch.float32):
    """The preset's environment. The MuJoCo ones raise MissingExtraError, naming the ``rl``
    extra, where gymnasium or mujoco is missing."""
    factory = environment_factory(preset.env)
    kwargs = {"horizon": preset.horizon}
    if preset.env == "navigation2d":
        kwargs.update(dtype=dtype, device=device)
    kwargs.update(preset.env_options)
    return factory(**kwargs)


def make_policy(env, preset: RLPreset, seed: int, device="cpu") -> GaussianPolicy:
    """The preset's policy, initial weights drawn from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GaussianPolicy(
            env.observation_size, env.action_size, preset.hidden, preset.activation, device=device
        )


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """``torch.set_num_threads(count)`` for the block (None: leave it)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Settings that a resumed run cannot change.
_RESUME_FIXED = (
    "preset",
    "env_options",
    "meta_batch",
    "rollouts",
    "first_order",
    "inner_estimator",
    "outer",
    "seed",
    "horizon",
)


@dataclass
class _RunState:
    maml: GaussianPolicy
    pretrained: GaussianPolicy
    maml_learner: object
    pretrained_learner: MetaTRPO
    generators: dict = field(default_factory=dict)
    done: dict = field(default_factory=lambda: {"maml": 0, "pretrained": 0})
    history: list = field(default_factory=list)


def train_rl(
    preset: str,
    *,
    out_dir: str,
    iterations: int | None = None,
    meta_batch: int | None = None,
    rollouts: int | None = None,
    first_order: bool | None = None,
    inner_estimator: str | None = None,
    outer: str | None = None,
    resume: bool | None = None,
    seed: int | None = None,
    device: str | None = None,
    checkpoint_every: int | None = None,
    pretrain: bool = True,
    threads: int | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Meta-trains ``preset`` (a key of :data:`RL_PRESETS`); returns the run's summary.

    ``inner_estimator``: "reinforce" (the paper's inner loss) or "lvc" (ProMP's low-variance
    curvature: the same inner step, a different Hessian in the meta-gradient; see
    :mod:`maml_ext.rl.metarl`); default: the preset's. ``outer``: "trpo" (the paper) or "adam"
    (the plain meta-gradient with Adam, lr ``preset.adam_lr``). ``checkpoint_every``: iterations
    between checkpoints (default 10; the final one is always written). ``pretrain``: also train the
    pretrained baseline (same iterations, TRPO without adaptation) after MAML. ``threads``:
    intra-op threads while training (None: torch's current setting).
    """
    spec = RL_PRESETS[preset]
    outer = outer or "trpo"
    if outer not in ("trpo", "adam"):
        raise ConfigurationError(f"--outer: expected trpo or adam, got {outer!r}")
    inner_estimator = inner_estimator or spec.inner_estimator
    if inner_estimator not in INNER_ESTIMATORS:
        raise ConfigurationError(
            f"--inner-estimator: expected one of {', '.join(INNER_ESTIMATORS)}, "
            f"got {inner_estimator!r}"
        )
    config = {
        "preset": preset,
        "iterations": int(iterations or spec.iterations),
        "meta_batch": int(meta_batch or spec.meta_batch),
        "rollouts": int(rollouts or spec.rollouts),
        "horizon": spec.horizon,
        "env_options": [list(option) for option in spec.env_options],
        "first_order": bool(first_order),
        "inner_estimator": inner_estimator,
        "outer": outer,
        "seed": 0 if seed is None else int(seed),
        "pretrain": bool(pretrain),
    }
    device = torch.device(device or "cpu")
    checkpoint_every = 10 if checkpoint_every is None else int(checkpoint_every)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    from maml_ext.experiments.reporting import progress_bar, require_plotting

    plt = require_plotting("the learning curve (learning_curve.png)")
    if progress:
        from maml_ext.experiments.reporting import require_progress_bars

        require_progress_bars()
    with intra_op_threads(threads):
        env = make_preset_env(spec, device=device)
        state = _new_state(spec, env, config, device)
        if resume:
            _restore(state, checkpoint_path, config)
            remove_stale_temporaries(checkpoint_path)
            if verbose:
                print(f"resuming {preset} at {state.done} of {config['iterations']} iterations")
        os.makedirs(out_dir, exist_ok=True)

        def save():
            save_atomic(_checkpoint_dict(state, config, spec), checkpoint_path)
            _write_logs(out_dir, state.history)

        phases = [("maml", state.maml_learner)]
        if config["pretrain"]:
            phases.append(("pretrained", state.pretrained_learner))
        start_time = time.perf_counter()
        for phase, learner in phases:
            total = config["iterations"]
            bar = progress_bar(
                progress, description=f"{preset} {phase}", total=total, initial=state.done[phase]
            )
            while state.done[phase] < total:
                row = _iteration(phase, learner, env, spec, config, state.generators[phase])
                row["iteration"] = state.done[phase]
                state.history.append(row)
                state.done[phase] += 1
                if phase == "maml":
                    bar.set_postfix(
                        pre=f"{row['pre_return']:.1f}", post=f"{row['post_return']:.1f}"
                    )
                else:
                    bar.set_postfix(ret=f"{row['pre_return']:.1f}")
                bar.update(1)
                if checkpoint_every and state.done[phase] % checkpoint_every == 0:
                    save()
            bar.close()
        save()
        curve_path = os.path.join(out_dir, "learning_curve.png")
        _plot_curve(plt, state.history, curve_path, preset)
    seconds = time.perf_counter() - start_time
    maml_rows = [row for row in state.history if row["phase"] == "maml"]
    summary = {
        "preset": preset,
        "config": config,
        "seconds": seconds,
        "final_pre_return": maml_rows[-1]["pre_return"] if maml_rows else None,
        "final_post_return": maml_rows[-1]["post_return"] if maml_rows else None,
        "files": {"checkpoint": checkpoint_path, "curve": curve_path},
    }
    if verbose:
        print(
            f"{preset}: {config['iterations']} iterations in {seconds:.1f} s; last iteration "
            f"pre-adaptation return {summary['final_pre_return']:.2f}, post-adaptation "
            f"{summary['final_post_return']:.2f}; wrote {checkpoint_path}"
        )
    return summary


def _new_state(spec, env, config, device) -> _RunState:
    maml = make_policy(env, spec, config["seed"], device)
    pretrained = make_policy(env, spec, config["seed"], device)
    if config["outer"] == "adam":
        learner = MetaAdam(
            maml,
            spec.inner_lr,
            config["first_order"],
            lr=spec.adam_lr,
            inner_estimator=config["inner_estimator"],
        )
    else:
        learner = MetaTRPO(
            maml,
            spec.inner_lr,
            config["first_order"],
            max_kl=spec.max_kl,
            inner_estimator=config["inner_estimator"],
        )
    pre_learner = MetaTRPO(pretrained, 0.0, max_kl=spec.max_kl)
    generators = {}
    for offset, phase in enumerate(("maml", "pretrained")):
        generator = torch.Generator(device=device)
        generator.manual_seed(config["seed"] * 2 + offset + 1)
        generators[phase] = generator
    return _RunState(maml, pretrained, learner, pre_learner, generators)


def _iteration(phase, learner, env, spec, config, generator) -> dict:
    start = time.perf_counter()
    tasks = env.sample_tasks(config["meta_batch"], generator)
    theta = learner.theta()

    def sample(params):
        batch = sample_rollouts(env, learner.layout, params, tasks, config["rollouts"], generator)
        return process_rollouts(batch, spec.discount, spec.gae_lambda)

    first = sample(theta)
    if phase == "maml":
        second = sample(learner.adapted(first, theta))
        result = learner.step(first, second)
    else:
        second = first
        result = learner.step(None, first)
    return {
        "phase": phase,
        "pre_return": float(first.episode_returns.mean()),
        "post_return": float(second.episode_returns.mean()),
        "surrogate_before": result.surrogate_before,
        "surrogate_after": result.surrogate_after,
        "kl": result.kl,
        "line_search_step": result.line_search_step,
        "seconds": time.perf_counter() - start,
    }


def _checkpoint_dict(state: _RunState, config: dict, spec: RLPreset) -> dict:
    return {
        "format": RL_CHECKPOINT_FORMAT,
        "config": config,
        "preset": asdict(spec),
        "policy_config": state.maml.config(),
        "maml": state.maml.state_dict(),
        "pretrained": state.pretrained.state_dict(),
        "outer_state": (
            state.maml_learner.state_dict() if isinstance(state.maml_learner, MetaAdam) else None
        ),
        "generators": {name: g.get_state() for name, g in state.generators.items()},
        "done": dict(state.done),
        "history": list(state.history),
    }


def read_rl_checkpoint(path) -> dict:
    """The checkpoint's dict, checked to be a meta-RL one."""
    if not os.path.isfile(path):
        raise ConfigurationError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling reports damage with many exception types
        raise ConfigurationError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != RL_CHECKPOINT_FORMAT:
        raise ConfigurationError(f"{path} is not a maml_ext meta-RL checkpoint")
    return state


def is_rl_checkpoint(path) -> bool:
    """Whether ``path`` holds a meta-RL checkpoint (for the eval command's dispatch)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(state, dict) and state.get("format") == RL_CHECKPOINT_FORMAT


def _restore(state: _RunState, path: str, config: dict) -> None:
    saved = read_rl_checkpoint(path)
    # Checkpoints from before an option existed ran with its default.
    saved["config"].setdefault("inner_estimator", "reinforce")
    saved["config"].setdefault("env_options", [])
    for name in _RESUME_FIXED:
        if saved["config"][name] != config[name]:
            raise ConfigurationError(
                f"--resume: the run was started with {name}={saved['config'][name]!r}; "
                f"it cannot change to {config[name]!r}"
            )
    if max(saved["done"].values()) > config["iterations"]:
        raise ConfigurationError(
            f"--iterations {config['iterations']}: {path} is already at {saved['done']}"
        )
    state.maml.load_state_dict(saved["maml"])
    state.pretrained.load_state_dict(saved["pretrained"])
    if saved["outer_state"] is not None:
        state.maml_learner.load_state_dict(saved["outer_state"])
    for name, generator in state.generators.items():
        generator.set_state(saved["generators"][name])
    state.done = dict(saved["done"])
    state.history = list(saved["history"])


@dataclass
class RLCheckpoint:
    """A loaded meta-RL run: ``policy`` (the meta-learned :class:`GaussianPolicy`),
    ``pretrained`` (the baseline), the preset and the training config."""

    policy: GaussianPolicy
    pretrained: GaussianPolicy
    preset: RLPreset
    config: dict
    history: list


def load_rl_checkpoint(path, device="cpu") -> RLCheckpoint:
    """The policies of a ``train rl-*`` checkpoint (``.policy`` is the meta-learned one)."""
    saved = read_rl_checkpoint(path)
    preset = dict(saved["preset"])
    for name in ("eval_inner_lrs", "hidden"):
        preset[name] = tuple(preset[name])
    # The environment as it was trained (a checkpoint from before env_options had none).
    preset["env_options"] = tuple(tuple(option) for option in preset.get("env_options", ()))
    # Fields added later: the test protocol is today's preset's; the estimator was the paper's.
    current = RL_PRESETS.get(saved["config"]["preset"])
    preset.setdefault("eval_rollouts", current.eval_rollouts if current else RLPreset.eval_rollouts)
    preset.setdefault("inner_estimator", saved["config"].get("inner_estimator", "reinforce"))
    spec = RLPreset(**preset)
    policies = []
    for key in ("maml", "pretrained"):
        pc = saved["policy_config"]
        policy = GaussianPolicy(
            pc["observation_size"],
            pc["action_size"],
            pc["hidden"],
            pc["activation"],
            device=device,
        )
        policy.load_state_dict(saved[key])
        policies.append(policy)
    return RLCheckpoint(policies[0], policies[1], spec, saved["config"], saved["history"])


def _write_logs(out_dir: str, history: list) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({column: row.get(column) for column in LOG_COLUMNS})
    write_text_atomic(os.path.join(out_dir, "log.csv"), buffer.getvalue())
    write_text_atomic(
        os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(row) + "\n" for row in history)
    )


def _plot_curve(plt, history, path, title) -> None:
    from maml_ext.experiments.reporting import _save_png_atomic

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for phase, key, label in (
        ("maml", "pre_return", "MAML, before adaptation"),
        ("maml", "post_return", "MAML, after one step"),
        ("pretrained", "pre_return", "pretrained"),
    ):
        rows = [row for row in history if row["phase"] == phase]
        if rows:
            axis.plot([r["iteration"] for r in rows], [r[key] for r in rows], label=label)
    axis.set_xlabel("meta-iteration")
    axis.set_ylabel("mean return (training tasks)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    _save_png_atomic(figure, path)
    plt.close(figure)

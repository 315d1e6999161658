"""The MAML family by name, for the experiments and the command line (``--algorithm``).

Each name maps to the object that meta-trains a preset's network:

- ``maml``: :class:`maml_ext.MetaOptimizer` (second order unless the preset is first order);
- ``fomaml``: MetaOptimizer with ``first_order=True``;
- ``metasgd``: MetaOptimizer with ``learn_inner_lr="per_parameter"`` (Meta-SGD);
- ``anil``: MetaOptimizer with ``adapt="head"`` (only the last Linear layer adapts);
- ``mamlpp``: MetaOptimizer with MAML++'s options: ``multi_step_loss=True`` (annealed over the
  preset's ``msl_iterations``), ``per_step_batch_norm=True``, ``learn_inner_lr="per_step"``,
  ``first_order_until`` the preset's, and a cosine outer schedule by default;
- ``imaml``: :class:`maml_ext.ImplicitMetaOptimizer` (options ``lam``, ``cg_steps``,
  ``cg_damping``);
- ``reptile``: :class:`maml_ext.Reptile` (options ``epsilon`` (the outer step, ε),
  ``inner_optimizer``, ``anneal`` (meta-steps over which ε decays linearly to
  ``final_epsilon``; None: constant)); Reptile has no outer optimiser.

The algorithms' options are plain values, stored in a training checkpoint's settings so that
:func:`build_meta_optimizer` rebuilds the same object from it.
"""

from __future__ import annotations

import math

import torch

from maml_ext.experiments.presets import ALGORITHMS, ConfigurationError, FewShotPreset

__all__ = [
    "ALGORITHMS",
    "OUTER_SCHEDULES",
    "COSINE_MIN_LR",
    "resolve_options",
    "meta_optimizer_kwargs",
    "build_meta_optimizer",
    "outer_scheduler",
    "default_outer_schedule",
]

OUTER_SCHEDULES = ("constant", "cosine")
# The floor of the cosine outer schedule (MAML++'s min_learning_rate).
COSINE_MIN_LR = 1e-5
# MAML++'s defaults where a preset does not set them: epochs of 500 iterations (the authors'
# epoch length) times the paper's 10 epochs of multi-step loss and 50 of first-order gradients.
DEFAULT_MSL_ITERATIONS = 10 * 500
DEFAULT_FIRST_ORDER_UNTIL = 50 * 500

# Each algorithm's options and their defaults (what the command line's flags set).
_OPTIONS: dict[str, dict] = {
    "imaml": {"lam": 2.0, "cg_steps": 5, "cg_damping": 0.0},
    "reptile": {"epsilon": 1.0, "final_epsilon": 0.0, "inner_optimizer": "sgd", "anneal": None},
}


def resolve_options(algorithm: str, options: dict | None) -> dict:
    """``algorithm``'s options: the given ones (None values ignored) over the defaults; an option
    the algorithm does not take, or an unknown algorithm, raises ConfigurationError naming it."""
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(
            f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}"
        )
    given = {key: value for key, value in (options or {}).items() if value is not None}
    defaults = _OPTIONS.get(algorithm, {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        flags = ", ".join("--" + key.replace("_", "-") for key in unknown)
        raise ConfigurationError(f"--algorithm {algorithm} does not take {flags}")
    resolved = {**defaults, **given}
    _check_options(algorithm, resolved)
    return resolved


def _check_options(algorithm: str, options: dict) -> None:
    def number(name, *, zero=False):
        value = options[name]
        ok = (
            not isinstance(value, bool)
            and isinstance(value, (int, float))
            and math.isfinite(value)
            and (value >= 0 if zero else value > 0)
        )
        if not ok:
            kind = "a non-negative" if zero else "a positive"
            raise ConfigurationError(f"{name}: expected {kind} number, got {value!r}")

    def count(name, *, optional=False):
        value = options[name]
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name}: expected a positive integer, got {value!r}")

    if algorithm == "imaml":
        number("lam")
        count("cg_steps")
        number("cg_damping", zero=True)
    elif algorithm == "reptile":
        number("epsilon")
        number("final_epsilon", zero=True)
        count("anneal", optional=True)
        if options["inner_optimizer"] not in ("sgd", "adam"):
            raise ConfigurationError(
                f"inner_optimizer: expected sgd or adam, got {options['inner_optimizer']!r}"
            )


def default_outer_schedule(algorithm: str) -> str:
    """MAML++ anneals the outer rate with a cosine; the others keep it constant."""
    return "cosine" if algorithm == "mamlpp" else "constant"


def meta_optimizer_kwargs(preset: FewShotPreset, algorithm: str) -> dict:
    """The MetaOptimizer keyword arguments of a MetaOptimizer-based ``algorithm`` on ``preset``
    (beyond model, outer optimiser and backend)."""
    kwargs = dict(
        inner_lr=preset.inner_lr, inner_steps=preset.inner_steps, first_order=preset.first_order
    )
    if algorithm == "fomaml":
        kwargs["first_order"] = True
    elif algorithm == "metasgd":
        kwargs["learn_inner_lr"] = "per_parameter"
    elif algorithm == "anil":
        kwargs["adapt"] = "head"
    elif algorithm == "mamlpp":
        kwargs.update(
            multi_step_loss=True,
            msl_iterations=(
                preset.msl_iterations
                if preset.msl_iterations is not None
                else DEFAULT_MSL_ITERATIONS
            ),
            per_step_batch_norm=True,
            learn_inner_lr="per_step",
            first_order_until=(
                preset.first_order_until
                if preset.first_order_until is not None
                else DEFAULT_FIRST_ORDER_UNTIL
            ),
        )
    elif algorithm != "maml":
        raise ValueError(f"{algorithm} is not built on MetaOptimizer")
    return kwargs


def build_meta_optimizer(
    preset: FewShotPreset,
    *,
    device=None,
    backend: str = "auto",
    outer_optimizer: bool = True,
    options: dict | None = None,
    distributed: bool = False,
):
    """A fresh meta-learner of ``preset.algorithm`` for the preset's network (current RNG for
    the initial weights), with Adam at the preset's outer rate (not for Reptile, which moves θ
    itself; ``outer_optimizer=False``: none). ``distributed``: MetaOptimizer's option (the
    MetaOptimizer algorithms only)."""
    from maml_ext import ImplicitMetaOptimizer, MetaOptimizer, Reptile

    algorithm = preset.algorithm
    options = resolve_options(algorithm, options)
    if distributed and algorithm in ("imaml", "reptile"):
        raise ConfigurationError(
            f"algorithm: {algorithm} does not run across processes yet; run it in one process "
            f"(without torchrun) or pick one of maml, fomaml, metasgd, anil, mamlpp"
        )
    model = preset.build_model()
    if device is not None:
        model = model.to(device)
    if algorithm == "reptile":
        return Reptile(
            model,
            inner_lr=preset.inner_lr,
            inner_steps=preset.inner_steps,
            outer_lr=options["epsilon"],
            final_outer_lr=options["final_epsilon"],
            inner_optimizer=options["inner_optimizer"],
            anneal=options["anneal"],
            backend=backend,
        )
    adam = torch.optim.Adam(model.parameters(), lr=preset.outer_lr) if outer_optimizer else None
    if algorithm == "imaml":
        return ImplicitMetaOptimizer(
            model,
            adam,
            inner_lr=preset.inner_lr,
            inner_steps=preset.inner_steps,
            lam=options["lam"],
            cg_steps=options["cg_steps"],
            cg_damping=options["cg_damping"],
            backend=backend,
        )
    return MetaOptimizer(
        model,
        adam,
        backend=backend,
        distributed=distributed,
        **meta_optimizer_kwargs(preset, algorithm),
    )


def outer_scheduler(meta_optimizer, schedule: str, iterations: int):
    """The torch LR scheduler of ``schedule`` on the meta-learner's outer optimiser, stepped once
    per meta-iteration (None for "constant"): "cosine" is CosineAnnealingLR from the preset's rate
    to :data:`COSINE_MIN_LR` over ``iterations``."""
    if schedule not in OUTER_SCHEDULES:
        raise ConfigurationError(
            f"outer_schedule: expected one of {', '.join(OUTER_SCHEDULES)}, got {schedule!r}"
        )
    if schedule == "constant":
        return None
    outer = getattr(meta_optimizer, "outer_optimizer", None)
    if outer is None:
        raise ConfigurationError(
            f"--outer-schedule {schedule} needs an outer optimiser; Reptile has none "
            f"(anneal its step with --anneal)"
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        outer, T_max=iterations, eta_min=COSINE_MIN_LR
    )

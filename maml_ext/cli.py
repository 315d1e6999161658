"""Command line: ``python -m maml_ext train EXPERIMENT [options]`` and
``python -m maml_ext eval CHECKPOINT [options]`` (the few-shot test protocol) and
``python -m maml_ext report`` (the paper's claims, measured: docs/RESULTS.md).

Experiments are looked up in :data:`EXPERIMENTS`, a registry from preset name to the function that
runs it; adding a preset (omniglot-5w1s, ...) is one entry there.
"""

import argparse
import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import NamedTuple

from maml_ext._optional import MissingExtraError
from maml_ext.experiments.presets import (
    ALGORITHMS,
    PRESETS as _FEWSHOT_PRESETS,
    ConfigurationError,
)
from maml_ext.experiments.runtime import DEFAULT_DIST_TIMEOUT_S


class Experiment(NamedTuple):
    """A registered preset: where its training function lives and what it is."""

    target: str  # "module:function", imported only when the preset runs
    description: str
    preset: str | None = None  # passed as the function's first argument when given

    def load(self) -> Callable[..., dict]:
        module_name, function_name = self.target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return function if self.preset is None else functools.partial(function, self.preset)


EXPERIMENTS: dict[str, Experiment] = {
    "sinusoid": Experiment(
        "maml_ext.experiments.sinusoid:train_sinusoid",
        "sinusoid regression, MAML vs a pretrained baseline (paper sec. 5.1)",
    ),
}

# The paper's few-shot classification presets (maml_ext/experiments/presets.py).
for _name, _preset in _FEWSHOT_PRESETS.items():
    EXPERIMENTS[_name] = Experiment(
        "maml_ext.experiments.fewshot:train_fewshot", _preset.description, preset=_name
    )

# The meta-reinforcement-learning presets (maml_ext/rl/train.py).
_RL_PRESETS = {
    "rl-navigation2d": "2D point navigation, MAML + TRPO (paper sec. 5.3)",
    "rl-halfcheetah-vel": "HalfCheetah goal velocity, MAML + TRPO (needs the rl extra)",
    "rl-halfcheetah-dir": "HalfCheetah direction, MAML + TRPO (needs the rl extra)",
    "rl-ant-vel": "Ant goal velocity, MAML + TRPO (needs the rl extra)",
    "rl-ant-dir": "Ant direction, MAML + TRPO (needs the rl extra)",
}
for _name, _description in _RL_PRESETS.items():
    EXPERIMENTS[_name] = Experiment("maml_ext.rl.train:train_rl", _description, preset=_name)

BACKENDS = ("auto", "reference", "fused")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m maml_ext``."""
    parser = argparse.ArgumentParser(
        prog="python -m maml_ext", description="MAML meta-learning with maml_ext."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    presets = "; ".join(f"{name}: {entry.description}" for name, entry in EXPERIMENTS.items())
    train = commands.add_parser(
        "train",
        help="meta-train and evaluate a preset experiment",
        description=f"Meta-train and evaluate a preset experiment. Presets: {presets}.",
    )
    train.add_argument("experiment", choices=sorted(EXPERIMENTS), help="the preset to run")
    # Options left unset fall back to the preset's own defaults, so each preset keeps its paper
    # settings (iterations, meta-batch) without the CLI knowing them.
    train.add_argument("--iterations", type=int, help="meta-training iterations (preset default)")
    train.add_argument("--out", metavar="DIR", help="output folder (default: runs/EXPERIMENT)")
    train.add_argument("--seed", type=int, help="random seed (preset default)")
    train.add_argument("--backend", choices=BACKENDS, help="MetaOptimizer backend (default: auto)")
    train.add_argument(
        "--meta-batch", type=int, metavar="T", help="tasks per meta-batch (preset default)"
    )
    train.add_argument(
        "--first-order",
        action="store_true",
        default=None,
        help="first-order MAML (no Hessian term)",
    )
    train.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    # Few-shot classification presets only:
    train.add_argument(
        "--data-dir", metavar="DIR", help="folder holding the dataset (few-shot presets)"
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="write OUT/checkpoint.pt every N iterations (default 500; 0: at the end); "
        "sinusoid: OUT/sinusoid_checkpoint.pt (default: none in one process, 100 under torchrun)",
    )
    train.add_argument(
        "--validate-every",
        type=int,
        metavar="N",
        help="validate on held-out classes every N iterations (default 500)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in OUT from OUT/checkpoint.pt (sinusoid_checkpoint.pt); "
        "the number of processes may differ",
    )
    train.add_argument(
        "--split-by",
        choices=("character", "alphabet", "class", "group"),
        help="Omniglot meta-train/val/test split (default: character); image folders: class "
        "(default) or group (whole top-level folders)",
    )
    # Task shape and network (any few-shot preset); --image-size: image folders (folder-5w1s).
    train.add_argument("--ways", type=int, metavar="N", help="classes per task (preset default)")
    train.add_argument("--shots", type=int, metavar="K", help="support images per class")
    train.add_argument("--queries", type=int, metavar="Q", help="query images per class")
    train.add_argument(
        "--image-size", type=int, metavar="PX", help="image folders: resize to PX x PX (84)"
    )
    train.add_argument(
        "--backbone", choices=("conv4", "resnet12"), help="the network (default conv4)"
    )

    _add_algorithm_options(train)
    rl = train.add_argument_group("meta-reinforcement learning (rl-* presets)")
    rl.add_argument("--rollouts", type=int, metavar="K", help="rollouts per task (default 20)")
    rl.add_argument("--outer", choices=("trpo", "adam"), help="outer step: TRPO (default) or Adam")
    rl.add_argument(
        "--inner-estimator",
        choices=("reinforce", "lvc"),
        help="the inner loss whose Hessian enters the meta-gradient: reinforce (the paper's) or "
        "lvc (ProMP's low-variance curvature); default: the preset's (lvc for navigation)",
    )
    _add_dist_timeout(train)

    report = commands.add_parser(
        "report",
        help="run the paper's experiments and write docs/RESULTS.md",
        description="The paper's claims, measured: sinusoid at 70,000 iterations, first against "
        "second order, more test steps than training steps, Omniglot 5-way 1-shot at about an "
        "hour of training, and the task-switching question; writes OUT/RESULTS.md and its PNGs "
        "(in OUT/results). "
        "Runs are cached under --cache by their settings and reused while those are unchanged. "
        "A full run takes about two hours on a 2-core CPU; --quick takes seconds (tests).",
    )
    report.add_argument("--out", metavar="DIR", default="docs", help="output folder (docs)")
    report.add_argument(
        "--data-dir", metavar="DIR", help="the Omniglot folder (needed by the few-shot sections)"
    )
    report.add_argument(
        "--cache",
        metavar="DIR",
        default="runs/report-cache",
        help="where runs are kept for reuse (runs/report-cache; 'none': keep nothing)",
    )
    report.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing")
    report.add_argument(
        "--sections",
        nargs="+",
        metavar="NAME",
        help="run and write only these (sinusoid, order, long, switching); processes running "
        "different sections share the cache, and a run of all of them then reuses every run",
    )
    report.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads per run (default 1)"
    )

    evaluate = commands.add_parser(
        "eval",
        help="test a few-shot or meta-RL checkpoint with the paper's protocol",
        description="Accuracy after 0..STEPS inner steps on TASKS test tasks (classes never seen "
        "in training) drawn with a fixed seed: mean and 95% confidence interval, "
        "printed and written as JSON. Meta-RL checkpoints (train rl-*): mean return on TASKS "
        "test tasks (default 40) after 0..STEPS policy-gradient steps (default 3) for MAML, "
        "the pretrained policy, a random one and (navigation) an oracle; eval.json and "
        "trajectories.png beside the checkpoint.",
    )
    evaluate.add_argument("checkpoint", help="a checkpoint.pt written by train")
    evaluate.add_argument(
        "--data-dir", metavar="DIR", help="dataset folder (default: the training run's)"
    )
    evaluate.add_argument("--tasks", type=int, help="test tasks (default 600)")
    evaluate.add_argument("--steps", type=int, help="most inner steps (default 10)")
    evaluate.add_argument("--seed", type=int, help="seed of the test tasks (default fixed)")
    evaluate.add_argument(
        "--rollouts",
        type=int,
        metavar="K",
        help="meta-RL: rollouts per task and test step (default: the preset's, 40 for navigation "
        "and 20 for locomotion, the authors' 4,000 steps)",
    )
    evaluate.add_argument(
        "--out", metavar="FILE.json", help="JSON output (default: eval.json beside the checkpoint)"
    )
    evaluate.add_argument(
        "--split", choices=("train", "val", "test"), help="classes to test on (default test)"
    )
    evaluate.add_argument(
        "--baseline",
        action="store_true",
        default=None,
        help="also pretrain the same network without meta-learning and fine-tune it the same way",
    )
    evaluate.add_argument(
        "--baseline-iterations",
        type=int,
        metavar="N",
        help="pretraining iterations of the baseline (default 5000)",
    )
    evaluate.add_argument(
        "--backend", choices=BACKENDS, help="MetaOptimizer backend (default: auto)"
    )
    evaluate.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    _add_dist_timeout(evaluate)
    return parser


def _add_algorithm_options(train: argparse.ArgumentParser) -> None:
    """The few-shot presets' --algorithm and each algorithm's options."""
    group = train.add_argument_group(
        "algorithms (few-shot presets)",
        "maml, fomaml (first order), metasgd (learned per-parameter inner rates), anil (only the "
        "last layer adapts), mamlpp (MAML++: multi-step loss, per-step batch norm and rates, "
        "first-order annealing, cosine outer rate), imaml (implicit gradients), reptile",
    )
    group.add_argument(
        "--algorithm", choices=ALGORITHMS, help="meta-learning algorithm (preset default: maml)"
    )
    group.add_argument(
        "--inner-lr",
        type=float,
        metavar="A",
        help="inner step (preset default; imaml with 5 steps on a 5-way preset: use 0.1, as "
        "five steps of the preset's 0.4 diverge)",
    )
    group.add_argument("--inner-steps", type=int, metavar="K", help="inner steps (preset default)")
    group.add_argument(
        "--outer-schedule",
        choices=("constant", "cosine"),
        help="outer learning-rate schedule (default: cosine for mamlpp, else constant)",
    )
    group.add_argument(
        "--msl-iterations", type=int, metavar="N", help="mamlpp: multi-step loss iterations"
    )
    group.add_argument(
        "--first-order-until",
        type=int,
        metavar="N",
        help="mamlpp: first-order outer steps before second order",
    )
    group.add_argument(
        "--lam",
        type=float,
        help="imaml: proximal strength lambda (default 2, the paper's; on Omniglot 5-way with 16 "
        "inner steps 0.5 did better here, bench/NOTES.md)",
    )
    group.add_argument("--cg-steps", type=int, metavar="N", help="imaml: CG iterations (5)")
    group.add_argument("--cg-damping", type=float, help="imaml: CG damping (default 0)")
    group.add_argument("--epsilon", type=float, help="reptile: outer step (default 1)")
    group.add_argument(
        "--final-epsilon", type=float, help="reptile: outer step after annealing (default 0)"
    )
    group.add_argument(
        "--inner-optimizer", choices=("sgd", "adam"), help="reptile: inner optimiser (sgd)"
    )
    group.add_argument(
        "--anneal",
        action="store_true",
        default=None,
        help="reptile: anneal the outer step linearly over the run",
    )


# Flags of _add_algorithm_options that are an algorithm's options (the others are presets').
_ALGORITHM_OPTIONS = (
    "lam",
    "cg_steps",
    "cg_damping",
    "epsilon",
    "final_epsilon",
    "inner_optimizer",
    "anneal",
)


def _add_dist_timeout(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before failing with an "
        f"error naming the rank that failed (default {DEFAULT_DIST_TIMEOUT_S:g})",
    )


def _positive(parser: argparse.ArgumentParser, name: str, value: int | None) -> None:
    if value is not None and value < 1:
        parser.error(f"{name} must be a positive integer, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            _positive(parser, "--iterations", args.iterations)
            _positive(parser, "--meta-batch", args.meta_batch)
            options = {
                "iterations": args.iterations,
                "seed": args.seed,
                "backend": args.backend,
                "meta_batch": args.meta_batch,
                "first_order": args.first_order,
                "device": args.device,
                "data_dir": args.data_dir,
                "checkpoint_every": args.checkpoint_every,
                "validate_every": args.validate_every,
                "resume": args.resume,
                "split_by": args.split_by,
            }
            options.update(
                algorithm=args.algorithm,
                inner_lr=args.inner_lr,
                inner_steps=args.inner_steps,
                outer_schedule=args.outer_schedule,
                msl_iterations=args.msl_iterations,
                first_order_until=args.first_order_until,
            )
            algorithm_options = {
                name: getattr(args, name)
                for name in _ALGORITHM_OPTIONS
                if getattr(args, name) is not None
            }
            if algorithm_options:
                options["algorithm_options"] = algorithm_options
            _positive(parser, "--rollouts", args.rollouts)
            options.update(
                rollouts=args.rollouts, outer=args.outer, inner_estimator=args.inner_estimator
            )
            for flag in ("ways", "shots", "queries", "image_size"):
                _positive(parser, f"--{flag.replace('_', '-')}", getattr(args, flag))
            options.update(
                ways=args.ways,
                shots=args.shots,
                queries=args.queries,
                image_size=args.image_size,
                backbone=args.backbone,
            )
            options = {name: value for name, value in options.items() if value is not None}
            options["out_dir"] = args.out if args.out is not None else f"runs/{args.experiment}"
            run = EXPERIMENTS[args.experiment].load()
            _check_options(parser, args.experiment, run, options)
            # Under torchrun (WORLD_SIZE > 1) every process runs the command on its share of the
            # tasks; rank 0 alone writes files (README "Training across processes").
            with _process_group(args):
                run(**options)
        elif args.command == "report":
            from maml_ext.experiments.report import SECTIONS, run_report

            _positive(parser, "--threads", args.threads)
            run_report(
                args.out,
                data_dir=args.data_dir,
                cache_dir=None if args.cache == "none" else args.cache,
                quick=args.quick,
                sections=args.sections or SECTIONS,
                threads=args.threads,
                command=" ".join(
                    ["python -m maml_ext", *(argv if argv is not None else sys.argv[1:])]
                ),
            )
        elif args.command == "eval" and _is_rl_checkpoint(args.checkpoint):
            from maml_ext.rl.evaluate import evaluate_rl_checkpoint

            _positive(parser, "--rollouts", args.rollouts)
            evaluate_rl_checkpoint(
                args.checkpoint,
                tasks=args.tasks,
                steps=args.steps,
                seed=args.seed,
                out=args.out,
                rollouts=args.rollouts,
            )
        elif args.command == "eval":
            if args.rollouts is not None:
                parser.error("--rollouts: only meta-RL checkpoints (train rl-*) take rollouts")
            from maml_ext.experiments.fewshot import evaluate_checkpoint

            options = {
                "data_dir": args.data_dir,
                "tasks": args.tasks,
                "steps": args.steps,
                "seed": args.seed,
                "out": args.out,
                "split": args.split,
                "baseline": args.baseline,
                "baseline_iterations": args.baseline_iterations,
                "backend": args.backend,
                "device": args.device,
            }
            with _process_group(args):
                evaluate_checkpoint(
                    args.checkpoint,
                    **{name: value for name, value in options.items() if value is not None},
                )
    except ConfigurationError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except MissingExtraError as error:
        parser.exit(1, f"{parser.prog} {args.command}: error: {error}\n")
    return 0


def _is_rl_checkpoint(path: str) -> bool:
    from maml_ext.rl.train import is_rl_checkpoint

    return is_rl_checkpoint(path)


@contextlib.contextmanager
def _process_group(args):
    """Joins torchrun's process group for the command (nothing in one process); a rank that
    raises records why in the group's store before exiting, so the others name it."""
    from maml_ext.experiments.runtime import init_distributed_from_environment

    if args.dist_timeout <= 0:
        raise ConfigurationError(f"--dist-timeout: expected seconds > 0, got {args.dist_timeout}")
    ranks = init_distributed_from_environment(args.device, args.dist_timeout)
    if not ranks.distributed:
        yield
        return
    import torch.distributed as dist

    from maml_ext import distributed as dist_meta

    try:
        yield
    except BaseException as error:
        if not isinstance(error, dist_meta.RankFailedError):
            dist_meta.report_failure(error)
        raise
    dist.destroy_process_group()


def _check_options(
    parser: argparse.ArgumentParser, experiment: str, run: Callable, options: dict
) -> None:
    """Rejects options the experiment's function does not take, naming the flag."""
    parameters = inspect.signature(run).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters}
    for name in options:
        if name not in accepted:
            if name == "algorithm_options":
                flags = ", ".join("--" + key.replace("_", "-") for key in options[name])
                parser.error(f"{experiment} does not take {flags}")
            parser.error(f"{experiment} does not take --{name.replace('_', '-')}")


if __name__ == "__main__":
    sys.exit(main())

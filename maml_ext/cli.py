"""Command line: ``python -m maml_ext train EXPERIMENT [options]``.

Experiments are looked up in :data:`EXPERIMENTS`, a registry from preset name to the function that
runs it; adding a preset (omniglot-5w1s, ...) is one entry there.
"""
import argparse
import importlib
import sys
from typing import Callable, Dict, List, NamedTuple, Optional


class Experiment(NamedTuple):
    """A registered preset: where its training function lives and what it is."""

    target: str  # "module:function", imported only when the preset runs
    description: str

    def load(self) -> Callable[..., dict]:
        module_name, function_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), function_name)


EXPERIMENTS: Dict[str, Experiment] = {
    "sinusoid": Experiment(
        "maml_ext.experiments.sinusoid:train_sinusoid",
        "sinusoid regression, MAML vs a pretrained baseline (paper sec. 5.1)",
    ),
}

BACKENDS = ("auto", "reference", "fused")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m maml_ext``."""
    parser = argparse.ArgumentParser(
        prog="python -m maml_ext", description="MAML meta-learning with maml_ext."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    presets = "; ".join(f"{name}: {entry.description}" for name, entry in EXPERIMENTS.items())
    train = commands.add_parser(
        "train", help="meta-train and evaluate a preset experiment",
        description=f"Meta-train and evaluate a preset experiment. Presets: {presets}.",
    )
    train.add_argument("experiment", choices=sorted(EXPERIMENTS), help="the preset to run")
    # Options left unset fall back to the preset's own defaults, so each preset keeps its paper
    # settings (iterations, meta-batch) without the CLI knowing them.
    train.add_argument("--iterations", type=int, help="meta-training iterations (preset default)")
    train.add_argument("--out", metavar="DIR", help="output folder (default: runs/EXPERIMENT)")
    train.add_argument("--seed", type=int, help="random seed (preset default)")
    train.add_argument("--backend", choices=BACKENDS, help="MetaOptimizer backend (default: auto)")
    train.add_argument("--meta-batch", type=int, metavar="T", help="tasks per meta-batch (preset default)")
    return parser


def _positive(parser: argparse.ArgumentParser, name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        parser.error(f"{name} must be a positive integer, got {value}")


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        _positive(parser, "--iterations", args.iterations)
        _positive(parser, "--meta-batch", args.meta_batch)
        options = {
            "iterations": args.iterations,
            "seed": args.seed,
            "backend": args.backend,
            "meta_batch": args.meta_batch,
        }
        options = {name: value for name, value in options.items() if value is not None}
        options["out_dir"] = args.out if args.out is not None else f"runs/{args.experiment}"
        EXPERIMENTS[args.experiment].load()(**options)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MAML family compared on Omniglot: accuracy, time per meta-step and peak memory, as Markdown.

    .venv/bin/python bench/algorithms.py --data-dir ../shared/data/omniglot --iterations N
        [--settings 5w1s 20w1s] [--algorithms maml fomaml metasgd anil mamlpp imaml reptile]
        [--tasks 600] [--device cpu|cuda] [--backend auto] [--time-steps 10]
        [--filters 64] [--meta-batch N] [--threads N] [--no-train | --no-timing]
        [--out bench/algorithms.md] [--json OUT] [--runs DIR]
    .venv/bin/python bench/algorithms.py --merge A.json B.json ... [--out ...]

``--merge`` renders one table from the ``--json`` files of earlier runs (say, training of each
setting in its own one-thread process, then the timing alone on a quiet machine: ``--no-timing``
and ``--no-train``); a later file's entries complete or replace an earlier one's.

For each setting (Omniglot 5-way 1-shot, 20-way 1-shot; the MAML presets omniglot-5w1s and
omniglot-20w1s) and each algorithm:

- meta-train with ``python -m maml_ext train``'s own function (``train_fewshot``) for the same
  ``--iterations`` at the preset's meta-batch, so every algorithm sees the same number of tasks;
  the split is by alphabet with split seed 0, so every run is tested on the same held-out
  alphabets (on the minimal archives: Early_Aramaic and Sanskrit);
- test with the paper's protocol (``evaluate_checkpoint``): ``--tasks`` tasks from the test
  alphabets with the fixed evaluation seed, accuracy ± 95% interval after each algorithm's test
  steps (:data:`ALGORITHMS` below: the paper's where it states one);
- time per meta-step: in a fresh child process per (setting, algorithm), the model and a random
  batch of the setting's shape, 2 warm-up steps, then the median of ``--time-steps`` timed steps
  (the GPU synchronised around each), in the phase that takes most of a run: MAML++ after its
  first-order and multi-step-loss phases (second order, final loss only);
- peak memory of one meta-step in that child: on CUDA ``torch.cuda.max_memory_allocated()``
  during the step minus what was allocated before; on CPU the peak resident set size (VmHWM, reset
  to the current RSS just before the step where the kernel allows) minus the RSS before it.

Each algorithm's own settings (inner steps, rates, λ, ...) are in :data:`ALGORITHMS`; the
published numbers beside them are from the papers, on the full Omniglot background set.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# This checkout's maml_ext, also when the script runs as bench/algorithms.py (sys.path[0] = bench).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"5w1s": "omniglot-5w1s", "20w1s": "omniglot-20w1s"}

# Per algorithm: preset overrides, algorithm options and test steps ({setting: steps}; None: the
# preset's paper_eval_steps). MAML++'s multi-step loss and first-order phases keep the authors'
# proportions of the run (10 and 50 of 150 epochs).
ALGORITHMS: dict[str, dict] = {
    "maml": {"label": "MAML", "overrides": {}, "options": {}, "test_steps": None},
    "fomaml": {"label": "first-order MAML", "overrides": {}, "options": {}, "test_steps": None},
    "metasgd": {"label": "Meta-SGD", "overrides": {}, "options": {}, "test_steps": None},
    "anil": {"label": "ANIL", "overrides": {}, "options": {}, "test_steps": None},
    "mamlpp": {
        "label": "MAML++",
        "overrides": {"inner_steps": 5, "inner_lr": 0.1},
        "options": {},
        "msl_fraction": 10 / 150,
        "first_order_fraction": 50 / 150,
        "test_steps": {"5w1s": 5, "20w1s": 5},
    },
    # iMAML: the paper's 16 gradient-descent steps (its 5-way count; 25 at 20-way) of 0.1 and
    # 5 CG steps, at λ 0.5: with this library's mean support loss the paper's λ 2 holds φ too
    # close to θ (100-step runs: 59.8 % at λ 2, 16 steps), and MAML's 0.4 diverges over several
    # proximal steps (bench/NOTES.md, session 10).
    "imaml": {
        "label": "iMAML (GD)",
        "overrides": {"inner_steps": 16, "inner_lr": 0.1},
        "options": {"lam": 0.5, "cg_steps": 5},
        "test_steps": {"5w1s": 16, "20w1s": 16},
    },
    "reptile": {
        "label": "Reptile",
        "overrides": {"inner_steps": 5, "inner_lr": 0.001},
        "options": {"inner_optimizer": "adam", "epsilon": 1.0, "anneal": True},
        "test_steps": {"5w1s": 50, "20w1s": 50},
    },
}

# Published test accuracy (%) on the full Omniglot (background set for meta-training): MAML and
# first-order MAML (Finn et al. 2017), ANIL (Raghu et al. 2019, 20-way 1-shot), MAML++ (Antoniou
# et al. 2018), iMAML with Hessian-free inner solver (Rajeswaran et al. 2019), Reptile
# (Nichol et al. 2018, non-transductive).
PUBLISHED = {
    "maml": {"5w1s": "98.7", "20w1s": "95.8"},
    "fomaml": {"5w1s": "98.3", "20w1s": "89.4"},
    "anil": {"20w1s": "96.2"},
    "mamlpp": {"5w1s": "99.47", "20w1s": "97.65"},
    "imaml": {"5w1s": "99.50 (HF)", "20w1s": "96.18 (HF)"},
    "reptile": {"5w1s": "95.39", "20w1s": "88.14"},
}


def preset_for(
    setting: str, algorithm: str, iterations: int, filters: int, meta_batch: int | None = None
):
    """The preset a run of ``algorithm`` on ``setting`` trains, and its algorithm options."""
    from maml_ext.experiments.presets import get_preset

    spec = ALGORITHMS[algorithm]
    changes = dict(spec["overrides"], algorithm=algorithm, filters=filters)
    if meta_batch is not None:
        changes["meta_batch"] = meta_batch
    if algorithm == "mamlpp":
        changes["msl_iterations"] = max(1, round(iterations * spec["msl_fraction"]))
        changes["first_order_until"] = round(iterations * spec["first_order_fraction"])
    if algorithm == "fomaml":
        changes["first_order"] = True
    return get_preset(SETTINGS[setting]).with_overrides(**changes), dict(spec["options"])


def test_steps(setting: str, algorithm: str, preset) -> int:
    steps = ALGORITHMS[algorithm]["test_steps"]
    return preset.paper_eval_steps if steps is None else steps[setting]


# ---- timing and memory (child process) --------------------------------------------------------


def _child(setting: str, algorithm: str, args) -> None:
    """Times ``--time-steps`` meta-steps and measures one step's peak memory; prints JSON."""
    from maml_ext.experiments.algorithms import build_meta_optimizer, resolve_options

    torch.manual_seed(0)
    preset, options = preset_for(setting, algorithm, args.iterations, args.filters, args.meta_batch)
    if options.get("anneal") is True:
        options["anneal"] = args.iterations
    device = torch.device(args.device)
    meta = build_meta_optimizer(
        preset, device=device, backend=args.backend, options=resolve_options(algorithm, options)
    )
    # The phase that takes most of the run: MAML++ past its first-order and multi-step-loss
    # phases (both end by a third of the run).
    meta.iteration = max(meta.first_order_until or 0, meta.msl_iterations or 0)
    support = preset.ways * preset.shots
    query = preset.ways * preset.queries
    tasks = preset.meta_batch
    batch = (
        torch.rand(tasks, support, *preset.image_shape, device=device),
        torch.arange(preset.ways, device=device).repeat_interleave(preset.shots).repeat(tasks, 1),
        torch.rand(tasks, query, *preset.image_shape, device=device),
        torch.arange(preset.ways, device=device).repeat_interleave(preset.queries).repeat(tasks, 1),
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        meta.step(*batch)
    sync()
    times = []
    for _ in range(args.time_steps):
        started = time.perf_counter()
        meta.step(*batch)
        sync()
        times.append(time.perf_counter() - started)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        meta.step(*batch)
        sync()
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated() during one step minus allocated before"
    else:
        # bench/table.py's measurement (checked by python_tests/test_memory_method.py).
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from table import cpu_peak_increase

        measured = cpu_peak_increase(lambda: meta.step(*batch))
        peak = measured["peak_bytes"]
        method = "peak RSS (VmHWM) during one step minus RSS before" + (
            "" if measured["reset"] else " (high-water mark not resettable: minus the earlier peak)"
        )
    result = {
        "ms_per_step": 1000 * statistics.median(times),
        "peak_bytes": peak,
        "memory_method": method,
        "backend": meta.backend,
    }
    print("ALGORITHMS_JSON " + json.dumps(result))


def measure(setting: str, algorithm: str, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        setting,
        algorithm,
        "--iterations",
        str(args.iterations),
        "--device",
        args.device,
        "--backend",
        args.backend,
        "--time-steps",
        str(args.time_steps),
        "--filters",
        str(args.filters),
        "--threads",
        str(torch.get_num_threads()),
    ]
    if args.meta_batch is not None:
        command += ["--meta-batch", str(args.meta_batch)]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ALGORITHMS_JSON ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"child exited {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len("ALGORITHMS_JSON ") :])


# ---- training and testing -----------------------------------------------------------------------


def train_on_alphabet_split(preset, data_dir, out: Path, iterations: int, options: dict, **kwargs):
    """``train_fewshot`` as every run of this table trains: split by alphabet (seed 0), no
    validation, one checkpoint at the end, quiet; ``kwargs`` go to ``train_fewshot``."""
    from maml_ext.experiments.fewshot import train_fewshot

    train_fewshot(
        preset,
        data_dir,
        out,
        iterations=iterations,
        split_by="alphabet",
        validate_every=0,
        checkpoint_every=0,
        progress=False,
        verbose=False,
        algorithm_options=options,
        **kwargs,
    )


def train_and_test(setting: str, algorithm: str, args, runs: Path) -> dict:
    from maml_ext.experiments.fewshot import evaluate_checkpoint

    preset, options = preset_for(setting, algorithm, args.iterations, args.filters, args.meta_batch)
    out = runs / f"{setting}-{algorithm}"
    started = time.perf_counter()
    train_on_alphabet_split(
        preset,
        args.data_dir,
        out,
        args.iterations,
        options,
        backend=args.backend,
        val_tasks=args.val_tasks,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    seconds = time.perf_counter() - started
    steps = test_steps(setting, algorithm, preset)
    report = evaluate_checkpoint(
        out / "checkpoint.pt",
        tasks=args.tasks,
        steps=[steps],  # only the row the table shows (one inner loop per task)
        out="",
        backend=args.backend,
        device=args.device,
        progress=False,
        verbose=False,
        cache_dir=args.cache_dir,
    )
    row = report["results"]["maml"][str(steps)]
    return {
        "accuracy": row["accuracy"],
        "ci95": row["ci95"],
        "test_steps": steps,
        "inner_steps": preset.inner_steps,
        "inner_lr": preset.inner_lr,
        "options": options,
        "train_seconds": seconds,
        "iterations": args.iterations,
        "meta_batch": preset.meta_batch,
        "threads": torch.get_num_threads(),
        "test_classes": report["classes"],
    }


# ---- output -------------------------------------------------------------------------------------


def _missing(reason: str) -> str:
    """A table cell for a measurement that is not there: skipped ("not ...") or failed."""
    return reason[:60] if reason.startswith("not ") else f"failed: {reason[:60]}"


def render(results: dict, args, command: str) -> str:
    lines = [
        f"Omniglot (minimal archives in {args.data_dir}, split by alphabet, seed 0), "
        f"{args.iterations} meta-iterations (unless the column says otherwise) at "
        + (f"meta-batch {args.meta_batch}" if args.meta_batch else "each preset's meta-batch")
        + f", {args.tasks} test tasks; "
        f"device {args.device} ({platform.processor() or platform.machine()}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
        + f"), backend {args.backend}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}.",
        "",
        *(f"Command: `{c}`" for c in getattr(args, "commands", [])),
        f"Command: `{command}`",
        "",
    ]
    settings = [s for s in SETTINGS if s in args.settings]
    header = "| algorithm | options |"
    rule = "|---|---|"
    for setting in settings:
        # Runs merged from several files may have trained the settings for different lengths.
        trained = {
            results[(setting, a)]["train"].get("iterations", args.iterations)
            for a in args.algorithms
            if "failed" not in results[(setting, a)].get("train", {"failed": ""})
        }
        length = f" ({'/'.join(str(i) for i in sorted(trained))} it.)" if trained else ""
        header += (
            f" {setting}{length} accuracy % (±95%) | K, α, test steps | ms / meta-step | peak MiB |"
        )
        header += f" published {setting} % |"
        rule += "---:|---:|---:|---:|---:|"
    lines += [header, rule]
    for algorithm in args.algorithms:
        spec = ALGORITHMS[algorithm]
        # The options each setting trained with (merged runs may differ), once when they agree.
        options = {
            s: ", ".join(f"{k}={v}" for k, v in results[(s, algorithm)]["train"]["options"].items())
            for s in settings
            if "inner_steps" in results[(s, algorithm)].get("train", {})
        }
        if len(set(options.values())) > 1:
            detail = "; ".join(f"{s}: {text or '—'}" for s, text in options.items())
        else:
            detail = next(iter(options.values()), "") or "—"
        cells = f"| {spec['label']} | {detail} |"
        for setting in settings:
            entry = results[(setting, algorithm)]
            train, timing = entry.get("train", {}), entry.get("timing", {})
            if "failed" in train:
                cells += f" {_missing(train['failed'])} | |"
            else:
                cells += f" {100 * train['accuracy']:.2f} ± {100 * train['ci95']:.2f} |"
                cells += f" {train['inner_steps']}, {train['inner_lr']}, {train['test_steps']} |"
            if "failed" in timing:
                cells += f" {_missing(timing['failed'])} | |"
            else:
                cells += f" {timing['ms_per_step']:.1f} | {timing['peak_bytes'] / 2**20:.1f} |"
            cells += f" {PUBLISHED.get(algorithm, {}).get(setting, '—')} |"
        lines.append(cells)
    lines += [
        "",
        "Published numbers: the papers' test accuracy on the full Omniglot (meta-trained on the "
        "whole background set of 964 characters, tested on the evaluation set), not on these "
        "minimal archives, and with their own budgets; they are there for reference, not for "
        "comparison with the columns beside them.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding the Omniglot archives")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS)
    )
    parser.add_argument("--tasks", type=int, default=600, help="test tasks")
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--time-steps", type=int, default=10)
    parser.add_argument("--filters", type=int, default=64, help="conv channels (smoke tests)")
    parser.add_argument(
        "--meta-batch", type=int, help="tasks per meta-step for every run (default: the preset's)"
    )
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("algorithms.md"))
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument("--runs", type=Path, help="keep the training runs here (default: temp)")
    parser.add_argument("--cache-dir", help="decoded-image cache (default: beside the data)")
    parser.add_argument(
        "--no-train", dest="train", action="store_false", help="only time and measure memory"
    )
    parser.add_argument(
        "--no-timing", dest="timing", action="store_false", help="only train and test"
    )
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON", help="render the table from --json files"
    )
    parser.add_argument(
        "--_child", dest="child", nargs=2, metavar=("SETTING", "ALGORITHM"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        _child(*args.child, args)
        return
    command = "python bench/algorithms.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        results, args = merged(args.merge, args)
    else:
        if args.train and not args.data_dir:
            parser.error("--data-dir is needed to train (or --no-train)")
        results = run_all(args)
    table = render(results, args, command)
    args.out.write_text(table)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "commands": getattr(args, "commands", [command]),
                    "arguments": {k: v for k, v in vars(args).items() if k in RECORDED},
                    "results": {f"{s}/{a}": v for (s, a), v in results.items()},
                },
                indent=2,
            )
            + "\n"
        )


# The arguments a --json file records, which --merge puts back to render the table's header.
RECORDED = ("data_dir", "iterations", "tasks", "device", "backend", "meta_batch", "settings")


def run_all(args) -> dict[tuple[str, str], dict]:
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs if args.runs is not None else Path(scratch)
        for setting in args.settings:
            for algorithm in args.algorithms:
                entry: dict = {}
                if args.timing:
                    print(f"{setting} {algorithm}: timing", file=sys.stderr, flush=True)
                    entry["timing"] = measure(setting, algorithm, args)
                else:
                    entry["timing"] = {"failed": "not timed (--no-timing)"}
                if args.train:
                    print(f"{setting} {algorithm}: training", file=sys.stderr, flush=True)
                    try:
                        entry["train"] = train_and_test(setting, algorithm, args, runs)
                    except Exception as error:  # one failing algorithm must not lose the table
                        entry["train"] = {"failed": f"{type(error).__name__}: {error}"}
                else:
                    entry["train"] = {"failed": "not trained (--no-train)"}
                print(f"  {entry}", file=sys.stderr, flush=True)
                results[(setting, algorithm)] = entry
    return results


def merged(paths: list[Path], args):
    """The entries of several --json files, later files' measurements over earlier ones' (a
    "failed" entry never replaces a measured one), and the arguments of the training runs."""
    results: dict[tuple[str, str], dict] = {}
    args.commands = []
    for path in paths:
        saved = json.loads(path.read_text())
        args.commands += saved["commands"]
        for key, entry in saved["results"].items():
            setting, algorithm = key.split("/")
            into = results.setdefault((setting, algorithm), {})
            for part in ("train", "timing"):
                if part in entry and ("failed" not in entry[part] or part not in into):
                    into[part] = entry[part]
        if any("failed" not in e.get("train", {}) for e in saved["results"].values()):
            for name, value in saved["arguments"].items():
                setattr(args, name, value)
    args.settings = [s for s in SETTINGS if any(key[0] == s for key in results)]
    args.algorithms = [a for a in ALGORITHMS if any(key[1] == a for key in results)]
    for setting in args.settings:
        for algorithm in args.algorithms:
            entry = results.setdefault((setting, algorithm), {})
            for part in ("train", "timing"):
                entry.setdefault(part, {"failed": "not run"})
    return results, args


if __name__ == "__main__":
    main()

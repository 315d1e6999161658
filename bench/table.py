"""One markdown table: median ms per MAML meta-step for each implementation, per configuration.

    .venv/bin/python bench/table.py [--configs sinusoid omniglot-5w1s miniimagenet-5w1s]
        [--device cpu|cuda] [--repeats N] [--json OUT] [--impls ...] [--compile-timeout S]
        [--no-oracle64] [--no-memory]

How it measures (the rules: docs/benchmarks.md):
- every implementation gets the same model (fixed seed) and the same task batch, in this process;
- the first call of each is the warm-up (and, for vmap_compiled, the compile) and gives the
  gradient that is checked against the reference backend before anything is timed;
- then N rounds, each running every implementation in turn (interleaved, so a burst of
  background load hits all of them alike); a round of an implementation is as many back-to-back
  calls as fill ~20 ms (one call for the conv nets, hundreds for the sinusoid MLP, which would
  otherwise be timed cold right after another implementation), timed with perf_counter around
  them, synchronising the GPU before and after on CUDA; the table shows the median over the N
  rounds of the time per call;
- "speed-up" is (the fastest median of reference, vmap, vmap_compiled) / (fused median), and the
  same for fused_graph (CUDA only: the fused meta-step captured in a CUDA graph, then replayed);
- errors are max_i |g_i − r_i| / max_i |r_i| against the float32 reference backend (and, unless
  --no-oracle64, against the reference backend in float64: the float32 reference has its own
  rounding error, which on 5-step configurations is far above 1e-4);
- peak memory of the miniimagenet-5w1s second-order meta-step for fused and reference: on CUDA,
  torch.cuda.max_memory_allocated() during one step minus the memory allocated before it (after a
  warm-up step); on CPU, in a fresh child process per implementation, the peak resident set size
  (VmHWM of /proc/self/status, reset to the current RSS after the model and data were built)
  over one warm-up and one step, minus the RSS before them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import configs  # noqa: E402
import implementations as impls  # noqa: E402

DEFAULT_CONFIGS = ["sinusoid", "omniglot-5w1s", "miniimagenet-5w1s"]
DEFAULT_IMPLS = ["reference", "fused", "fused_raw", "vmap", "vmap_compiled"]
CUDA_IMPLS = ["fused_graph"]  # added to the default implementations on --device cuda
MEMORY_CONFIG = "miniimagenet-5w1s"
MEMORY_IMPLS = ["fused", "reference"]
MIN_ROUND_S = 0.02  # each round of an implementation lasts at least this long


class CompileTimeout(BaseException):
    """Raised by the alarm inside torch.compile; a BaseException so compile-failure handlers
    (``except Exception``) do not swallow it."""


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import maml_ext

        info["maml_ext"] = maml_ext.extension_info()
    except Exception as error:  # noqa: BLE001
        info["maml_ext"] = f"import failed: {error}"
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _warm_up(impl, device: str, compile_timeout: float | None):
    """The first call (compiles vmap_compiled, under an alarm of ``compile_timeout`` seconds)."""
    use_alarm = impl.name == "vmap_compiled" and compile_timeout and hasattr(signal, "SIGALRM")
    if use_alarm:

        def on_alarm(signum, frame):
            raise CompileTimeout(f"torch.compile exceeded the {compile_timeout:.0f} s budget")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, compile_timeout)
    try:
        start = time.perf_counter()
        grad = impl()
        _sync(device)
        return grad, time.perf_counter() - start
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _oracle64(config, device: str) -> tuple[torch.Tensor, float]:
    model = configs.build_model(config, dtype=torch.float64, device=device)
    batch = configs.make_batch(config, dtype=torch.float64, device=device)
    start = time.perf_counter()
    grad = impls.make("reference", model, config, batch)()
    _sync(device)
    return grad, time.perf_counter() - start


def run_config(name: str, args) -> dict:
    config = configs.get(name)
    model = configs.build_model(config, device=args.device)
    batch = configs.make_batch(config, device=args.device)
    row: dict = {"config": name, "label": config.label, "impls": {}}
    live = {}
    reference_grad = None
    for impl_name in args.impls:
        entry: dict = {}
        row["impls"][impl_name] = entry
        try:
            impl = impls.make(impl_name, model, config, batch)
            grad, seconds = _warm_up(impl, args.device, args.compile_timeout)
        except CompileTimeout as error:
            import torch._dynamo

            torch._dynamo.reset()
            entry["failed"] = f"compile failed: {error}"
            continue
        except impls.Unavailable as reason:
            entry["skipped"] = str(reason)
            continue
        except Exception as error:  # noqa: BLE001 - a row, not a crash
            entry["failed"] = impls._short(error, 200)
            continue
        entry["first_call_s"] = seconds
        if getattr(impl, "note", ""):
            entry["note"] = impl.note
        if impl_name == "reference":
            reference_grad = grad
        entry["grad"] = grad.detach()
        live[impl_name] = impl
        print(f"  {name}: {impl_name} first call {seconds:.2f} s", file=sys.stderr, flush=True)

    oracle = None
    if args.oracle64:
        oracle, seconds = _oracle64(config, args.device)
        row["oracle64_s"] = seconds
    for entry in row["impls"].values():
        grad = entry.pop("grad", None)
        if grad is None:
            continue
        if reference_grad is not None:
            entry["max_err_vs_ref32"] = impls.max_elementwise_error(grad, reference_grad)
            entry["rel_err_vs_ref32"] = impls.relative_error(grad, reference_grad)
        if oracle is not None:
            entry["max_err_vs_ref64"] = impls.max_elementwise_error(grad, oracle)
            entry["rel_err_vs_ref64"] = impls.relative_error(grad, oracle)

    # Calls per round: enough for ~20 ms, so a sub-millisecond step is timed warm, not right
    # after another implementation has evicted its code and data from the caches.
    calls = {}
    for impl_name, impl in live.items():
        _sync(args.device)
        start = time.perf_counter()
        impl()
        _sync(args.device)
        calls[impl_name] = max(1, min(1000, round(MIN_ROUND_S / (time.perf_counter() - start))))
        row["impls"][impl_name]["calls_per_round"] = calls[impl_name]
    times = {impl_name: [] for impl_name in live}
    for _ in range(args.repeats):
        for impl_name, impl in live.items():
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(calls[impl_name]):
                impl()
            _sync(args.device)
            times[impl_name].append((time.perf_counter() - start) / calls[impl_name])
    for impl_name, samples in times.items():
        entry = row["impls"][impl_name]
        entry["times_ms"] = [s * 1e3 for s in samples]
        entry["median_ms"] = statistics.median(samples) * 1e3
    others = {
        n: row["impls"][n]["median_ms"]
        for n in impls.COMPETITORS
        if "median_ms" in row["impls"].get(n, {})
    }
    if others:
        fastest = min(others, key=others.get)
        row["fastest_other"] = fastest
        for impl_name, key in (("fused", "speedup"), ("fused_graph", "speedup_graph")):
            median = row["impls"].get(impl_name, {}).get("median_ms")
            if median:
                row[key] = others[fastest] / median
    return row


# ---- peak memory -----------------------------------------------------------------------------


def _memory_child(impl_name: str, config_name: str, device: str) -> None:
    """Child process: one warm-up and one meta-step; prints the peak memory increase as JSON."""
    config = configs.get(config_name)
    model = configs.build_model(config, device=device)
    batch = configs.make_batch(config, device=device)
    impl = impls.make(impl_name, model, config, batch)
    if device == "cuda":
        impl()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        impl()
        torch.cuda.synchronize()
        result = {
            "peak_bytes": torch.cuda.max_memory_allocated() - before,
            "method": "torch.cuda.max_memory_allocated() during the step minus "
            "memory_allocated() before it, after one warm-up step",
        }
    else:
        result = cpu_peak_increase(lambda: (impl(), impl()))
        result["method"] = (
            "fresh child process per implementation: peak RSS (VmHWM) over one warm-up + one "
            "step minus RSS after building the model and data"
            + (
                ""
                if result.pop("reset")
                else " (high-water mark could not be reset: minus the peak RSS up to then)"
            )
        )
    print("MEMORY_JSON " + json.dumps(result))


def cpu_peak_increase(run) -> dict:
    """How far ``run()`` raises this process's peak resident set size above its RSS now, in bytes
    (``peak_bytes``; ``reset``: whether the high-water mark could be reset first).

    ru_maxrss would be simplest, but Linux carries it over from the parent across fork+exec (a
    child of a 7 GB parent reports >= 7 GB), so this reads VmHWM from /proc/self/status and, where
    the kernel allows, resets the high-water mark to the current RSS first (clear_refs "5");
    where it does not, the baseline is the peak so far. python_tests/test_memory_method.py checks
    it against known allocations."""
    gc.collect()
    base_rss = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    base = base_rss if reset else _proc_status_kib("VmHWM")
    run()
    peak = _proc_status_kib("VmHWM")
    return {
        "peak_bytes": (peak - base) * 1024,
        "baseline_rss_bytes": base_rss * 1024,
        "reset": reset,
    }


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(device: str) -> dict:
    results = {}
    for impl_name in MEMORY_IMPLS:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_memory-child",
            impl_name,
            "--device",
            device,
        ]
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("MEMORY_JSON ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[impl_name] = {"failed": f"child exited {proc.returncode}: {tail[:200]}"}
        else:
            results[impl_name] = json.loads(lines[-1][len("MEMORY_JSON ") :])
        print(f"  memory: {impl_name} {results[impl_name]}", file=sys.stderr, flush=True)
    return results


# ---- output -----------------------------------------------------------------------------------


def _cell(entry: dict, oracle64: bool) -> str:
    if "failed" in entry:
        return f"— ({entry['failed']})"
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    if "median_ms" not in entry:
        return "—"
    ms = entry["median_ms"]
    text = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"
    errs = []
    if "max_err_vs_ref32" in entry:
        errs.append(f"{entry['max_err_vs_ref32']:.1e}")
    if oracle64 and "max_err_vs_ref64" in entry:
        errs.append(f"{entry['max_err_vs_ref64']:.1e}")
    return f"{text} ({' / '.join(errs)})" if errs else text


def render(rows: list[dict], memory: dict | None, info: dict, args, command: str) -> str:
    out = []
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    out.append(
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads "
        f"{info['torch_threads']}, torch {info['torch']}, Python {info['python']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; device {args.device}; load average at start {load}"
    )
    out.append(f"Command: `{command}`  ({info['date']})")
    out.append("")
    names = args.impls
    err_label = "max err vs ref f32" + (" / vs ref f64" if args.oracle64 else "")
    header = ["config"] + [f"{n} ms ({err_label})" if i == 0 else n for i, n in enumerate(names)]
    speedups = [("speedup", "fused")] + (
        [("speedup_graph", "fused_graph")] if "fused_graph" in names else []
    )
    header += [f"fastest other / {n}" for _, n in speedups]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["label"]] + [_cell(row["impls"].get(n, {}), args.oracle64) for n in names]
        for key, _ in speedups:
            cells.append(f"{row[key]:.2f}× (vs {row['fastest_other']})" if key in row else "—")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        f"Cells: median ms per meta-step over {args.repeats} interleaved warm rounds (each "
        f"as many calls as fill {MIN_ROUND_S * 1e3:.0f} ms) "
        "(second order, float32); in brackets max_i |g_i − r_i| / max_i |r_i| of the "
        "meta-gradient against the reference backend in float32"
        + (" and in float64" if args.oracle64 else "")
        + ". fused = MetaOptimizer."
        "meta_gradient (validation + autograd glue + op); fused_graph = the same with "
        "cuda_graph=True (captured on the first call, replayed); fused_raw = the bare "
        "torch.ops.maml_ext.meta_step. Speed-up: fastest of reference, vmap, vmap_compiled "
        "divided by fused (and by fused_graph)."
    )
    for row in rows:
        for n in names:
            entry = row["impls"].get(n, {})
            if entry.get("note"):
                out.append(f"- {row['config']} {n}: {entry['note']}")
    if memory is not None:
        method = next((m["method"] for m in memory.values() if "method" in m), "")
        parts = []
        for n, m in memory.items():
            parts.append(
                f"{n} {m['peak_bytes'] / 2**20:.0f} MiB"
                if "peak_bytes" in m
                else f"{n}: {m['failed']}"
            )
        ratio = ""
        if (
            all("peak_bytes" in memory.get(n, {}) for n in ("fused", "reference"))
            and memory["fused"]["peak_bytes"] > 0
        ):
            ratio = (
                f" (reference / fused = "
                f"{memory['reference']['peak_bytes'] / memory['fused']['peak_bytes']:.2f})"
            )
        out.append(
            f"- Peak memory of one {MEMORY_CONFIG} second-order meta-step: "
            + ", ".join(parts)
            + ratio
            + f". Method: {method}."
        )
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(configs.CONFIGS)
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=impls.NAMES,
        help=f"default: {' '.join(DEFAULT_IMPLS)}, plus {' '.join(CUDA_IMPLS)} on cuda",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=420.0,
        help="seconds allowed for vmap_compiled's first call (its compile)",
    )
    parser.add_argument(
        "--no-oracle64",
        dest="oracle64",
        action="store_false",
        help="skip the float64 reference run per config",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        _memory_child(args.memory_child, MEMORY_CONFIG, args.device)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.impls is None:
        args.impls = DEFAULT_IMPLS + (CUDA_IMPLS if args.device == "cuda" else [])
    if "reference" not in args.impls:
        args.impls = ["reference"] + list(args.impls)  # the oracle for the gradient check

    command = "python bench/table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    start = time.perf_counter()
    rows = []
    for name in args.configs:
        print(f"# {name}", file=sys.stderr, flush=True)
        rows.append(run_config(name, args))
    memory = measure_memory(args.device) if args.memory else None
    info["load_average_end"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - start
    table = render(rows, memory, info, args, command)
    print(table)
    print(
        f"- Total run time {info['total_s']:.0f} s; load average at end "
        + ", ".join(f"{x:.2f}" for x in info["load_average_end"])
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "command": command,
                    "rows": rows,
                    "memory": memory,
                    "repeats": args.repeats,
                    "device": args.device,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()

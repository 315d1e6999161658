"""Peak memory of one second-order meta-step as a function of the inner steps K, fused against
reference: one markdown table.

    .venv/bin/python bench/memory_table.py [--configs miniimagenet-5w1s-resnet12-w32]
        [--steps 1 5 10] [--device cpu|cuda] [--tasks T] [--query Q] [--width W]

Each (configuration, K, implementation) runs in a fresh child process (table.py's memory child:
one warm-up step and one measured step; on the CPU the peak resident set size (VmHWM) minus the
RSS after building the model and data, on CUDA torch.cuda.max_memory_allocated() during the step
minus the memory allocated before it). --tasks, --query and --width (the conv width, ResNet-12's
first width) override the configuration's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import configs  # noqa: E402

IMPLS = ("fused", "reference")


def child(impl_name: str, config: configs.Config, device: str) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        json.dumps([impl_name, dataclasses.asdict(config), device]),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEMORY_JSON ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"child exited {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len("MEMORY_JSON ") :])


def run_child(spec: str) -> None:
    import table

    impl_name, fields, device = json.loads(spec)
    fields["features"] = tuple(fields["features"])
    config = configs.Config(**fields)
    configs.CONFIGS[config.name] = config  # table's child looks the configuration up by name
    table._memory_child(impl_name, config.name, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["miniimagenet-5w1s-resnet12-w32"])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--query", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--_child", dest="child")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return
    print("| config | K | fused peak (MiB) | reference peak (MiB) | reference / fused |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.configs:
        base = configs.get(name)
        overrides = {"tasks": args.tasks, "query": args.query, "channels": args.width}
        base = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        for steps in args.steps:
            config = dataclasses.replace(base, inner_steps=steps)
            peaks = {}
            for impl_name in IMPLS:
                result = child(impl_name, config, args.device)
                print(f"  {name} K={steps} {impl_name}: {result}", file=sys.stderr, flush=True)
                peaks[impl_name] = result.get("peak_bytes")
            cells = [f"{p / 2**20:.0f}" if p is not None else "failed" for p in peaks.values()]
            ratio = f"{peaks['reference'] / peaks['fused']:.1f}×" if all(peaks.values()) else "–"
            label = (
                f"{name} (width {config.channels}, T={config.tasks}, "
                f"{config.support}/{config.query})"
            )
            print(f"| {label} | {steps} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

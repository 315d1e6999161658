"""A ``bench/algorithms.py --json`` file from the stderr log of a run that was stopped before it
wrote one (each finished (setting, algorithm) prints its entry there), for ``--merge``.

    .venv/bin/python bench/algorithms_from_log.py LOG --command "..." --iterations N \\
        --meta-batch N --tasks N --data-dir DIR --out OUT.json
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def entries(log: str) -> dict[str, dict]:
    """{"setting/algorithm": entry} for each entry line after a "SETTING ALGORITHM: ..." line."""
    found, current = {}, None
    for line in log.splitlines():
        if line.endswith(": training") or line.endswith(": timing"):
            setting, algorithm = line.split(":")[0].split()
            current = f"{setting}/{algorithm}"
        elif line.startswith("  {") and current is not None:
            found[current] = ast.literal_eval(line.strip())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--command", required=True, help="the command that wrote the log")
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--meta-batch", type=int)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = entries(args.log.read_text())
    for entry in results.values():
        if "failed" not in entry.get("train", {"failed": ""}):
            entry["train"].setdefault("iterations", args.iterations)
    arguments = {
        "data_dir": args.data_dir,
        "iterations": args.iterations,
        "tasks": args.tasks,
        "device": args.device,
        "backend": args.backend,
        "meta_batch": args.meta_batch,
        "settings": sorted({key.split("/")[0] for key in results}),
    }
    args.out.write_text(
        json.dumps(
            {"commands": [args.command], "arguments": arguments, "results": results}, indent=2
        )
        + "\n"
    )
    print(f"{len(results)} entries: {', '.join(results)}")


if __name__ == "__main__":
    main()

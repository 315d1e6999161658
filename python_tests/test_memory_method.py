"""The peak-memory method of bench/memory_table.py (and bench/table.py's memory column), checked on
small cases: the CPU measurement reads a known allocation as its size and no allocation as about
nothing, and on a small conv net the second-order meta-step's peak grows with the inner steps K
far faster for the reference backend (activations kept per step) than for the fused one.

Each measurement runs in a fresh Python process, as the benchmark's do."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
MIB = 2**20

MEASURE_ALLOCATIONS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from table import cpu_peak_increase

def allocate(count=64 * 2**20 // 4):
    block = torch.ones(count)  # 64 MiB of float32 by default, every page written
    return float(block[-1])

# The process's first large torch op costs a one-time 2.4-8.5 MiB on top of its tensor (measured:
# it depends on the build, and it is there at one intra-op thread too). A 4 MiB tensor pays it
# before the measurement.
allocate(2**20)
results = {"allocated": cpu_peak_increase(allocate), "nothing": cpu_peak_increase(lambda: None)}
print("RESULT " + json.dumps(results))
"""


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_cpu_peak_reads_a_known_allocation_as_its_size():
    results = _run(MEASURE_ALLOCATIONS, str(BENCH))
    if not results["allocated"]["reset"]:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    # Linux batches each thread's RSS counter updates (up to 64 pages per thread), so VmHWM may
    # read a few hundred KiB under the allocation (63.95 MiB measured for 64).
    assert 63 * MIB <= results["allocated"]["peak_bytes"] < 66 * MIB, results
    assert results["nothing"]["peak_bytes"] < 2 * MIB, results


def test_reference_peak_grows_with_inner_steps_faster_than_fused():
    sys.path.insert(0, str(BENCH))
    try:
        import configs
        import memory_table
    finally:
        sys.path.remove(str(BENCH))
    # Activations dominate: 16 channels at 28x28, 4 tasks of 20 + 20 images.
    base = configs.Config(
        name="memory-method-conv",
        kind="conv",
        tasks=4,
        inner_steps=1,
        inner_lr=0.1,
        support=20,
        query=20,
        features=(1, 28, 28),
        outputs=5,
        loss="cross_entropy",
        channels=16,
    )
    peaks = {}
    for steps in (1, 5):
        config = dataclasses.replace(base, inner_steps=steps)
        for impl in ("fused", "reference"):
            result = memory_table.child(impl, config, "cpu")
            assert "peak_bytes" in result, result
            peaks[impl, steps] = result["peak_bytes"]
    fused_growth = peaks["fused", 5] - peaks["fused", 1]
    reference_growth = peaks["reference", 5] - peaks["reference", 1]
    # The reference keeps each inner step's activations for the second-order backward: four more
    # steps hold at least 4 x T x (N_support) x 16 x 28 x 28 floats per conv layer's output.
    assert reference_growth > 4 * 4 * 20 * 16 * 28 * 28 * 4, peaks
    assert reference_growth > 3 * max(fused_growth, 1 * MIB), peaks

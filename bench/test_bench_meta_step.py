"""pytest-benchmark: one MAML meta-step (second order, float32, CPU), implementation × config.

    .venv/bin/python -m pytest bench/test_bench_meta_step.py \
        --benchmark-columns=median,min,max,rounds
    MAML_BENCH_SLOW=1 ...   # also the combinations skipped below as too slow for this CPU

Each benchmark first checks its meta-gradient against the reference backend on the same inputs
(the first call is also the warm-up, and torch.compile's compile for vmap_compiled), then times a
few rounds in pedantic mode. Accuracy (float32):

- fused, fused_raw: relative error (‖g − r‖/‖r‖) < 1e-4 against the float32 reference. Where the
  float32 reference itself is further than that from the float64 reference (the 5-step
  configurations: 4e-2 measured on miniimagenet-5w1s), the check docs/benchmarks.md borrows from
  flash-attention: the error against the float64 reference may be at most twice the float32
  reference's own.
- vmap, vmap_compiled: < 5e-2 on the batch-norm configurations, < 1e-4 on sinusoid. torch.func's
  batch-norm batching rule gets the mixed second derivative (∂/∂conv weight of ∂L/∂BN weight)
  wrong under vmap: the same error shows in float64 (2e-2 on a small conv net, while grad-of-grad
  without vmap agrees with the reference to 1e-16), so it is not rounding. bench/NOTES.md has the
  measured errors. Timings are still comparable: the same ops run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import implementations as impls  # noqa: E402

IMPLS = ["reference", "fused", "fused_raw", "vmap", "vmap_compiled"]
CONFIGS = list(configs.CONFIGS)
RUN_SLOW = os.environ.get("MAML_BENCH_SLOW", "") not in ("", "0")

# Single-call times measured on this 2-core AMD EPYC (bench/NOTES.md). Combinations whose one call
# takes more than ~20 s, or whose torch.compile takes minutes, are skipped unless MAML_BENCH_SLOW=1.
SLOW: dict[tuple[str, str], str] = {
    (impl, "miniimagenet-5w1s-resnet12-w32"): "ResNet-12: 16-38 s per call here, 2026-12-06"
    for impl in IMPLS
}

FUSED_TOL = 1e-4
VMAP_TOL_BN = 5e-2


class _Oracle:
    """Per config: model, batch, and the reference meta-gradients (float32; float64 on demand)."""

    def __init__(self, name: str):
        self.config = configs.get(name)
        self.model = configs.build_model(self.config)
        self.batch = configs.make_batch(self.config)
        self.ref32 = impls.make("reference", self.model, self.config, self.batch)()
        self._ref64 = None

    @property
    def ref64(self) -> torch.Tensor:
        if self._ref64 is None:
            model = configs.build_model(self.config, dtype=torch.float64)
            batch = configs.make_batch(self.config, dtype=torch.float64)
            self._ref64 = impls.make("reference", model, self.config, batch)()
        return self._ref64


_ORACLES: dict[str, _Oracle] = {}


def oracle(name: str) -> _Oracle:
    if name not in _ORACLES:
        _ORACLES.clear()  # one config's tensors at a time (miniImageNet batches are large)
        _ORACLES[name] = _Oracle(name)
    return _ORACLES[name]


def check_gradient(impl_name: str, grad: torch.Tensor, orc: _Oracle, info: dict) -> None:
    err32 = impls.relative_error(grad, orc.ref32)
    info["rel_err_vs_ref32"] = err32
    if impl_name == "reference":
        return
    if impl_name.startswith("vmap"):
        tol = FUSED_TOL if orc.config.kind == "mlp" else VMAP_TOL_BN
        assert err32 < tol, f"{impl_name}: relative error {err32:.2e} vs reference (tol {tol})"
        return
    if err32 < FUSED_TOL:
        return
    # The float32 reference may itself be off: judge both against float64.
    err64 = impls.relative_error(grad, orc.ref64)
    ref_err64 = impls.relative_error(orc.ref32, orc.ref64)
    info["rel_err_vs_ref64"], info["reference_rel_err_vs_ref64"] = err64, ref_err64
    assert err64 <= max(FUSED_TOL, 2 * ref_err64), (
        f"{impl_name}: relative error {err32:.2e} vs float32 reference, {err64:.2e} vs float64 "
        f"reference, whose float32 run is off by {ref_err64:.2e}"
    )


def _params():
    for config in CONFIGS:
        for impl in IMPLS:
            marks = []
            reason = SLOW.get((impl, config))
            if reason and not RUN_SLOW:
                marks.append(pytest.mark.skip(reason=f"{reason} (MAML_BENCH_SLOW=1 runs it)"))
            yield pytest.param(impl, config, id=f"{config}-{impl}", marks=marks)


@pytest.mark.parametrize("impl_name, config_name", list(_params()))
def test_meta_step(benchmark, impl_name, config_name):
    orc = oracle(config_name)
    impl = impls.make(impl_name, orc.model, orc.config, orc.batch)
    start = time.perf_counter()
    grad = impl()  # warm-up (and compile)
    first = time.perf_counter() - start
    info = {"first_call_s": first}
    if getattr(impl, "note", ""):
        info["note"] = impl.note
    check_gradient(impl_name, grad, orc, info)
    benchmark.extra_info.update(info)
    # A few seconds per benchmark: 3 rounds for the slow ones, up to 30 for the fast ones.
    rounds = max(3, min(30, int(5.0 / max(first, 1e-3))))
    benchmark.pedantic(impl, rounds=rounds, iterations=1, warmup_rounds=0)

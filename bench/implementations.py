"""The competitors: each computes the MAML meta-gradient of the mean query loss over tasks with
respect to the model's parameters, for the same model and inputs, and returns it flat (the
parameters' gradients concatenated in ``model.named_parameters()`` order).

- ``reference``: ``MetaOptimizer(backend="reference")``, a per-task Python loop with autograd
  (``create_graph=True``), as learn2learn and higher do it; the oracle.
- ``fused``: ``MetaOptimizer(backend="fused")``: one ``torch.ops.maml_ext.meta_step`` call for all
  tasks, plus input validation and the autograd glue (the user-visible cost).
- ``fused_graph``: ``MetaOptimizer(backend="fused", cuda_graph=True)``: the same meta-step
  captured once in a CUDA graph (the first call) and replayed; CUDA only (on the CPU it is
  skipped, saying why).
- ``fused_raw``: the bare ``torch.ops.maml_ext.meta_step`` op with θ and the rates prepared once
  (no validation, no autograd): how much of ``fused`` is the op itself.
- ``vmap``: the torch.func MAML example's method: an inner loop of ``torch.func.grad`` over
  ``functional_call``, ``vmap`` over tasks of the adapted query loss, ``torch.func.grad`` of the
  mean over tasks (second order: the outer grad differentiates through the inner grads).
- ``vmap_compiled``: the same function under ``torch.compile``; if compiling the whole
  double-grad-of-vmap fails, the per-task function alone is compiled and vmapped/differentiated
  eagerly (``compile_mode`` records which worked and why).

Usage: ``impl = make("fused", model, config, batch); grad = impl()``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

try:
    import maml_ext
except ImportError:  # run from a checkout: the package (and its built _C) sits beside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import maml_ext
from maml_ext.program import LOSS_CODES, compile_program

NAMES = ("reference", "fused", "fused_graph", "fused_raw", "vmap", "vmap_compiled")
# The implementations a speed-up of fused is measured against (docs/benchmarks.md).
COMPETITORS = ("reference", "vmap", "vmap_compiled")


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients of ``params`` (a model's, in ``named_parameters()`` order), concatenated."""
    return torch.cat([p.grad.reshape(-1) for p in params])


class Unavailable(Exception):
    """This implementation cannot run here (the reason is the message): a skip, not a failure."""


class Implementation:
    name = "?"
    note = ""  # how it ran, for the table (e.g. what torch.compile compiled)

    def __init__(self, model: nn.Module, config, batch, *, first_order: bool = False):
        self.model, self.config, self.batch, self.first_order = model, config, batch, first_order

    def __call__(self) -> torch.Tensor:
        raise NotImplementedError


class _MetaOptimizerImpl(Implementation):
    backend = "?"
    cuda_graph = False

    def __init__(self, model, config, batch, *, first_order=False):
        super().__init__(model, config, batch, first_order=first_order)
        self.opt = maml_ext.MetaOptimizer(
            model,
            None,
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            first_order=first_order,
            loss=config.loss,
            backend=self.backend,
            cuda_graph=self.cuda_graph,
        )
        assert self.opt.backend == self.backend, self.opt.backend
        # Walking the module tree twice costs ~15-30 µs a call (the harness's cost, not the
        # library's, in a sinusoid meta-step): list the parameters once.
        self.params = [p for _, p in model.named_parameters()]

    def __call__(self):
        for p in self.params:
            p.grad = None
        self.opt.meta_gradient(*self.batch)
        return flat_grads(self.params)


class Reference(_MetaOptimizerImpl):
    name = backend = "reference"


class Fused(_MetaOptimizerImpl):
    name = backend = "fused"


class FusedGraph(_MetaOptimizerImpl):
    name, backend, cuda_graph = "fused_graph", "fused", True

    def __init__(self, model, config, batch, *, first_order=False):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise Unavailable(f"CUDA graphs need a CUDA device; the model is on {device}")
        super().__init__(model, config, batch, first_order=first_order)


class FusedRaw(Implementation):
    """torch.ops.maml_ext.meta_step alone; θ, rates and the program are prepared once."""

    name = "fused_raw"

    def __init__(self, model, config, batch, *, first_order=False):
        super().__init__(model, config, batch, first_order=first_order)
        opt = maml_ext.MetaOptimizer(
            model,
            None,
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            first_order=first_order,
            loss=config.loss,
            backend="fused",
        )
        program = compile_program(model)
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.theta = program.flatten(params).contiguous()
        self.rates = opt.inner_lr.flat(program.slots, config.inner_steps, self.theta).detach()
        self.ints, self.floats = list(program.ints), list(program.floats)
        self.loss_code = LOSS_CODES[config.loss]
        # The program's θ layout is named_parameters() order (program.py), so the op's
        # meta-gradient is already the flat gradient; check that once.
        assert [s.name for s in program.slots] == [n for n, _ in model.named_parameters()]

    def __call__(self):
        out = torch.ops.maml_ext.meta_step(
            self.theta,
            self.rates,
            *self.batch,
            self.ints,
            self.floats,
            self.loss_code,
            self.first_order,
            False,
        )
        return out[3]  # the mean-over-tasks meta-gradient [P]


def _loss_fn(config):
    return F.mse_loss if config.loss == "mse" else F.cross_entropy


def make_vmap_meta_grad(model: nn.Module, config, *, first_order: bool = False):
    """meta_grad(params, sx, sy, qx, qy) -> {name: gradient}, written as the torch.func MAML
    example writes it (functorch/examples/maml_omniglot/maml-omniglot-transforms.py), with the
    outer ``.backward()`` replaced by ``torch.func.grad`` so it is one pure function."""
    loss_fn, alpha, steps = _loss_fn(config), config.inner_lr, config.inner_steps

    def support_loss(params, x, y):
        return loss_fn(functional_call(model, params, (x,)), y)

    def inner_loop(params, sx, sy):
        for _ in range(steps):
            grads = grad(support_loss)(params, sx, sy)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {k: params[k] - alpha * grads[k] for k in params}
        return params

    def task_query_loss(params, sx, sy, qx, qy):
        return support_loss(inner_loop(params, sx, sy), qx, qy)

    def meta_loss(params, sx, sy, qx, qy):
        return vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).mean()

    return grad(meta_loss), task_query_loss


class Vmap(Implementation):
    name = "vmap"

    def __init__(self, model, config, batch, *, first_order=False):
        super().__init__(model, config, batch, first_order=first_order)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.fn, self.task_fn = make_vmap_meta_grad(model, config, first_order=first_order)

    def __call__(self):
        grads = self.fn(self.params, *self.batch)
        return torch.cat([grads[n].reshape(-1) for n in self.params])


class VmapCompiled(Vmap):
    """``torch.compile`` of the whole meta-gradient function; if that fails, of the per-task
    query-loss function only (vmap and both grads applied to the compiled function eagerly).
    Compiles on the first call (``warm_up``); ``compile_mode``/``note`` say what worked."""

    name = "vmap_compiled"
    mode = None  # torch.compile mode; None = default

    def __init__(self, model, config, batch, *, first_order=False):
        super().__init__(model, config, batch, first_order=first_order)
        self.compiled = None
        self.compile_mode = None
        self.compile_seconds = None
        self.failures: list[str] = []

    def warm_up(self):
        if self.compiled is not None:
            return
        import torch._dynamo

        kwargs = {} if self.mode is None else {"mode": self.mode}
        start = time.perf_counter()
        whole = torch.compile(self.fn, fullgraph=True, **kwargs)
        try:
            whole(self.params, *self.batch)
            self.compiled, self.compile_mode = whole, "whole (fullgraph)"
        except Exception as error:  # noqa: BLE001 - recorded in the table
            self.failures.append(f"whole meta-grad: {_short(error)}")
            torch._dynamo.reset()
            task_fn = torch.compile(self.task_fn, **kwargs)

            def meta_loss(params, sx, sy, qx, qy):
                return vmap(task_fn, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).mean()

            per_task = grad(meta_loss)
            try:
                per_task(self.params, *self.batch)
                self.compiled, self.compile_mode = per_task, "per-task fn only"
            except Exception as error2:  # noqa: BLE001
                self.failures.append(f"per-task fn: {_short(error2)}")
                torch._dynamo.reset()
                raise RuntimeError("compile failed: " + " | ".join(self.failures)) from error2
        self.compile_seconds = time.perf_counter() - start
        self.note = f"compiled {self.compile_mode} in {self.compile_seconds:.0f} s" + (
            f"; {'; '.join(self.failures)}" if self.failures else ""
        )

    def __call__(self):
        self.warm_up()
        grads = self.compiled(self.params, *self.batch)
        return torch.cat([grads[n].reshape(-1) for n in self.params])


def _short(error: BaseException, limit: int = 160) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return first[:limit]


_CLASSES = {c.name: c for c in (Reference, Fused, FusedGraph, FusedRaw, Vmap, VmapCompiled)}


def make(
    name: str, model: nn.Module, config, batch, *, first_order: bool = False
) -> Implementation:
    if name not in _CLASSES:
        raise KeyError(f"unknown implementation {name!r}; choose from {NAMES}")
    return _CLASSES[name](model, config, batch, first_order=first_order)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (the norm-wise relative error the tests use)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def max_elementwise_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: the largest single deviation, relative to the gradient's scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


__all__ = [
    "NAMES",
    "COMPETITORS",
    "Unavailable",
    "make",
    "relative_error",
    "max_elementwise_error",
    "flat_grads",
]

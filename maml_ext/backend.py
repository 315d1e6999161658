"""Backends: the objects that compute a MAML meta-step, and the rule that picks one.

A backend is one object bound to a model, a task loss, a device and a dtype. It provides:

- ``name``: the string ``MetaStepResult.backend`` reports ("fused" or "reference");
- ``reason``: why ``backend='auto'`` did not pick the fused backend (None otherwise);
- ``defers_class_range``: True when a class index out of range makes the step's loss non-finite
  instead of failing, so the caller may skip reading the indices (a host synchronisation on a GPU)
  and read them only after a non-finite step, to name the culprit;
- ``meta_gradient(params, inner_lr, support_x, support_y, query_x, query_y, *, steps,
  first_order[, variant]) -> MetaGradient``: the gradient of the mean query loss over tasks after
  ``steps`` inner SGD steps, with respect to every parameter and every learned inner rate, the
  step's means and a finite flag, without touching any ``.grad`` and without a host
  synchronisation where the backend can avoid one;
- ``adapt_steps(params, inner_lr, support_x, support_y, *, steps[, variant])``: for each step
  count k in ``steps`` (increasing, >= 1), ``(k, {name: [T, *shape]})``, the per-task weights after
  k inner steps, no graph kept, from one inner loop (a generator: the weights after k are yielded
  before step k + 1 runs); ``adapt(..., steps=k)`` is its last item for ``steps=[k]``;
- ``predict(adapted, x) -> [T, N, ...]``: per-task outputs at per-task weights;
- ``hvp(params, x, y, v) -> {name: [T, *shape]}``: per-task Hessian-vector products of the loss.

``params`` is the model's trainable parameters ``{name: tensor}`` in ``named_parameters()``
order, ``inner_lr`` the ``InnerLearningRates`` module; inputs are task-batched ``[T, N, ...]``.

The MAML family's options (maml_ext/variants.py) reach the backends in two ways. ANIL's ``adapt=``
lives in ``inner_lr`` (rate 0 for the parameters that take no inner steps, which is MAML's
recursion exactly; the reference differentiates only the adapted ones). MAML++'s multi-step loss
and per-step batch norm come as ``variant=`` (a ``variants.Variant``), passed only when one is on,
so the default path and wrappers that do not know it are unchanged: the objective is then
Σ_k w_k · (mean query loss after step k) and ``MetaGradient`` also carries the per-step batch-norm
parameters' gradients (named "per_step_batch_norm"); ``query_loss`` stays the last step's. The
fused backend runs them through ``maml_ext::meta_step_options`` (csrc/meta_step.h).

What ``MetaOptimizer`` does around a backend (maml_ext/optimizer.py): it validates every input
(naming the argument) before calling it, picks one backend per (device, dtype) with
``choose_backend`` (once: the choice, its one warning and the compiled program are cached),
raises ``FloatingPointError`` when ``MetaGradient.finite`` is false (applying nothing), and hands
``MetaGradient.grads`` to ``.grad`` of ``MetaGradient.tensors`` and to the outer optimiser.

Where the rest of the MAML family lives: iMAML and Reptile (maml_ext/implicit.py,
maml_ext/reptile.py) are meta-learners of their own, built on the backends' per-task primitives
(maml_ext/per_task.py: gradients, HVPs and forwards at per-task weights), not backends.
Splitting a meta-batch, within one process (``max_tasks_per_call``) or across processes
(``distributed``), is done around ``meta_gradient`` by MetaOptimizer: each chunk's
``MetaGradient`` is packed, weighted by its task count, into one flat buffer
(maml_ext/distributed.py), which is summed over chunks and all-reduced once over ranks.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import fused, reference
from ._extension import _load_error, compiled_ops_available, cuda_kernels_compiled
from .inner_lr import InnerLearningRates
from .losses import TaskLoss
from .program import (
    LOSS_CODES,
    RECORDS_BY_CODE,
    LayerProgram,
    UnsupportedModelError,
    compile_program,
)
from .variants import Variant

BACKENDS = ("auto", "reference", "fused")

Params = dict[str, torch.Tensor]


def final_weights(trajectory: Iterator[tuple[int, Params]]):
    """The weights of the last ``(k, weights)`` item of an ``adapt_steps`` trajectory."""
    (last,) = collections.deque(trajectory, maxlen=1)  # runs the generator to its end
    return last[1]


class MetaGradient(NamedTuple):
    """One meta-step's gradients and means (0-dim tensors, not synchronised with the host)."""

    tensors: Sequence[torch.Tensor]  # what was differentiated: the parameters, then learned rates
    grads: Sequence[torch.Tensor]  # their meta-gradients, one per tensor, same shapes
    names: Sequence[str]  # one per tensor, for messages ("inner_lr" for the rates)
    query_loss: torch.Tensor  # mean query loss over tasks after adaptation, detached
    query_accuracy: torch.Tensor | None  # mean query accuracy (classification), else None
    support_loss: torch.Tensor  # mean support loss before adaptation
    finite: torch.Tensor  # 0-dim bool: the query loss and every gradient are finite


class Backend:
    """The interface every backend provides (see the module docstring)."""

    name: str
    reason: str | None = None
    defers_class_range: bool = False

    def meta_gradient(
        self,
        params: Params,
        inner_lr: InnerLearningRates,
        support_x,
        support_y,
        query_x,
        query_y,
        *,
        steps: int,
        first_order: bool,
    ) -> MetaGradient:
        raise NotImplementedError

    def adapt_steps(
        self,
        params: Params,
        inner_lr: InnerLearningRates,
        support_x,
        support_y,
        *,
        steps: Sequence[int],
        variant: Variant | None = None,
    ) -> Iterator[tuple[int, Params]]:
        raise NotImplementedError

    def adapt(self, params, inner_lr, support_x, support_y, *, steps: int, variant=None) -> Params:
        """Per-task weights after ``steps`` inner steps: the last item of :meth:`adapt_steps`."""
        return final_weights(
            self.adapt_steps(params, inner_lr, support_x, support_y, steps=[steps], variant=variant)
        )

    def predict(self, adapted: Params, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hvp(self, params: Params, x: torch.Tensor, y: torch.Tensor, v: Params) -> Params:
        raise NotImplementedError


class ReferenceBackend(Backend):
    """Plain PyTorch, any model: a per-task loop with autograd (maml_ext/reference.py)."""

    name = "reference"

    def __init__(self, model: nn.Module, loss: TaskLoss, reason: str | None = None):
        self.model, self.loss, self.reason = model, loss, reason

    def meta_gradient(
        self,
        params,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        *,
        steps,
        first_order,
        variant: Variant | None = None,
    ):
        batch_norm = variant.batch_norm if variant is not None else None
        extra = list(batch_norm.parameters()) if batch_norm is not None else []
        with torch.enable_grad():  # the inner steps and the meta-gradient are autograd's
            result = reference.meta_loss(
                self.model,
                params,
                inner_lr,
                support_x,
                support_y,
                query_x,
                query_y,
                steps=steps,
                first_order=first_order,
                loss=self.loss,
                variant=variant,
            )
            rates = list(inner_lr.parameters())
            tensors = list(params.values()) + rates + extra
            grads = torch.autograd.grad(result.loss, tensors, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
        loss = result.query_loss.mean() if variant is not None else result.loss.detach()
        finite = torch.stack(
            [torch.isfinite(loss), torch.isfinite(result.loss.detach())]
            + [torch.isfinite(g).all() for g in grads]
        ).all()
        names = list(params) + ["inner_lr"] * len(rates) + ["per_step_batch_norm"] * len(extra)
        accuracy = None if result.query_accuracy is None else result.query_accuracy.mean()
        return MetaGradient(
            tensors, grads, names, loss, accuracy, result.support_loss.mean(), finite
        )

    def adapt_steps(self, params, inner_lr, support_x, support_y, *, steps, variant=None):
        return reference.adapt_steps(
            self.model,
            params,
            inner_lr,
            support_x,
            support_y,
            steps=steps,
            loss=self.loss,
            variant=variant,
        )

    def predict(self, adapted, x):
        return reference.predict(self.model, adapted, x)

    def hvp(self, params, x, y, v):
        return reference.hvp(self.model, params, x, y, v, loss=self.loss)


class FusedBackend(Backend):
    """The compiled layer program: one op runs the meta-step for all tasks (maml_ext/fused.py)."""

    name = "fused"

    def __init__(
        self, program: LayerProgram, loss: TaskLoss, device: torch.device, dtype: torch.dtype
    ):
        self.program, self.loss, self.device, self.dtype = program, loss, device, dtype
        self.loss_code = LOSS_CODES[loss.name]
        # On a GPU the loss kernel turns a class index out of range into a NaN loss and gradient,
        # which the step's one finite check catches, so the indices need not be read up front.
        # (On the CPU reading them costs nothing; the reference cannot defer: PyTorch's CUDA
        # cross-entropy asserts on the device.)
        self.defers_class_range = device.type != "cpu" and loss.is_classification
        self._fixed_rates: dict[tuple[int, float], torch.Tensor] = {}  # [K, P] per (K, rate)
        self._splits: dict[frozenset[str], FrozenBodySplit | None] = {}

    def meta_gradient(
        self,
        params,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        *,
        steps,
        first_order,
        variant: Variant | None = None,
    ):
        if variant is not None:
            return self.variant_step(
                params,
                inner_lr,
                support_x,
                support_y,
                query_x,
                query_y,
                steps=steps,
                first_order=first_order,
                variant=variant,
            )
        split = None if inner_lr.adapted is None else self.frozen_body_split(inner_lr.adapted)
        if split is not None:
            return self.frozen_body_step(
                split,
                params,
                inner_lr,
                support_x,
                support_y,
                query_x,
                query_y,
                steps=steps,
                first_order=first_order,
            )
        program = self.program
        names = program.slot_names
        tensors = [params[name] for name in names]
        if inner_lr.learn is None:
            # Nothing needs autograd with fixed rates: one op does the whole step (this path is
            # the per-call overhead of small models such as the sinusoid MLP).
            grads, loss, accuracy, support_loss, finite = fused.meta_gradient(
                program,
                tensors,
                self.fixed_rates(inner_lr, steps),
                support_x,
                support_y,
                query_x,
                query_y,
                loss_code=self.loss_code,
                first_order=first_order,
            )
            return MetaGradient(tensors, grads, names, loss, accuracy, support_loss, finite)
        meta_grad, rate_grads, query_loss, accuracy, support_loss = self.differentiable_step(
            params,
            inner_lr,
            support_x,
            support_y,
            query_x,
            query_y,
            steps=steps,
            first_order=first_order,
        )
        loss = query_loss.mean()
        rate_params = list(inner_lr.parameters())
        grads = [*program.unflatten(meta_grad).values(), *rate_grads]
        finite = torch.isfinite(
            torch.cat([loss.reshape(1), meta_grad, *(g.reshape(-1) for g in rate_grads)])
        ).all()
        return MetaGradient(
            tensors + rate_params,
            grads,
            names + ("inner_lr",) * len(rate_params),
            loss,
            accuracy.mean() if accuracy.numel() else None,
            support_loss.mean(),
            finite,
        )

    def differentiable_step(
        self, params, inner_lr, support_x, support_y, query_x, query_y, *, steps, first_order
    ):
        """The meta-step with learned rates as plain tensors: (meta-gradient [P] in θ's layout,
        the gradients of ``inner_lr.parameters()`` (empty with fixed rates), per-task query loss,
        per-task query accuracy or [0], per-task support loss). The op returns the gradient of the
        per-element rates [K, P]; autograd carries it back through ``InnerLearningRates.flat`` to
        the rates' parameters. Nothing here synchronises with the host, so a CUDA graph can
        capture it whole (GraphedFusedBackend)."""
        program = self.program
        rate_params = list(inner_lr.parameters())
        learned = bool(rate_params)
        with torch.no_grad():
            theta = program.flatten(params)
        with torch.set_grad_enabled(learned):
            rates = inner_lr.flat(program.slots, steps, theta)
        query_loss, accuracy, support_loss, meta_grad, rate_grad = fused.meta_step(
            program,
            theta,
            rates.detach(),
            support_x,
            support_y,
            query_x,
            query_y,
            loss_code=self.loss_code,
            first_order=first_order,
            inner_lr_grad=learned,
        )
        rate_grads = ()
        if learned:
            rate_grads = torch.autograd.grad(rates, rate_params, rate_grad, allow_unused=True)
            rate_grads = tuple(
                torch.zeros_like(p) if g is None else g for p, g in zip(rate_params, rate_grads)
            )
        return meta_grad, rate_grads, query_loss, accuracy, support_loss

    def frozen_body_split(self, adapted) -> FrozenBodySplit | None:
        """ANIL's body/head split of the program where the frozen parameters are exactly those of
        the first layers and the head starts with a Linear layer (cached per adapted set)."""
        if adapted is None:
            return None
        if adapted not in self._splits:
            self._splits[adapted] = frozen_body_split(self.program, adapted)
        return self._splits[adapted]

    def frozen_body_step(
        self,
        split: FrozenBodySplit,
        params,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        *,
        steps,
        first_order,
    ) -> MetaGradient:
        """ANIL by ``maml_ext::frozen_body_meta_step``: the body's features once per set, the
        inner loop and the sweep over the head alone (csrc/meta_step.h)."""
        program = self.program
        rate_params = list(inner_lr.parameters())
        with torch.no_grad():
            theta = program.flatten(params)
        with torch.set_grad_enabled(bool(rate_params)):
            rates = inner_lr.flat(program.slots, steps, theta)[:, split.body_params :]
        query_loss, accuracy, support_loss, meta_grad, rate_grad, _, loss = (
            torch.ops.maml_ext.frozen_body_meta_step(
                theta,
                rates.detach().contiguous(),
                support_x,
                support_y,
                query_x,
                query_y,
                split.body_ints,
                split.body_floats,
                split.head_ints,
                split.head_floats,
                self.loss_code,
                first_order,
                bool(rate_params),
            )
        )
        rate_grads = []
        if rate_params:
            rate_grads = torch.autograd.grad(rates, rate_params, rate_grad, allow_unused=True)
            rate_grads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(rate_params, rate_grads)
            ]
        grads = list(program.unflatten(meta_grad).values()) + rate_grads
        finite = torch.isfinite(
            torch.cat([loss.reshape(1), meta_grad, *(g.reshape(-1) for g in rate_grads)])
        ).all()
        return MetaGradient(
            [params[name] for name in program.slot_names] + rate_params,
            grads,
            program.slot_names + ("inner_lr",) * len(rate_params),
            loss,
            accuracy.mean() if accuracy.numel() else None,
            support_loss.mean(),
            finite,
        )

    def variant_step(
        self,
        params,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        *,
        steps,
        first_order,
        variant,
    ) -> MetaGradient:
        """The meta-step with MAML++'s multi-step loss and/or per-step batch norm, by
        ``maml_ext::meta_step_options``; the gradients of the rates and of the per-step batch-norm
        parameters are chained through the differentiable ``[K, P]`` tables by autograd."""
        program = self.program
        rate_params = list(inner_lr.parameters())
        batch_norm = variant.batch_norm
        bn_params = list(batch_norm.parameters()) if batch_norm is not None else []
        with torch.no_grad():
            theta = program.flatten(params)
        with torch.enable_grad():
            rates = inner_lr.flat(program.slots, steps, theta)
            shift = None
            if batch_norm is not None:
                shift = batch_norm.shift(params, program.slots, steps, theta)
        weights = None
        if variant.query_weights is not None:
            weights = torch.tensor(variant.query_weights, dtype=theta.dtype, device=theta.device)
        query_loss, accuracy, support_loss, meta_grad, rate_grad, shift_grad, objective = (
            torch.ops.maml_ext.meta_step_options(
                theta,
                rates.detach(),
                support_x,
                support_y,
                query_x,
                query_y,
                program.ints_list,
                program.floats_list,
                self.loss_code,
                first_order,
                bool(rate_params),
                weights,
                None if shift is None else shift.detach(),
            )
        )
        grads = program.unflatten(meta_grad)
        outputs, seeds = [], []
        if rate_params:
            outputs.append(rates)
            seeds.append(rate_grad)
        chained = rate_params + bn_params
        if batch_norm is not None:
            outputs.append(shift)
            seeds.append(shift_grad)
            chained = chained + [params[name] for name in batch_norm.names]
        chained_grads = []
        if outputs:
            chained_grads = torch.autograd.grad(outputs, chained, seeds, allow_unused=True)
            chained_grads = [
                torch.zeros_like(t) if g is None else g for t, g in zip(chained, chained_grads)
            ]
        extra_grads = chained_grads[: len(rate_params) + len(bn_params)]
        if batch_norm is not None:  # step 0's batch-norm parameters are the model's own
            for name, g in zip(batch_norm.names, chained_grads[len(extra_grads) :]):
                grads[name] = grads[name] + g
        tensors = [params[name] for name in program.slot_names] + rate_params + bn_params
        all_grads = [grads[name] for name in program.slot_names] + list(extra_grads)
        loss = query_loss.mean()
        finite = torch.isfinite(
            torch.cat([objective.reshape(1), loss.reshape(1)] + [g.reshape(-1) for g in all_grads])
        ).all()
        names = (
            program.slot_names
            + ("inner_lr",) * len(rate_params)
            + ("per_step_batch_norm",) * len(bn_params)
        )
        return MetaGradient(
            tensors,
            all_grads,
            names,
            loss,
            accuracy.mean() if accuracy.numel() else None,
            support_loss.mean(),
            finite,
        )

    def fixed_rates(self, inner_lr: InnerLearningRates, steps: int) -> torch.Tensor:
        """``inner_lr``'s rates [K, P] in θ's layout when they are fixed (not learned), built once
        per (K, rate)."""
        key = (steps, inner_lr.init)
        table = self._fixed_rates.get(key)
        if table is None:
            like = torch.empty(self.program.num_params, device=self.device, dtype=self.dtype)
            table = self._fixed_rates[key] = inner_lr.flat(self.program.slots, steps, like)
        return table

    def adapt_steps(self, params, inner_lr, support_x, support_y, *, steps, variant=None):
        program = self.program
        batch_norm = variant.batch_norm if variant is not None else None
        with torch.no_grad():
            theta = program.flatten(params)
            rates = inner_lr.flat(program.slots, steps[-1], theta)
            shift = (
                None
                if batch_norm is None
                else batch_norm.shift(params, program.slots, steps[-1], theta)
            )
        adapted, done = theta, 0
        for count in steps:
            with torch.no_grad():
                if shift is None:  # one op call runs every step up to this count
                    adapted = fused.adapt(
                        program,
                        adapted,
                        rates[done:count],
                        support_x,
                        support_y,
                        loss_code=self.loss_code,
                    )
                else:
                    # Per-step batch norm: one step at a time, moving to step k's parameters
                    # before it (after the last step the weights keep that step's, which predict
                    # uses).
                    for k in range(done, count):
                        if k > 0:
                            adapted = adapted + shift[k - 1]
                        adapted = fused.adapt(
                            program,
                            adapted,
                            rates[k : k + 1],
                            support_x,
                            support_y,
                            loss_code=self.loss_code,
                        )
            done = count
            yield count, program.unflatten(adapted)

    def predict(self, adapted, x):
        with torch.no_grad():
            return fused.forward(self.program, self.program.flatten(adapted, task_dims=1), x)

    def hvp(self, params, x, y, v):
        program = self.program
        _, _, products = fused.loss_hvp(
            program,
            program.flatten(params, task_dims=1),
            x,
            y,
            program.flatten(v, task_dims=1),
            loss_code=self.loss_code,
        )
        return program.unflatten(products)


_SPLITTABLE = ("linear", "conv2d", "batch_norm", "relu", "tanh", "max_pool2d", "flatten")


class FrozenBodySplit(NamedTuple):
    """A program cut in two for ANIL: the body's records (its parameters θ[0, body_params)) and
    the head's, whose parameter offsets count from body_params."""

    body_ints: list[int]
    body_floats: list[float]
    head_ints: list[int]
    head_floats: list[float]
    body_params: int


def frozen_body_split(program: LayerProgram, adapted: frozenset[str]) -> FrozenBodySplit | None:
    """The split where the parameters that take no inner steps are exactly the first layers' and
    the adapted ones start at a Linear layer (whose input, the body's features, is [T, N, F]);
    None where the model is not so (ANIL then runs MAML's sweep with zero rates on the body)."""
    records, position, float_position = [], 0, 0
    ints = program.ints
    while position < len(ints):
        record = RECORDS_BY_CODE[ints[position]]
        if record.name not in _SPLITTABLE:  # a kind whose parameter fields are not known here
            return None
        end = position + 1 + len(record.int_fields)
        fields = dict(zip(record.int_fields, ints[position + 1 : end]))
        records.append((record, position, end, float_position, fields))
        position, float_position = end, float_position + len(record.float_fields)
    slots = iter(program.slots)
    owners = []  # per record: the names of its parameters
    for record, *_, fields in records:
        present = [
            p
            for p in record.parameters
            if not (p == "bias" and fields.get("has_bias", 1) == 0)
            and not (record.name == "batch_norm" and not fields["affine"])
        ]
        owners.append([next(slots).name for _ in present])
    first = next((i for i, names in enumerate(owners) if set(names) & adapted), None)
    if first is None or first == 0 or records[first][0].name != "linear":
        return None
    body = [name for names in owners[:first] for name in names]
    head = [name for names in owners[first:] for name in names]
    if not body or set(body) & adapted or not set(head) <= adapted:
        return None
    base = program.slots[len(body)].offset
    head_ints: list[int] = []
    for record, *_, fields in records[first:]:
        head_ints.append(record.code)
        for name in record.int_fields:
            value = fields[name]
            # Offsets of present parameters count from the head's start (absent ones stay 0).
            if name.endswith("_offset") and value >= base:
                value -= base
            head_ints.append(value)
    split_float = records[first][3]
    return FrozenBodySplit(
        list(ints[: records[first][1]]),
        list(program.floats[:split_float]),
        head_ints,
        list(program.floats[split_float:]),
        base,
    )


def fused_obstacle(
    model: nn.Module, loss: TaskLoss, device: torch.device, dtype: torch.dtype
) -> tuple[LayerProgram | None, str | None]:
    """(program, None) when the fused backend can run, else (None, the reason it cannot).
    A model the fused backend cannot run raises UnsupportedModelError (naming the layer)."""
    if not compiled_ops_available():
        return None, f"maml_ext._C is not available ({_load_error})"
    if not loss.builtin:
        return None, "a custom loss callable (fused supports 'cross_entropy' and 'mse')"
    if device.type not in ("cpu", "cuda"):
        return None, f"device {device} (fused runs on cpu and cuda)"
    if device.type == "cuda" and not cuda_kernels_compiled():
        return None, "maml_ext._C was built without CUDA kernels"
    if dtype not in (torch.float32, torch.float64):
        return None, f"dtype {dtype} (fused runs float32 and float64)"
    return compile_program(model), None


def choose_backend(
    requested: str,
    model: nn.Module,
    loss: TaskLoss,
    device: torch.device,
    dtype: torch.dtype,
    *,
    warn: bool = True,
) -> Backend:
    """The backend for ``model`` on (device, dtype): 'fused' or 'reference' as asked (raising
    where 'fused' cannot run), or 'auto': fused where it can run, else reference with one warning
    saying why."""
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return ReferenceBackend(model, loss)
    try:
        program, reason = fused_obstacle(model, loss, device, dtype)
    except UnsupportedModelError as error:
        if requested == "fused":
            raise
        program, reason = None, str(error)
    if program is not None:
        return FusedBackend(program, loss, device, dtype)
    if requested == "fused":
        raise ValueError(f"backend='fused' cannot run here: {reason}")
    if warn:
        warnings.warn(
            f"maml_ext: backend='auto' uses the reference backend: {reason}", stacklevel=3
        )
    return ReferenceBackend(model, loss, reason)

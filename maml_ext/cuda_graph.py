"""CUDA-graph capture and replay of the fused meta-step: ``MetaOptimizer(..., cuda_graph=True)``.

On CUDA one fused meta-step is a few hundred small kernel launches; for the small few-shot shapes
the CPU time spent launching them can exceed the GPU time spent running them. A CUDA graph records
the launches once and replays them with one call. What is captured, per signature (the shapes,
dtypes and device of support_x, support_y, query_x, query_y, plus the program and the settings):

- the flattening of the model's parameters into θ and the building of the inner rates, read from
  the live parameter tensors (see ``_bind`` for why that is safe);
- ``torch.ops.maml_ext.meta_step``;
- with learned rates, the gradient of the rates' parameters (autograd through
  ``InnerLearningRates.flat``): learned rates are supported, they are parameters like θ;
- one ``torch.cat`` packing every output (meta-gradients, losses, accuracy) into one buffer.

A call copies the batch into the signature's static input buffers, replays, and clones the packed
buffer once (the replayed buffer is overwritten by the next replay). A new signature is captured
anew after warm-up calls on a side stream, as torch.cuda.graphs requires.

Memory: every captured signature keeps its static inputs and a private memory pool holding every
intermediate of the meta-step (θ_k and g_k for all K steps and tasks, λ, the activations of the
largest pass, library workspaces): about the peak memory of one eager fused meta-step, held for as
long as the graph is kept. At most ``max_graphs`` signatures are kept (least recently used is
dropped, and its pool released), so varying shapes cost captures and memory: the option pays for
fixed shapes, where launches dominate (small models, few tasks).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import torch

from . import fused
from .backend import BackendChoice
from .inner_lr import InnerLearningRates
from .program import LOSS_CODES, LayerProgram

MAX_GRAPHS = 4
WARMUP_CALLS = 3


def check_option(cuda_graph, *, backend: str, choice: BackendChoice,
                 device: torch.device) -> "GraphedMetaStep | None":
    """The MetaOptimizer's ``cuda_graph`` argument: None when False; raises ValueError, naming
    the argument, where a CUDA graph cannot run the meta-step."""
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph: expected True or False, got {cuda_graph!r}")
    if not cuda_graph:
        return None
    if backend == "reference":
        raise ValueError("cuda_graph: True captures the fused backend's meta-step; it cannot be "
                         "combined with backend='reference'")
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: True needs the model on a CUDA device; its parameters are "
                         f"on {device}")
    if choice.name != "fused":
        raise ValueError(f"cuda_graph: True needs the fused backend, but backend={backend!r} "
                         f"uses the reference backend here: {choice.reason}")
    return GraphedMetaStep()


class CudaGraphCapture:
    """Warms ``body`` up on a side stream, then captures one call of it in a CUDA graph."""

    device_type = "cuda"

    def __init__(self, warmup_calls: int = WARMUP_CALLS):
        self.warmup_calls = warmup_calls

    def __call__(self, body: Callable[[], torch.Tensor], device: torch.device):
        """(replay, output): ``replay()`` reruns the captured work, rewriting ``output``."""
        with torch.cuda.device(device):
            # Warm-up (library handles, workspaces, cuDNN plans, autograd state) must happen
            # outside the capture and off the default stream.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_calls):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: a host synchronisation on the capture stream still fails the
                # capture (from whatever thread: the autograd engine runs the rates' backward on
                # its own), but unrelated threads' CUDA calls (a DataLoader's pin-memory thread)
                # do not, as they would in the default "global" mode.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    output = body()
            except RuntimeError as error:
                raise RuntimeError(f"maml_ext: capturing the fused meta-step in a CUDA graph "
                                   f"failed (an op synchronised with the host or is not "
                                   f"capturable): {error}") from error
        return graph.replay, output


@dataclasses.dataclass
class _Graph:
    bindings: tuple                   # what the capture read in place: see GraphedMetaStep._bind
    inputs: tuple[torch.Tensor, ...]  # static support_x, support_y, query_x, query_y
    replay: Callable[[], None]
    output: torch.Tensor              # packed: grads of every tensor, loss, per-task values
    grad_slices: tuple[tuple[int, torch.Size], ...]  # (offset, shape) per tensor in `output`
    grads_numel: int                  # the gradients fill output[:grads_numel]
    tasks: int
    with_accuracy: bool


class GraphedMetaStep:
    """Captured fused meta-steps of one MetaOptimizer, one per input signature (LRU-bounded)."""

    def __init__(self, *, max_graphs: int = MAX_GRAPHS, capture=None):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected a positive integer, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.capture = CudaGraphCapture() if capture is None else capture
        self.captures = 0  # how many graphs were captured (recaptures included)
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    @staticmethod
    def signature(program: LayerProgram, inner_lr: InnerLearningRates, steps: int,
                  batch: tuple[torch.Tensor, ...], *, loss_code: int, first_order: bool) -> tuple:
        """What a captured graph is valid for: its static buffers' shapes and the work it does
        (every Python-side decision taken while capturing: program, rates, loss, order)."""
        return (program.ints, program.floats, steps, loss_code, bool(first_order), inner_lr.learn,
                inner_lr.init, tuple((tuple(t.shape), t.dtype, t.device) for t in batch))

    @staticmethod
    def _bind(tensors: list[torch.Tensor]) -> tuple:
        """The storage the captured flattening reads. The graph reads θ and learned rates straight
        from the live parameters: a replay replays the kernel with the same device addresses, and
        the outer optimiser updates parameters in place (``p.add_``, foreach and fused kernels),
        which keeps the addresses, so every replay sees the current values. What breaks that is
        anything that gives a parameter new storage: ``p.data = ...``, ``model.to(...)``,
        ``load_state_dict(..., assign=True)``. Then the graph would read freed memory, so the
        addresses, shapes and strides are compared before every replay and a change recaptures."""
        return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)

    def __call__(self, program: LayerProgram, params: dict[str, torch.Tensor],
                 inner_lr: InnerLearningRates, steps: int, support_x, support_y, query_x, query_y,
                 *, loss_code: int, first_order: bool):
        """Same results as ``fused.meta_loss`` (inputs already validated by the MetaOptimizer):
        (mean query loss, differentiable in ``params`` and the rates' parameters; per-task query
        loss; per-task query accuracy or None; per-task support loss)."""
        device = next(iter(params.values())).device
        if device.type != self.capture.device_type:
            raise ValueError(f"cuda_graph: True needs the model on a CUDA device; its parameters "
                             f"are on {device}")
        batch = (support_x, support_y, query_x, query_y)
        key = self.signature(program, inner_lr, steps, batch, loss_code=loss_code,
                             first_order=first_order)
        tensors = list(params.values()) + list(inner_lr.parameters())
        bindings = self._bind(tensors)
        graph = self._graphs.get(key)
        if graph is None or graph.bindings != bindings:
            self._graphs.pop(key, None)  # release a stale graph's pool before capturing anew
            graph = self._capture(program, params, inner_lr, steps, batch, bindings,
                                  loss_code=loss_code, first_order=first_order)
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            for static, value in zip(graph.inputs, batch):
                static.copy_(value)
        graph.replay()
        values = graph.output.clone()
        grads_end = graph.grads_numel
        loss = _ReplayedMetaLoss.apply(values[grads_end], values[:grads_end], graph.grad_slices,
                                       *tensors)
        tasks, start = graph.tasks, grads_end + 1
        query_loss = values[start : start + tasks]
        start += tasks
        query_accuracy = values[start : start + tasks] if graph.with_accuracy else None
        start += tasks if graph.with_accuracy else 0
        support_loss = values[start : start + tasks]
        return loss, query_loss, query_accuracy, support_loss

    def _capture(self, program, params, inner_lr, steps, batch, bindings, *, loss_code,
                 first_order) -> _Graph:
        inputs = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in batch)
        rate_params = list(inner_lr.parameters())
        learned = bool(rate_params)
        names = list(params)
        offsets = {slot.name: slot.offset for slot in program.slots}
        grad_slices = [(offsets[name], params[name].shape) for name in names]
        position = program.num_params
        for p in rate_params:
            grad_slices.append((position, p.shape))
            position += p.numel()
        with_accuracy = loss_code == LOSS_CODES["cross_entropy"]

        def body() -> torch.Tensor:
            with torch.no_grad():
                theta = program.flatten({name: params[name].detach() for name in names})
            with torch.set_grad_enabled(learned):
                rates = inner_lr.flat(program.slots, steps, theta)
            query_loss, accuracy, support_loss, meta_grad, rate_grad = fused.meta_step(
                program, theta, rates.detach(), *inputs, loss_code=loss_code,
                first_order=first_order, inner_lr_grad=learned)
            rate_param_grads = (torch.autograd.grad(rates, rate_params, rate_grad)
                                if learned else ())
            return torch.cat([meta_grad, *(g.reshape(-1) for g in rate_param_grads),
                              query_loss.mean().reshape(1), query_loss, accuracy, support_loss])

        replay, output = self.capture(body, inputs[0].device)
        self.captures += 1
        return _Graph(bindings, inputs, replay, output, tuple(grad_slices), position,
                      batch[0].shape[0], with_accuracy)


class _ReplayedMetaLoss(torch.autograd.Function):
    """The replayed mean query loss; backward hands out the meta-gradients the graph computed."""

    @staticmethod
    def forward(ctx, loss, grads, grad_slices, *tensors):
        ctx.save_for_backward(grads)
        ctx.grad_slices = grad_slices
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (grads,) = ctx.saved_tensors
        scaled = grad_loss * grads
        return (None, None, None,
                *(scaled[offset : offset + shape.numel()].view(shape) for offset, shape in ctx.grad_slices))

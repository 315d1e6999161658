"""CUDA-graph capture and replay of the fused meta-step: ``MetaOptimizer(..., cuda_graph=True)``
picks ``GraphedFusedBackend`` (the fused backend, maml_ext/backend.py, whose ``meta_gradient``
replays a captured graph) wherever it would pick the fused backend.

On CUDA one fused meta-step is a few hundred small kernel launches; for the small few-shot shapes
the CPU time spent launching them can exceed the GPU time spent running them. A CUDA graph records
the launches once and replays them with one call. What is captured, per signature (the shapes,
dtypes and device of support_x, support_y, query_x, query_y, plus the program and the settings):

- ``FusedBackend.differentiable_step``: the flattening of the model's parameters into θ and the
  building of the inner rates, read from the live parameter tensors (see ``_bind`` for why that
  is safe); ``torch.ops.maml_ext.meta_step``; with learned rates, the gradient of the rates'
  parameters (autograd through ``InnerLearningRates.flat``): learned rates are supported, they
  are parameters like θ;
- one ``torch.cat`` packing every output (meta-gradients, mean losses, accuracy) into one buffer.

A call copies the batch into the signature's static input buffers, replays, and clones the packed
buffer once (the replayed buffer is overwritten by the next replay); the gradients it returns are
views of that clone. A new signature is captured
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
from collections.abc import Callable

import torch

from .backend import Backend, FusedBackend, MetaGradient
from .inner_lr import InnerLearningRates
from .program import LayerProgram

MAX_GRAPHS = 4
WARMUP_CALLS = 3


def check_option(
    cuda_graph, *, backend: str, chosen: Backend, device: torch.device
) -> MetaStepGraphs | None:
    """The MetaOptimizer's ``cuda_graph`` argument, given the backend it asked for and the one
    chosen for the model's device: None when False; the graphs its graphed backends share
    (``MetaStepGraphs()`` for True, or the one given, e.g. with another ``max_graphs``); raises
    ValueError, naming the argument, where a CUDA graph cannot run the meta-step."""
    if not isinstance(cuda_graph, (bool, MetaStepGraphs)):
        raise ValueError(
            f"cuda_graph: expected True or False (or a MetaStepGraphs), got {cuda_graph!r}"
        )
    if cuda_graph is False:
        return None
    graphs = MetaStepGraphs() if cuda_graph is True else cuda_graph
    if backend == "reference":
        raise ValueError(
            "cuda_graph: True captures the fused backend's meta-step; it cannot be "
            "combined with backend='reference'"
        )
    if device.type != graphs.capture.device_type:
        raise ValueError(
            f"cuda_graph: True needs the model on a "
            f"{graphs.capture.device_type.upper()} device; its parameters are on "
            f"{device}"
        )
    if not isinstance(chosen, FusedBackend):
        raise ValueError(
            f"cuda_graph: True needs the fused backend, but backend={backend!r} "
            f"uses the reference backend here: {chosen.reason}"
        )
    return graphs


def graphed(backend: Backend, graphs: MetaStepGraphs | None) -> Backend:
    """``backend`` with its meta-step replayed from ``graphs`` where it is the fused backend;
    unchanged without graphs, or where the model's device and dtype fall back to reference."""
    if graphs is None or not isinstance(backend, FusedBackend):
        return backend
    return GraphedFusedBackend(backend, graphs)


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
                raise RuntimeError(
                    f"maml_ext: capturing the fused meta-step in a CUDA graph "
                    f"failed (an op synchronised with the host or is not "
                    f"capturable): {error}"
                ) from error
        return graph.replay, output


@dataclasses.dataclass
class _Graph:
    bindings: tuple  # what the capture read in place: see MetaStepGraphs.bind
    inputs: tuple[torch.Tensor, ...]  # static support_x, support_y, query_x, query_y
    replay: Callable[[], None]
    output: torch.Tensor  # packed: grads of every tensor, mean losses and accuracy
    grad_slices: tuple[tuple[int, int, torch.Size], ...]  # (offset, numel, shape) per tensor
    grads_numel: int  # the gradients fill output[:grads_numel]
    with_accuracy: bool


class MetaStepGraphs:
    """The captured meta-steps of one MetaOptimizer, one per input signature (LRU-bounded);
    shared by its graphed backends (one per device and dtype)."""

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
    def signature(
        program: LayerProgram,
        inner_lr: InnerLearningRates,
        steps: int,
        batch: tuple[torch.Tensor, ...],
        *,
        loss_code: int,
        first_order: bool,
    ) -> tuple:
        """What a captured graph is valid for: its static buffers' shapes and the work it does
        (every Python-side decision taken while capturing: program, rates, loss, order)."""
        return (
            program.ints,
            program.floats,
            steps,
            loss_code,
            bool(first_order),
            inner_lr.learn,
            inner_lr.init,
            tuple((tuple(t.shape), t.dtype, t.device) for t in batch),
        )

    @staticmethod
    def bind(tensors: list[torch.Tensor]) -> tuple:
        """The storage the captured flattening reads. The graph reads θ and learned rates straight
        from the live parameters: a replay replays the kernel with the same device addresses, and
        the outer optimiser updates parameters in place (``p.add_``, foreach and fused kernels),
        which keeps the addresses, so every replay sees the current values. What breaks that is
        anything that gives a parameter new storage: ``p.data = ...``, ``model.to(...)``,
        ``load_state_dict(..., assign=True)``. Then the graph would read freed memory, so the
        addresses, shapes and strides are compared before every replay and a change recaptures."""
        return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)

    def find(self, key: tuple, bindings: tuple) -> _Graph | None:
        """The graph captured for ``key`` if it still reads the storage ``bindings`` names."""
        graph = self._graphs.get(key)
        if graph is None or graph.bindings != bindings:
            return None
        self._graphs.move_to_end(key)
        return graph

    def keep(self, key: tuple, capture: Callable[[], _Graph]) -> _Graph:
        """Captures a graph for ``key`` (replacing a stale one), dropping the least recently used
        beyond ``max_graphs``."""
        self._graphs.pop(key, None)  # release a stale graph's pool before capturing anew
        graph = self._graphs[key] = capture()
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


class GraphedFusedBackend(FusedBackend):
    """The fused backend whose ``meta_gradient`` replays a CUDA graph of
    ``FusedBackend.differentiable_step`` (fixed or learned rates alike); ``adapt``, ``predict``
    and ``hvp`` run eagerly."""

    def __init__(self, backend: FusedBackend, graphs: MetaStepGraphs):
        super().__init__(backend.program, backend.loss, backend.device, backend.dtype)
        self.graphs = graphs

    def meta_gradient(
        self, params, inner_lr, support_x, support_y, query_x, query_y, *, steps, first_order
    ):
        device_type = self.graphs.capture.device_type
        if self.device.type != device_type:  # the model moved after the MetaOptimizer was made
            raise ValueError(
                f"cuda_graph: True needs the model on a {device_type.upper()} "
                f"device; its parameters are on {self.device}"
            )
        batch = (support_x, support_y, query_x, query_y)
        key = MetaStepGraphs.signature(
            self.program, inner_lr, steps, batch, loss_code=self.loss_code, first_order=first_order
        )
        rate_params = list(inner_lr.parameters())
        tensors = [params[name] for name in self.program.slot_names] + rate_params
        bindings = MetaStepGraphs.bind(tensors)
        graph = self.graphs.find(key, bindings)
        if graph is None:
            graph = self.graphs.keep(
                key,
                lambda: self._capture(
                    params, inner_lr, batch, bindings, steps=steps, first_order=first_order
                ),
            )
        else:
            for static, value in zip(graph.inputs, batch):
                static.copy_(value)
        graph.replay()
        values = graph.output.clone()
        grads = [
            values[offset : offset + numel].view(shape)
            for offset, numel, shape in graph.grad_slices
        ]
        end = graph.grads_numel
        finite = torch.isfinite(values[: end + 1]).all()
        names = self.program.slot_names + ("inner_lr",) * len(rate_params)
        return MetaGradient(
            tensors,
            grads,
            names,
            values[end],
            values[end + 1] if graph.with_accuracy else None,
            values[-1],
            finite,
        )

    def _capture(self, params, inner_lr, batch, bindings, *, steps, first_order) -> _Graph:
        inputs = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in batch)
        grad_slices = [(slot.offset, slot.numel, slot.shape) for slot in self.program.slots]
        position = self.program.num_params
        for p in inner_lr.parameters():
            grad_slices.append((position, p.numel(), p.shape))
            position += p.numel()
        with_accuracy = self.loss.is_classification

        def body() -> torch.Tensor:
            meta_grad, rate_grads, query_loss, accuracy, support_loss = self.differentiable_step(
                params, inner_lr, *inputs, steps=steps, first_order=first_order
            )
            means = [
                query_loss.mean(),
                *((accuracy.mean(),) if with_accuracy else ()),
                support_loss.mean(),
            ]
            return torch.cat(
                [meta_grad, *(g.reshape(-1) for g in rate_grads), *(m.reshape(1) for m in means)]
            )

        replay, output = self.graphs.capture(body, inputs[0].device)
        return _Graph(bindings, inputs, replay, output, tuple(grad_slices), position, with_accuracy)

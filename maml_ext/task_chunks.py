"""Memory budgets: ``MetaOptimizer(..., max_tasks_per_call=None | int | "auto", memory_budget=)``.

The meta-batch is processed in chunks of at most ``max_tasks_per_call`` tasks; each chunk's mean
meta-gradient and means are weighted by its task count and summed (the packing of
maml_ext/distributed.py, which also combines ranks), so the result is the unchunked one up to
floating-point round-off, and peak memory is that of one chunk.

``"auto"`` picks the chunk from a memory budget: ``memory_budget`` bytes when given (any device;
required on the CPU, where free memory says little about what a process may use), else on CUDA
:data:`CUDA_BUDGET_FRACTION` of the device's free memory plus what PyTorch's caching allocator has
reserved but not allocated. The chunk is ``max(1, budget // estimate_task_bytes(...))`` tasks
(at most the batch). The per-task estimate is a model of what one task keeps alive during a
meta-step, from shapes and one probe forward pass (no meta-step is run to measure it):

    bytes/task = itemsize × [ (2K + 2)·P + c·(K·N_support + N_query)·A ]

with K inner steps, P trainable parameters (θ_k and its gradient g_k for every step, the
meta-gradient and the adapted weights), A the activation elements of one sample (the sum of the
output sizes of every leaf module in a forward pass of one sample), and c = 2 for second order
(the activations and their gradients are both kept for the backward through the inner steps),
1 for first order. It deliberately over-counts the fused backend (which keeps activations of one
pass at a time; its memory grows with K × P, not K × activations) and is of the reference
backend's order, so a chunk that fits the estimate fits either backend.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_options", "estimate_task_bytes", "activation_elements", "CUDA_BUDGET_FRACTION"]

CUDA_BUDGET_FRACTION = 0.8  # of free device memory: room for the allocator's fragmentation


def check_options(max_tasks_per_call, memory_budget, device: torch.device):
    """Validates the two MetaOptimizer arguments (naming them); returns them."""
    if max_tasks_per_call is not None and max_tasks_per_call != "auto":
        if (
            isinstance(max_tasks_per_call, bool)
            or not isinstance(max_tasks_per_call, int)
            or max_tasks_per_call < 1
        ):
            raise ValueError(
                f"max_tasks_per_call: expected None, an integer >= 1 or 'auto', got "
                f"{max_tasks_per_call!r}"
            )
    if memory_budget is not None:
        if (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, int)
            or (memory_budget < 1)
        ):
            raise ValueError(
                f"memory_budget: expected None or a positive number of bytes, got {memory_budget!r}"
            )
        if max_tasks_per_call != "auto":
            raise ValueError(
                "memory_budget: only used with max_tasks_per_call='auto', got "
                f"max_tasks_per_call={max_tasks_per_call!r}"
            )
    if max_tasks_per_call == "auto" and memory_budget is None and device.type != "cuda":
        raise ValueError(
            f"max_tasks_per_call: 'auto' on {device} needs memory_budget (bytes); only on "
            "CUDA is the budget read from free device memory"
        )
    return max_tasks_per_call, memory_budget


def activation_elements(model: nn.Module, features: tuple[int, ...], like: torch.Tensor) -> int:
    """A: the elements every leaf module outputs for one sample of per-sample shape ``features``
    (one probe forward pass, no graph)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *features), dtype=like.dtype, device=like.device))
    finally:
        for handle in handles:
            handle.remove()
    return total


def estimate_task_bytes(
    *,
    parameters: int,
    activations: int,
    inner_steps: int,
    support_samples: int,
    query_samples: int,
    first_order: bool,
    itemsize: int,
) -> int:
    """The module docstring's bytes per task."""
    c = 1 if first_order else 2
    params = (2 * inner_steps + 2) * parameters
    acts = c * (inner_steps * support_samples + query_samples) * activations
    return itemsize * (params + acts)


def budget_bytes(memory_budget: int | None, device: torch.device) -> int:
    """The bytes "auto" may plan for: ``memory_budget``, else (CUDA) the free memory's share."""
    if memory_budget is not None:
        return memory_budget
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_BUDGET_FRACTION * (free + cached))

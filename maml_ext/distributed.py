"""Meta-training across processes on torch.distributed: one all-reduce per meta-step.

``MetaOptimizer(..., distributed=True | process_group)`` (maml_ext/optimizer.py) uses this module.
Each rank computes the meta-gradient of its own shard of tasks ``[T_r, ...]`` (shards may differ in
size); :class:`MetaGradientReducer` packs, per rank, one flat buffer

    [ T_r·g_1 | T_r·g_2 | ... (every parameter's and learned rate's gradient, flattened)
      | T_r | T_r·query_loss | T_r·query_accuracy (classification only) | T_r·support_loss
      | one non-finite flag per rank (1 at this rank's slot when its shard was non-finite) ]

and all-reduces it (sum) ONCE; dividing by Σ T_r gives every rank the gradient of the mean query
loss over all Σ T_r tasks and the global means, exactly what one process computes on the
concatenated batch (up to floating-point round-off of the sums). The same packing combines the
chunks of one rank's meta-batch (``max_tasks_per_call``) before the all-reduce, so chunking and
distribution compose. What crosses the network per step is therefore one buffer of
(parameters + learned rates + 4 + world size) elements, independent of the number of tasks.

Because the flags are reduced with the gradients, every rank learns in the same collective whether
any shard was non-finite, and which: all ranks raise the same FloatingPointError naming those ranks
and none applies the step, so the parameters stay identical.

Failures outside the meta-step (a rank raising in its data pipeline, a killed process) leave the
other ranks waiting in a collective. :func:`report_failure` (called by the CLI when a rank raises,
and usable by any training loop) writes the error into the process group's store; a rank whose
collective fails (gloo notices a closed peer at once; otherwise the group's timeout, from
``init_process_group(timeout=...)``, bounds the wait) reads the store and raises
:class:`RankFailedError` naming the rank that failed and its message.

Consistency: parameters and learned rates are broadcast from rank 0 when the MetaOptimizer is
built; with ``consistency_check_every=N`` a checksum (CRC-32 of every parameter's bytes) is
all-gathered every N steps and a :class:`RankDivergedError` names the ranks whose parameters
differ from rank 0's.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .backend import MetaGradient

__all__ = [
    "RankFailedError",
    "RankDivergedError",
    "MetaGradientReducer",
    "resolve_group",
    "report_failure",
    "reported_failures",
    "pack_meta_gradient",
    "unpack_meta_gradient",
]

_FAILURE_KEY = "maml_ext/failed/{rank}"


class RankFailedError(RuntimeError):
    """Another rank failed (raised, or died) while this one waited for it in a collective."""


class RankDivergedError(RuntimeError):
    """The parameters of some ranks differ from rank 0's."""


def resolve_group(distributed) -> dist.ProcessGroup | None:
    """The process group for ``MetaOptimizer(distributed=...)``: None for False, the default group
    for True (which must be initialised), or the ProcessGroup given."""
    if distributed is False or distributed is None:
        return None
    if not dist.is_available():
        raise ValueError("distributed: torch.distributed is not available in this PyTorch build")
    if distributed is True:
        if not dist.is_initialized():
            raise ValueError(
                "distributed: True needs torch.distributed.init_process_group() to have been "
                "called first (e.g. under torchrun)"
            )
        return dist.group.WORLD
    if isinstance(distributed, dist.ProcessGroup):
        return distributed
    raise ValueError(
        f"distributed: expected False, True or a torch.distributed.ProcessGroup, got "
        f"{type(distributed).__name__}"
    )


# ---- packing: used for chunks within a rank and for the all-reduce across ranks ----------------


def pack_meta_gradient(
    step: MetaGradient, tasks: int, *, rank: int = 0, world_size: int = 1, out=None
) -> torch.Tensor:
    """``step``'s task-weighted sums in the flat layout of the module docstring (added into
    ``out`` when given, so chunks accumulate without keeping every chunk's gradients)."""
    parts = [g.reshape(-1) * tasks for g in step.grads]
    scalars = [torch.ones_like(step.query_loss) * tasks, step.query_loss * tasks]
    if step.query_accuracy is not None:
        scalars.append(step.query_accuracy.to(step.query_loss.dtype) * tasks)
    scalars.append(step.support_loss * tasks)
    flags = torch.zeros(world_size, dtype=step.query_loss.dtype, device=step.query_loss.device)
    flags[rank] = (~step.finite).to(flags.dtype)
    packed = torch.cat([*parts, torch.stack(scalars).reshape(-1), flags])
    if out is None:
        return packed
    # Flags are "any chunk was non-finite": a maximum, not a sum (a sum would still be > 0, but
    # this keeps them 0/1 so the all-reduce's counts per rank are readable).
    body = len(packed) - world_size
    out[:body] += packed[:body]
    torch.maximum(out[body:], packed[body:], out=out[body:])
    return out


def unpack_meta_gradient(
    buffer: torch.Tensor, template: MetaGradient, world_size: int = 1
) -> tuple[MetaGradient, torch.Tensor, list[int] | None]:
    """(the mean meta-gradient, the total task count (0-dim), and the flags per rank) from a
    packed (and possibly all-reduced) buffer. ``finite`` is true when no rank flagged its shard
    and every value is finite."""
    offset = 0
    flat = buffer[: len(buffer) - world_size]
    total = flat[sum(g.numel() for g in template.grads)]
    grads = []
    for g in template.grads:
        grads.append((flat[offset : offset + g.numel()] / total).view(g.shape))
        offset += g.numel()
    scalars = flat[offset + 1 :] / total
    query_loss = scalars[0]
    accuracy = scalars[1] if template.query_accuracy is not None else None
    support_loss = scalars[-1]
    flags = buffer[len(buffer) - world_size :]
    finite = torch.isfinite(flat).all() & (flags == 0).all()
    step = MetaGradient(
        template.tensors, grads, template.names, query_loss, accuracy, support_loss, finite
    )
    return step, total, flags


# ---- the reducer --------------------------------------------------------------------------------


class MetaGradientReducer:
    """Combines a rank's meta-gradient with every other rank's in one all-reduce (see the module
    docstring); also the construction-time broadcast and the optional consistency check."""

    def __init__(self, group: dist.ProcessGroup, *, consistency_check_every: int | None = None):
        if consistency_check_every is not None and (
            isinstance(consistency_check_every, bool)
            or not isinstance(consistency_check_every, int)
            or consistency_check_every < 1
        ):
            raise ValueError(
                f"consistency_check_every: expected None or an integer >= 1, got "
                f"{consistency_check_every!r}"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.consistency_check_every = consistency_check_every
        self.steps = 0  # all-reduced meta-steps, for the consistency check's period
        self.last_communication_s = 0.0  # wall time of the last all-reduce (with its wait)
        self.last_flags: torch.Tensor | None = None  # the last step's non-finite flag per rank

    def _global_rank(self, group_rank: int) -> int:
        if self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copies rank 0's values of ``tensors`` into every rank's (one broadcast per device and
        dtype), so that every rank starts from the same parameters and rates."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        for members in groups.values():
            with torch.no_grad():
                flat = torch.cat([t.detach().reshape(-1) for t in members])
                self._collective(dist.broadcast, flat, src=self._global_rank(0))
                offset = 0
                for t in members:
                    t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()

    def all_reduce(self, packed: torch.Tensor) -> torch.Tensor:
        """Sums ``packed`` (from :func:`pack_meta_gradient` with this rank's slot) over ranks."""
        start = time.perf_counter()
        self._collective(dist.all_reduce, packed)
        self.last_communication_s = time.perf_counter() - start
        return packed

    def reduce(self, step: MetaGradient, tasks: int) -> MetaGradient:
        """The global mean meta-gradient from this rank's ``step`` over ``tasks`` tasks."""
        packed = pack_meta_gradient(step, tasks, rank=self.rank, world_size=self.world_size)
        return self.finish(packed, step)

    def finish(self, packed: torch.Tensor, template: MetaGradient) -> MetaGradient:
        """All-reduces an already packed buffer and unpacks the global means."""
        self.all_reduce(packed)
        step, _, flags = unpack_meta_gradient(packed, template, self.world_size)
        self.steps += 1
        self.last_flags = flags
        return step

    def non_finite_ranks(self) -> list[int]:
        """The ranks whose shard was non-finite in the last reduced step (reads the flags)."""
        if self.last_flags is None:
            return []
        return [r for r, f in enumerate(self.last_flags.tolist()) if f != 0]

    def check_consistency(self, tensors: Sequence[torch.Tensor], *, force: bool = False) -> None:
        """Every ``consistency_check_every`` reduced steps (or when ``force``): all-gathers a
        CRC-32 of every tensor's bytes and raises RankDivergedError on every rank, naming the
        ranks whose parameters differ from rank 0's."""
        every = self.consistency_check_every
        if not force and (every is None or self.steps % every != 0):
            return
        crc = 0
        for t in tensors:
            crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
        device = torch.device("cpu")  # NCCL moves CUDA tensors only
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        mine = torch.tensor([float(crc)], dtype=torch.float64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective(dist.all_gather, gathered, mine)
        values = [float(g) for g in gathered]
        diverged = [r for r, v in enumerate(values) if v != values[0]]
        if diverged:
            raise RankDivergedError(
                f"maml_ext: the parameters of rank(s) {diverged} differ from rank 0's after "
                f"{self.steps} meta-steps (CRC-32 per rank: "
                f"{[format(int(v), '08x') for v in values]}); the ranks no longer train one model"
            )

    def _collective(self, function, *args, **kwargs):
        try:
            return function(*args, group=self.group, **kwargs)
        except RuntimeError as error:
            raise collective_failure(error, self.world_size) from error


# ---- failures outside the meta-step ------------------------------------------------------------


def _store():
    # The default group's store (TCPStore under torchrun and with tcp:// / env:// rendezvous):
    # private in torch.distributed, so every use tolerates its absence.
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: failures are reported without the rank's message
        return None


def report_failure(error: BaseException | str) -> None:
    """Records in the process group's store that this rank failed, with ``error``'s message, so
    that the ranks left waiting in a collective can name it. Call it before the failing process
    exits; it never raises."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = _store()
    if store is None:
        return
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    try:
        store.set(_FAILURE_KEY.format(rank=dist.get_rank()), message[:2000])
    except Exception:  # noqa: BLE001 - best effort: the store may be gone with its host
        pass


def reported_failures(world_size: int | None = None) -> dict[int, str]:
    """{global rank: message} of the ranks that called :func:`report_failure`."""
    store = _store()
    if store is None:
        return {}
    world_size = dist.get_world_size() if world_size is None else world_size
    found = {}
    for rank in range(world_size):
        key = _FAILURE_KEY.format(rank=rank)
        try:
            if store.check([key]):
                found[rank] = store.get(key).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - an unreachable store: nothing more to say
            break
    return found


def collective_failure(error: BaseException, world_size: int) -> RankFailedError:
    """The error to raise when a collective failed: names the ranks that reported a failure, or
    says that none did (a rank killed, or a network fault)."""
    # The failed rank writes its report before its process exits and closes its connections;
    # this rank may see the closed connection first, so look again briefly before giving up.
    deadline = time.monotonic() + 2.0
    failures = reported_failures(dist.get_world_size())
    while not failures and time.monotonic() < deadline:
        time.sleep(0.1)
        failures = reported_failures(dist.get_world_size())
    if failures:
        named = "; ".join(f"rank {r} failed: {m}" for r, m in sorted(failures.items()))
        return RankFailedError(f"maml_ext: {named} (this is rank {dist.get_rank()})")
    return RankFailedError(
        f"maml_ext: a collective failed on rank {dist.get_rank()} and no rank reported an "
        f"error (a rank was killed or the network failed): {error}"
    )


def timeout_from_seconds(seconds: float) -> timedelta:
    """``init_process_group(timeout=...)``'s value from a number of seconds (``--dist-timeout``)."""
    return timedelta(seconds=float(seconds))

"""What every experiment does the same way: CPU threads, the device, RNG states, checks of
counts, and the per-task weights of zero adaptation steps."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
from collections.abc import Iterator

import torch

from maml_ext.experiments.presets import ConfigurationError

__all__ = [
    "intra_op_threads",
    "default_device",
    "rng_state",
    "set_rng_state",
    "check_count",
    "weights_per_task",
    "Ranks",
    "ONE_PROCESS",
    "current_ranks",
    "restarted_by_torchrun",
    "init_distributed_from_environment",
]


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Sets torch's intra-op thread count for the block (None: unchanged), then restores it.

    The experiments' networks are too small to gain from intra-op parallelism; on a busy 2-core
    machine two threads made the reference backend several times slower (bench/NOTES.md).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rng_state() -> dict:
    """torch's global CPU generator state, and the CUDA ones once CUDA is in use."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores :func:`rng_state`'s states (CUDA ones only onto as many devices as saved them)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def check_count(name: str, value, allow_zero: bool = False) -> int:
    """``value`` if it is an integer >= 1 (>= 0 with ``allow_zero``), else ConfigurationError."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def weights_per_task(model: torch.nn.Module, tasks: int) -> dict[str, torch.Tensor]:
    """The model's trainable parameters, detached and repeated ``[tasks, *shape]``: every task's
    weights after zero adaptation steps, in the layout ``MetaOptimizer.adapt`` returns."""
    return {
        name: p.detach().unsqueeze(0).expand(tasks, *p.shape).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


# ---- runs across processes (torchrun) ----------------------------------------------------------

DEFAULT_DIST_TIMEOUT_S = 300.0  # --dist-timeout: how long a rank waits for a silent peer


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process stands in a run across processes: rank ``rank`` of ``world_size``
    (0 of 1 without torch.distributed). Rank 0 alone writes files."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, total: int) -> tuple[int, int]:
        """(first, count) of this rank's contiguous share of ``total`` items: the first
        ``total % world_size`` ranks take one more."""
        base, extra = divmod(total, self.world_size)
        count = base + (self.rank < extra)
        return self.rank * base + min(self.rank, extra), count

    def stream_seed(self, seed: int, iteration: int) -> int:
        """The seed of this rank's tasks at ``iteration``: a hash of (seed, rank, iteration), so
        every rank draws its own tasks, a restarted or resumed run (any world size) draws them
        again without saved generator states."""
        digest = hashlib.blake2b(f"{seed}/{self.rank}/{iteration}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") & (2**63 - 1)

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


ONE_PROCESS = Ranks()


def current_ranks() -> Ranks:
    """This process's :class:`Ranks` from torch.distributed's default group (one rank when it is
    not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return ONE_PROCESS


def restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this worker after a failure (``--max-restarts``): the run then
    continues from its checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def init_distributed_from_environment(device: str | None, timeout_s: float) -> Ranks:
    """Joins the process group torchrun describes in the environment (WORLD_SIZE > 1): gloo for
    CPU runs, NCCL for CUDA (each process on cuda:LOCAL_RANK), with ``timeout_s`` bounding every
    wait for a peer. One process (no WORLD_SIZE, or 1): nothing to join."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_ranks()
    if not dist.is_available():
        raise ConfigurationError("WORLD_SIZE > 1 but torch.distributed is not available")
    if timeout_s <= 0:
        raise ConfigurationError(f"--dist-timeout: expected seconds > 0, got {timeout_s}")
    device = device or default_device()
    backend = "gloo"
    if torch.device(device).type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's store outlives restarts; the keys of one attempt's rendezvous (each rank's
    # address) must not be read by the next attempt's ranks, so each attempt gets its own prefix.
    store = dist.PrefixStore(
        f"maml_ext/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
        dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            # torchrun's agent hosts the store (and says so); under other launchers rank 0 does.
            is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            and os.environ["RANK"] == "0",
            timeout=timeout,
        ),
    )
    dist.init_process_group(
        backend,
        store=store,
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=timeout,
    )
    return current_ranks()

"""The sinusoid regression task distribution of the MAML paper (Finn et al. 2017, section 5.1).

A task is the function ``y = A * sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]`` and phase
``~ U[0, pi]``; its support and query points are ``x ~ U[-5, 5]``. The sign convention of the phase
follows the paper's released code (``amp * np.sin(inputs - phase)`` in cbfinn/maml).
"""

import math
from typing import NamedTuple

import torch

from ._random import task_generator

__all__ = ["Sinusoid", "SinusoidBatch", "sinusoid"]


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``amplitude * sin(x - phase)`` per task.

    ``x`` is ``[T, N, 1]`` (or ``[T, N]``); ``amplitude`` and ``phase`` are ``[T]``.
    Returns a tensor shaped like ``x``.
    """
    extra_dims = (1,) * (x.dim() - 1)
    amplitude = amplitude.to(x).reshape(-1, *extra_dims)
    phase = phase.to(x).reshape(-1, *extra_dims)
    return amplitude * torch.sin(x - phase)


class SinusoidBatch(NamedTuple):
    """A meta-batch of ``T`` sinusoid tasks: points ``[T, K|Q, 1]`` and task parameters ``[T]``."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor

    def to(self, *args, **kwargs) -> "SinusoidBatch":
        """The same batch with every tensor passed through ``Tensor.to(*args, **kwargs)``."""
        return SinusoidBatch(*(tensor.to(*args, **kwargs) for tensor in self))


def _as_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low <= high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return low, high


class Sinusoid:
    """Samples meta-batches of sinusoid regression tasks from its own seeded generator.

    Args:
        support: points per task given for adaptation (the paper's K, 10 by default).
        query: points per task on which the adapted model is scored (0 is allowed, e.g. when the
            query points are a grid built with :meth:`grid`).
        amplitude, phase, x_range: the (low, high) bounds of the uniform distributions.
        seed: an int for a reproducible stream, a ``torch.Generator`` (CPU) to draw from, or
            None for a nondeterministic seed.

    Samples are drawn in float64 on the CPU and then converted, so the same seed gives the same
    tasks whatever ``dtype`` and ``device`` are asked for.
    """

    def __init__(
        self,
        support: int = 10,
        query: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: None | int | torch.Generator = None,
    ):
        if support < 1:
            raise ValueError(f"support must be at least 1, got {support}")
        if query < 0:
            raise ValueError(f"query must be non-negative, got {query}")
        self.support = int(support)
        self.query = int(query)
        self.amplitude_range = _as_range("amplitude", amplitude)
        self.phase_range = _as_range("phase", phase)
        self.x_range = _as_range("x_range", x_range)
        self.generator = task_generator(seed)

    def _uniform(self, shape, bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        unit = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        return low + (high - low) * unit

    def sample(
        self,
        meta_batch: int,
        device: None | str | torch.device = None,
        dtype: torch.dtype = torch.float32,
    ) -> SinusoidBatch:
        """Draws ``meta_batch`` tasks with their support and query points."""
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be at least 1, got {meta_batch}")
        amplitude = self._uniform((meta_batch,), self.amplitude_range)
        phase = self._uniform((meta_batch,), self.phase_range)
        x = self._uniform((meta_batch, self.support + self.query, 1), self.x_range)
        y = sinusoid(x, amplitude, phase)
        batch = SinusoidBatch(
            support_x=x[:, : self.support],
            support_y=y[:, : self.support],
            query_x=x[:, self.support :],
            query_y=y[:, self.support :],
            amplitude=amplitude,
            phase=phase,
        )
        return batch.to(device=device, dtype=dtype)

    def grid(
        self,
        amplitude: torch.Tensor,
        phase: torch.Tensor,
        points: int = 100,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The true functions of the given tasks on ``points`` evenly spaced x over ``x_range``.

        Returns ``(x, y)``, both ``[T, points, 1]``, on the device of ``amplitude``: for plots, and
        for scoring an adapted model over the whole input range.
        """
        dtype = dtype or (amplitude.dtype if amplitude.is_floating_point() else torch.float32)
        line = torch.linspace(*self.x_range, points, dtype=torch.float64)
        x = line.reshape(1, points, 1).repeat(amplitude.shape[0], 1, 1)
        y = sinusoid(x, amplitude.detach().cpu().double(), phase.detach().cpu().double())
        return x.to(amplitude.device, dtype), y.to(amplitude.device, dtype)

    def state_dict(self) -> dict:
        """The generator state, so that a resumed run draws the same tasks as an uninterrupted
        one."""
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state_dict["generator_state"])

    def __repr__(self) -> str:
        return (
            f"Sinusoid(support={self.support}, query={self.query}, "
            f"amplitude={self.amplitude_range}, phase={self.phase_range}, x_range={self.x_range})"
        )

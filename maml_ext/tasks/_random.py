"""The random stream every task source draws from."""

from __future__ import annotations

import torch


def task_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator for ``seed``: a given CPU generator itself (shared with the caller), a
    fresh one seeded with ``seed``, or with ``seed=None`` one seeded from the OS."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError("seed: the generator must be a CPU torch.Generator")
        return seed
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator

"""Models and random task batches shared by the tests."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def sinusoid_mlp(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1)).to(dtype)


def conv_block(in_channels: int, out_channels: int, *, pool: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=1 if pool else 2),
              nn.BatchNorm2d(out_channels, track_running_stats=False), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


def conv_net(ways: int = 5, channels: int = 8, in_channels: int = 1, blocks: int = 2,
             image: int = 8, pool: bool = True, dtype=torch.float64) -> nn.Module:
    """The paper's conv net shape (conv3x3, BN, ReLU, max-pool or stride 2), scaled down."""
    layers: list[nn.Module] = []
    size = image
    for block in range(blocks):
        layers += conv_block(in_channels if block == 0 else channels, channels, pool=pool)
        size = size // 2 if pool else (size + 1) // 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, ways)]
    return nn.Sequential(*layers).to(dtype)


def classification_batch(tasks: int, support: int, query: int, features: tuple[int, ...],
                         ways: int, *, dtype=torch.float64, generator=None):
    g = generator
    sx = torch.randn(tasks, support, *features, dtype=dtype, generator=g)
    qx = torch.randn(tasks, query, *features, dtype=dtype, generator=g)
    sy = torch.randint(0, ways, (tasks, support), generator=g)
    qy = torch.randint(0, ways, (tasks, query), generator=g)
    return sx, sy, qx, qy


def regression_batch(tasks: int, support: int, query: int, *, dtype=torch.float64, generator=None):
    g = generator
    sx = torch.rand(tasks, support, 1, dtype=dtype, generator=g) * 10 - 5
    qx = torch.rand(tasks, query, 1, dtype=dtype, generator=g) * 10 - 5
    amplitude = torch.rand(tasks, 1, 1, dtype=dtype, generator=g) * 4.9 + 0.1
    return sx, amplitude * torch.sin(sx), qx, amplitude * torch.sin(qx)


def perturb_rates(opt, generator=None) -> None:
    """Moves learned rates away from their common initial value, so each entry matters."""
    with torch.no_grad():
        for p in opt.inner_lr.parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, dtype=p.dtype, generator=generator).to(p.device))


def all_grads(opt) -> torch.Tensor:
    tensors = list(opt.model.parameters()) + list(opt.inner_lr.parameters())
    return torch.cat([t.grad.reshape(-1) for t in tensors])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_batch(generator, tasks, support, query, shape, loss, outputs, dtype):
    """Fresh normal inputs [T, N, *shape]; class indices below `outputs` or normal targets."""
    sx = torch.randn(tasks, support, *shape, dtype=dtype, generator=generator)
    qx = torch.randn(tasks, query, *shape, dtype=dtype, generator=generator)
    if loss == "cross_entropy":
        sy = torch.randint(0, outputs, (tasks, support), generator=generator)
        qy = torch.randint(0, outputs, (tasks, query), generator=generator)
    else:
        sy = torch.randn(tasks, support, outputs, dtype=dtype, generator=generator)
        qy = torch.randn(tasks, query, outputs, dtype=dtype, generator=generator)
    return sx, sy, qx, qy


@contextlib.contextmanager
def cpu_kernels(isa: str):
    """Runs the block with the CPU kernels compiled for what this CPU supports ("native") or with
    their baseline x86-64 versions ("baseline"; csrc/cpu/vector_isa.h)."""
    previous = torch.ops.maml_ext_testing._force_baseline_cpu_kernels(isa == "baseline")
    try:
        yield
    finally:
        torch.ops.maml_ext_testing._force_baseline_cpu_kernels(previous)

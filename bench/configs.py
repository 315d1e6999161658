"""The standard MAML benchmark configurations (docs/benchmarks.md), as data.

The paper's appendix A.1 settings, with the PyTorch community's 15 query images per class where
the paper leaves the query set open. ``build_model`` and ``make_batch`` give the model and a
random task batch for a configuration, both from fixed seeds, so every implementation sees the
same weights and inputs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "mlp", "conv" (the paper's conv net) or "resnet12" (maml_ext.models.resnet12)
    tasks: int
    inner_steps: int
    inner_lr: float
    support: int  # points / images per task in the support set
    query: int
    features: tuple[int, ...]  # per-sample input shape
    outputs: int  # regression outputs or classes (ways)
    loss: str  # "mse" or "cross_entropy"
    channels: int = 0  # conv width (conv nets); ResNet-12's first width (width=, 64: standard)
    blocks: int = 4

    @property
    def label(self) -> str:
        return (
            f"{self.name} (T={self.tasks}, K={self.inner_steps}, α={self.inner_lr}, "
            f"{self.support}/{self.query})"
        )


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        Config(
            "sinusoid",
            "mlp",
            tasks=25,
            inner_steps=1,
            inner_lr=0.01,
            support=10,
            query=10,
            features=(1,),
            outputs=1,
            loss="mse",
        ),
        Config(
            "omniglot-5w1s",
            "conv",
            tasks=32,
            inner_steps=1,
            inner_lr=0.4,
            support=5,
            query=75,
            features=(1, 28, 28),
            outputs=5,
            loss="cross_entropy",
            channels=64,
        ),
        Config(
            "omniglot-20w1s",
            "conv",
            tasks=16,
            inner_steps=5,
            inner_lr=0.1,
            support=20,
            query=100,
            features=(1, 28, 28),
            outputs=20,
            loss="cross_entropy",
            channels=64,
        ),
        Config(
            "miniimagenet-5w1s",
            "conv",
            tasks=4,
            inner_steps=5,
            inner_lr=0.01,
            support=5,
            query=75,
            features=(3, 84, 84),
            outputs=5,
            loss="cross_entropy",
            channels=32,
        ),
        Config(
            "miniimagenet-5w5s",
            "conv",
            tasks=2,
            inner_steps=5,
            inner_lr=0.01,
            support=25,
            query=75,
            features=(3, 84, 84),
            outputs=5,
            loss="cross_entropy",
            channels=32,
        ),
        # ResNet-12 (MetaOptNet's backbone; maml_ext.models.resnet12) at width 32 (32-80-160-320,
        # 3.1M parameters; the standard 64-160-320-640 is width 64) on miniImageNet's 5-way 1-shot
        # images; fewer tasks, inner steps and queries than the conv net, since on this 2-core CPU
        # one second-order step takes tens of seconds even so.
        Config(
            "miniimagenet-5w1s-resnet12-w32",
            "resnet12",
            tasks=2,
            inner_steps=1,
            inner_lr=0.01,
            support=5,
            query=15,
            features=(3, 84, 84),
            outputs=5,
            loss="cross_entropy",
            channels=32,
        ),
    ]
}

MODEL_SEED = 0
DATA_SEED = 1


def build_model(config: Config, *, dtype=torch.float32, device="cpu") -> nn.Module:
    """The configuration's network with weights from a fixed seed."""
    torch.manual_seed(MODEL_SEED)
    if config.kind == "mlp":
        model = nn.Sequential(
            nn.Linear(config.features[0], 40),
            nn.ReLU(),
            nn.Linear(40, 40),
            nn.ReLU(),
            nn.Linear(40, config.outputs),
        )
    elif config.kind == "resnet12":
        from maml_ext import models

        in_channels, size, _ = config.features
        model = models.resnet12(config.outputs, in_channels, width=config.channels, image_size=size)
    else:
        in_channels, size, _ = config.features
        layers: list[nn.Module] = []
        for block in range(config.blocks):
            layers += [
                nn.Conv2d(
                    in_channels if block == 0 else config.channels, config.channels, 3, padding=1
                ),
                nn.BatchNorm2d(config.channels, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            size //= 2
        layers += [nn.Flatten(), nn.Linear(config.channels * size * size, config.outputs)]
        model = nn.Sequential(*layers)
    return model.to(device=device, dtype=dtype)


def make_batch(config: Config, *, dtype=torch.float32, device="cpu"):
    """(support_x, support_y, query_x, query_y), task-batched, from a fixed seed.

    Sinusoid: x uniform in [-5, 5], y = A sin(x) with a per-task amplitude, targets [T, N, 1].
    Classification: standard-normal images (every class in the support set), targets [T, N].
    """
    g = torch.Generator().manual_seed(DATA_SEED)
    T = config.tasks
    if config.kind == "mlp":
        sx = torch.rand(T, config.support, 1, generator=g, dtype=torch.float64) * 10 - 5
        qx = torch.rand(T, config.query, 1, generator=g, dtype=torch.float64) * 10 - 5
        amplitude = torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
        sy, qy = amplitude * torch.sin(sx), amplitude * torch.sin(qx)
    else:
        sx = torch.randn(T, config.support, *config.features, generator=g, dtype=torch.float64)
        qx = torch.randn(T, config.query, *config.features, generator=g, dtype=torch.float64)
        ways = config.outputs
        sy = torch.arange(config.support).remainder(ways).expand(T, -1).clone()
        qy = torch.arange(config.query).remainder(ways).expand(T, -1).clone()
    move = dict(device=device)
    sx, qx = sx.to(dtype=dtype, **move), qx.to(dtype=dtype, **move)
    if config.kind == "mlp":
        sy, qy = sy.to(dtype=dtype, **move), qy.to(dtype=dtype, **move)
    else:
        sy, qy = sy.to(**move), qy.to(**move)
    return sx, sy, qx, qy


def get(name: str) -> Config:
    if name not in CONFIGS:
        raise KeyError(f"unknown configuration {name!r}; choose from {sorted(CONFIGS)}")
    return CONFIGS[name]

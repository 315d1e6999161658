"""Few-shot backbones that the fused backend runs: the paper's four-layer conv net and ResNet-12.

    model = maml_ext.models.resnet12(ways=5, width=32, image_size=84)
    opt = maml_ext.MetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-3), inner_lr=0.01)

Both use batch norm with each task's own batch statistics (``track_running_stats=False``), as MAML
does, and end in flatten + linear, so every parameter is adapted in the inner loop. They are plain
``nn.Module`` code: the program compiler (maml_ext/program.py) finds ResNet-12's residual blocks
by tracing ``ResidualBlock.forward`` the way it finds a user's own block, and ``backend="auto"``
picks the fused backend for both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ResidualBlock", "conv4", "resnet12"]

# ResNet-12's widths (MetaOptNet, Lee et al. 2019; "rapid learning", Raghu et al. 2020).
RESNET12_WIDTHS = (64, 160, 320, 640)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _check_image_size(image_size: int) -> None:
    if image_size < 16:
        raise ValueError(
            f"image_size: four 2x2 max-pools need at least 16 pixels, got {image_size}"
        )


def conv4(
    ways: int, in_channels: int = 1, filters: int = 64, image_size: int = 28
) -> nn.Sequential:
    """The MAML paper's network (the few-shot presets build theirs with it) for square
    ``image_size`` inputs: 4 x [conv3x3 ``filters``, batch norm, ReLU, 2x2 max-pool], flatten,
    linear to ``ways`` (Omniglot: the defaults; miniImageNet:
    ``in_channels=3, filters=32, image_size=84``)."""
    for name, value in (
        ("ways", ways),
        ("in_channels", in_channels),
        ("filters", filters),
        ("image_size", image_size),
    ):
        _positive_int(name, value)
    _check_image_size(image_size)
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, kernel_size=3, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, side = filters, side // 2
    layers += [nn.Flatten(), nn.Linear(filters * side * side, ways)]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """ResNet-12's block: ``pool(act(main(x) + shortcut(x)))`` with main = 3 x [conv3x3, batch norm]
    (LeakyReLU between them, the last one after the addition), shortcut = conv1x1 + batch norm and a
    2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(3):
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels, track_running_stats=False),
            ]
            if index < 2:
                layers.append(nn.LeakyReLU(negative_slope))
            channels = out_channels
        self.main = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, track_running_stats=False),
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.main(x) + self.shortcut(x)))


def resnet12(
    ways: int,
    in_channels: int = 3,
    widths: tuple[int, int, int, int] = RESNET12_WIDTHS,
    *,
    width: int | None = None,
    image_size: int = 84,
    negative_slope: float = 0.1,
) -> nn.Sequential:
    """ResNet-12 for square ``image_size`` inputs: four :class:`ResidualBlock` of ``widths``
    channels, flatten, linear to ``ways``. ``width=w`` is the narrower family
    ``(w, 2.5 w, 5 w, 10 w)`` (``width=64`` is the standard 64-160-320-640).

    The head is flatten + linear (84x84 inputs leave 5x5 maps) rather than the global average
    pool of the supervised ResNet-12, which the fused backend does not run."""
    _positive_int("ways", ways)
    _positive_int("in_channels", in_channels)
    _positive_int("image_size", image_size)
    if width is not None:
        _positive_int("width", width)
        widths = (width, round(2.5 * width), 5 * width, 10 * width)
    widths = tuple(widths)
    if len(widths) != 4:
        raise ValueError(f"widths: expected four block widths, got {widths!r}")
    for value in widths:
        _positive_int("widths", value)
    _check_image_size(image_size)
    blocks: list[nn.Module] = []
    channels, side = in_channels, image_size
    for block_width in widths:
        blocks.append(ResidualBlock(channels, block_width, negative_slope))
        channels, side = block_width, side // 2
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * side * side, ways))


class AppendLogStd(nn.Module):
    """``y = [x | log_std]``: a learned, state-independent log standard deviation per output, set
    beside a Gaussian policy's (or a heteroscedastic regressor's) means ``x [..., A]``, giving the
    ``[..., 2A]`` outputs that ``loss="gaussian_nll"`` reads. The fused backend runs it as the
    ``append_log_std`` layer, so the log-std is adapted in the inner loop like any weight::

        policy = nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 2), AppendLogStd(2))
    """

    def __init__(self, features: int, initial_std: float = 1.0):
        super().__init__()
        if features < 1 or not initial_std > 0:
            raise ValueError(
                f"AppendLogStd: expected features >= 1 and initial_std > 0, got {features}, "
                f"{initial_std}"
            )
        self.features = features
        self.log_std = nn.Parameter(torch.full((features,), float(math.log(initial_std))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.log_std.expand_as(x)], dim=-1)

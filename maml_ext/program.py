"""Compiles an ``nn.Module`` into the layer program that the fused backend (maml_ext._C) runs.

The program is an int list (one record per layer, codes in csrc/layers.h) plus a float list (batch
norm eps), and the parameters laid out as one flat vector θ [P] in the model's own parameter order:
per-task weights are then one [T, P] tensor and the whole inner update one fused multiply-add.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

# Layer codes: keep in step with LayerKind in csrc/layers.h.
LINEAR, CONV2D, BATCH_NORM, RELU, MAX_POOL2D, FLATTEN = 1, 2, 3, 4, 5, 6
# Loss codes: LossKind in csrc/layers.h.
LOSS_CODES = {"cross_entropy": 1, "mse": 2}

SUPPORTED_LAYERS = (
    "Linear, Conv2d (groups=1, dilation=1, zero padding), BatchNorm1d/2d (batch statistics), "
    "ReLU, MaxPool2d (dilation=1), Flatten (start_dim=1), nested Sequential"
)


class UnsupportedModelError(ValueError):
    """The fused backend cannot run this model; ``layer`` names the module that stops it."""

    def __init__(self, layer: str, reason: str):
        self.layer = layer
        self.reason = reason
        super().__init__(
            f"the fused backend cannot run layer '{layer}': {reason} (supported: {SUPPORTED_LAYERS})"
        )


@dataclasses.dataclass(frozen=True)
class ParameterSlot:
    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class LayerProgram:
    ints: tuple[int, ...]
    floats: tuple[float, ...]
    slots: tuple[ParameterSlot, ...]
    num_params: int

    @functools.cached_property
    def ints_list(self) -> list[int]:
        """``ints`` as the op's ``int[]`` argument (a list; built once)."""
        return list(self.ints)

    @functools.cached_property
    def floats_list(self) -> list[float]:
        return list(self.floats)

    @functools.cached_property
    def slot_names(self) -> tuple[str, ...]:
        """The parameters' names in θ's order (the order of the fused ops' parameter lists)."""
        return tuple(slot.name for slot in self.slots)

    def flatten(self, params: dict[str, torch.Tensor], task_dims: int = 0) -> torch.Tensor:
        """θ as one vector [P] (or [T, P] when the params carry ``task_dims`` leading task dims);
        differentiable, so gradients reach the original tensors."""
        pieces = []
        for slot in self.slots:
            value = params[slot.name]
            pieces.append(value.reshape(*value.shape[:task_dims], slot.numel))
        return torch.cat(pieces, dim=-1)

    @functools.cached_property
    def _split_sizes(self) -> list[int]:
        return [slot.numel for slot in self.slots]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Splits [..., P] back into named tensors [..., *shape] (views where the layout allows)."""
        lead = flat.shape[:-1]
        pieces = flat.split(self._split_sizes, dim=-1)
        return {slot.name: piece.reshape(*lead, *slot.shape)
                for slot, piece in zip(self.slots, pieces)}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _same_forward(module: nn.Module, base: type) -> bool:
    # A subclass that overrides forward computes something we cannot know.
    return isinstance(module, base) and type(module).forward is base.forward


def compile_program(model: nn.Module) -> LayerProgram:
    """The layer program of ``model``; raises UnsupportedModelError naming the first layer the
    fused backend cannot run."""
    ints: list[int] = []
    floats: list[float] = []
    slots: list[ParameterSlot] = []
    offset = 0

    def add_param(name: str, param: torch.Tensor | None) -> int:
        nonlocal offset
        if param is None:
            return -1
        if not param.requires_grad:
            raise UnsupportedModelError(name, "frozen parameters (requires_grad=False) are not supported")
        slots.append(ParameterSlot(name, offset, param.shape))
        start, offset = offset, offset + param.numel()
        return start

    def visit(module: nn.Module, name: str) -> None:
        prefix = f"{name}." if name else ""
        label = name or type(module).__name__
        if _same_forward(module, nn.Sequential):
            for child_name, child in module.named_children():
                visit(child, prefix + child_name)
        elif _same_forward(module, nn.Linear):
            w = add_param(prefix + "weight", module.weight)
            b = add_param(prefix + "bias", module.bias)
            ints.extend([LINEAR, module.in_features, module.out_features, int(b >= 0), w, max(b, 0)])
        elif _same_forward(module, nn.Conv2d):
            if module.groups != 1:
                raise UnsupportedModelError(label, f"groups={module.groups} (only 1)")
            if _pair(module.dilation) != (1, 1):
                raise UnsupportedModelError(label, f"dilation={module.dilation} (only 1)")
            if module.padding_mode != "zeros":
                raise UnsupportedModelError(label, f"padding_mode='{module.padding_mode}'")
            padding = module.padding
            kh, kw = _pair(module.kernel_size)
            if padding == "valid":
                padding = (0, 0)
            elif padding == "same":
                if kh % 2 == 0 or kw % 2 == 0:
                    raise UnsupportedModelError(label, "padding='same' with an even kernel size")
                padding = (kh // 2, kw // 2)
            ph, pw = _pair(padding)
            sh, sw = _pair(module.stride)
            w = add_param(prefix + "weight", module.weight)
            b = add_param(prefix + "bias", module.bias)
            ints.extend([CONV2D, module.in_channels, module.out_channels, kh, kw, sh, sw, ph, pw,
                         int(b >= 0), w, max(b, 0)])
        elif _same_forward(module, nn.BatchNorm1d) or _same_forward(module, nn.BatchNorm2d):
            if module.track_running_stats:
                raise UnsupportedModelError(label, running_stats_message(label))
            w = add_param(prefix + "weight", module.weight)
            b = add_param(prefix + "bias", module.bias)
            spatial = int(isinstance(module, nn.BatchNorm2d))
            ints.extend([BATCH_NORM, module.num_features, spatial, int(module.affine), max(w, 0), max(b, 0)])
            floats.append(float(module.eps))
        elif _same_forward(module, nn.ReLU):
            ints.append(RELU)
        elif _same_forward(module, nn.MaxPool2d):
            if _pair(module.dilation) != (1, 1):
                raise UnsupportedModelError(label, f"dilation={module.dilation} (only 1)")
            if module.return_indices:
                raise UnsupportedModelError(label, "return_indices=True")
            kh, kw = _pair(module.kernel_size)
            sh, sw = _pair(module.stride if module.stride is not None else module.kernel_size)
            ph, pw = _pair(module.padding)
            ints.extend([MAX_POOL2D, kh, kw, sh, sw, ph, pw, int(module.ceil_mode)])
        elif _same_forward(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise UnsupportedModelError(
                    label, f"start_dim={module.start_dim}, end_dim={module.end_dim} (only 1, -1)"
                )
            ints.append(FLATTEN)
        else:
            raise UnsupportedModelError(label, f"{type(module).__name__} is not a supported layer")

    visit(model, "")
    if not slots:
        raise UnsupportedModelError(type(model).__name__, "the model has no parameters to meta-learn")
    names = [name for name, _ in model.named_parameters()]
    if sorted(names) != sorted(slot.name for slot in slots):
        raise UnsupportedModelError(type(model).__name__, "parameters shared between layers")
    return LayerProgram(tuple(ints), tuple(floats), tuple(slots), offset)


_RECORD_LENGTHS = {LINEAR: 5, CONV2D: 11, BATCH_NORM: 5, RELU: 0, MAX_POOL2D: 7, FLATTEN: 0}


def output_shape(ints, sample_shape) -> tuple[int, ...]:
    """The per-sample output shape of a program for per-sample inputs of ``sample_shape``
    (the same arithmetic as the C++ layers; used by the fake kernels)."""
    shape = tuple(sample_shape)
    position = 0
    while position < len(ints):
        kind = ints[position]
        fields = ints[position + 1 : position + 1 + _RECORD_LENGTHS[kind]]
        position += 1 + _RECORD_LENGTHS[kind]
        if kind == LINEAR:
            shape = (fields[1],)
        elif kind == CONV2D:
            out, kh, kw, sh, sw, ph, pw = fields[1:8]
            shape = (out, (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1)
        elif kind == MAX_POOL2D:
            kh, kw, sh, sw, ph, pw, ceil_mode = fields
            shape = (shape[0], *(_pooled(size, k, s, p, ceil_mode)
                                 for size, k, s, p in ((shape[1], kh, sh, ph), (shape[2], kw, sw, pw))))
        elif kind == FLATTEN:
            shape = (math.prod(shape),)
    return shape


def _pooled(size: int, kernel: int, stride: int, padding: int, ceil_mode: int) -> int:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch's rule: with ceil_mode the last window must start inside the padded input.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def running_stats_message(layer: str) -> str:
    return (
        f"BatchNorm layer '{layer}' tracks running statistics; MAML normalises each task with its "
        "own batch statistics (transductive, as in the paper). Build it with "
        "track_running_stats=False, e.g. nn.BatchNorm2d(64, track_running_stats=False)"
    )

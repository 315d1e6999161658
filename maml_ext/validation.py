"""Checks of task-batched inputs. Every error names the argument, the shape given and the one
expected, and is raised before anything is computed or changed."""

from __future__ import annotations

import torch


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(
    name: str,
    value,
    *,
    dtype: torch.dtype | None = None,
    device=None,
    min_dim: int | None = None,
    floating: bool | None = None,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(
            f"{name}: expected at least {min_dim} dimensions [T, N, ...], got shape {_shape(value)}"
        )
    if floating and not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype} (the model's), got {value.dtype}")
    if device is not None and value.device != (
        device if isinstance(device, torch.device) else torch.device(device)
    ):
        raise ValueError(
            f"{name}: expected a tensor on {device} (the model's device), got one on {value.device}"
        )


def check_inputs(
    name: str,
    x: torch.Tensor,
    *,
    tasks: int | None,
    dtype,
    device,
    features: tuple[int, ...] | None = None,
) -> None:
    """x: [T, N, *features]."""
    check_tensor(name, x, dtype=dtype, device=device, min_dim=3)
    if tasks is not None and x.shape[0] != tasks:
        raise ValueError(f"{name}: expected {tasks} tasks (as support_x), got shape {_shape(x)}")
    if features is not None and tuple(x.shape[2:]) != tuple(features):
        expected = "[T, N, " + ", ".join(map(str, features)) + "]"
        raise ValueError(f"{name}: expected per-sample features {expected}, got shape {_shape(x)}")


def check_targets(
    name: str,
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    classification: bool,
    num_classes: int | None,
    output_shape: tuple[int, ...] | None,
    dtype,
    device,
) -> None:
    """y: class indices [T, N] (classification) or targets [T, N, *output_shape]."""
    tasks, rows = x.shape[0], x.shape[1]
    if classification:
        check_tensor(name, y, device=device)
        if y.dtype != torch.int64:
            raise ValueError(f"{name}: expected int64 class indices, got {y.dtype}")
        if tuple(y.shape) != (tasks, rows):
            raise ValueError(
                f"{name}: expected shape [{tasks}, {rows}] (a class index per input), "
                f"got {_shape(y)}"
            )
        if num_classes is not None and y.numel():
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"{name}: class indices must lie in [0, {num_classes - 1}] (the "
                    f"model has {num_classes} outputs), got values in [{low}, {high}]"
                )
    else:
        check_tensor(name, y, dtype=dtype, device=device)
        if output_shape is not None:
            expected = (tasks, rows, *output_shape)
            if tuple(y.shape) != expected:
                raise ValueError(
                    f"{name}: expected shape [{', '.join(map(str, expected))}] (the "
                    f"model's outputs), got {_shape(y)}"
                )
        elif tuple(y.shape[:2]) != (tasks, rows):
            raise ValueError(f"{name}: expected shape [{tasks}, {rows}, ...], got {_shape(y)}")


def check_steps(name: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: expected an integer number of inner steps >= 1, got {steps!r}")
    return steps


def check_step_counts(name: str, counts) -> list[int]:
    """A non-empty collection of distinct step counts (integers >= 0), sorted."""
    try:
        values = list(counts)
    except TypeError:
        values = None
    if (
        not values
        or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in values)
        or len(set(values)) != len(values)
    ):
        raise ValueError(
            f"{name}: expected a non-empty collection of distinct integer step counts >= 0, "
            f"got {counts!r}"
        )
    return sorted(values)

"""Inner-loop learning rates: fixed, or learned (a scalar, Meta-SGD tensors, MAML++ per step)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

LEARN_KINDS = (None, "scalar", "per_parameter", "per_step")


def _key(name: str) -> str:
    # ParameterDict keys may not contain '.'.
    return name.replace(".", "-")


class InnerLearningRates(nn.Module):
    """α_k for every parameter tensor and inner step k.

    - ``learn=None``: the fixed float ``init`` everywhere (nothing to learn);
    - ``"scalar"``: one learned scalar shared by all parameters and steps;
    - ``"per_parameter"``: a learned tensor shaped like each parameter (Meta-SGD), shared by steps;
    - ``"per_step"``: a learned scalar per parameter tensor and per step (MAML++'s LSLR), [K] each.
      Steps beyond K (``adapt(steps=...)`` with more steps than training used) reuse the last rate,
      with a warning the first time (per object). The other kinds do not depend on the step.

    ``adapted`` (ANIL): the names of the parameters that take inner steps; the others have rate 0
    and no learned rate. None: all.
    """

    def __init__(
        self,
        shapes: dict[str, torch.Size],
        steps: int,
        init: float,
        learn: str | None,
        *,
        device=None,
        dtype=None,
        adapted: frozenset[str] | None = None,
    ):
        super().__init__()
        if learn not in LEARN_KINDS:
            raise ValueError(f"learn_inner_lr: expected one of {LEARN_KINDS}, got {learn!r}")
        if (
            isinstance(init, bool)
            or not isinstance(init, (int, float))
            or not math.isfinite(init)
            or init <= 0
        ):
            raise ValueError(f"inner_lr: expected a positive finite number, got {init!r}")
        self.learn = learn
        self.init = float(init)
        self.steps = steps
        self.adapted = adapted
        if adapted is not None:
            shapes = {name: shape for name, shape in shapes.items() if name in adapted}
        factory = {"device": device, "dtype": dtype}
        self.scalar = (
            nn.Parameter(torch.tensor(self.init, **factory)) if learn == "scalar" else None
        )
        self.tensors = nn.ParameterDict()
        if learn == "per_parameter":
            for name, shape in shapes.items():
                self.tensors[_key(name)] = nn.Parameter(torch.full(shape, self.init, **factory))
        elif learn == "per_step":
            for name in shapes:
                self.tensors[_key(name)] = nn.Parameter(torch.full((steps,), self.init, **factory))

    def rate(self, step: int, name: str) -> torch.Tensor | float:
        """α for parameter ``name`` at inner step ``step``, broadcastable against the parameter."""
        if self.adapted is not None and name not in self.adapted:
            return 0.0
        if self.learn is None:
            return self.init
        if self.learn == "scalar":
            return self.scalar
        value = self.tensors[_key(name)]
        if self.learn == "per_step":
            if step >= self.steps:
                self._warn_beyond_trained_steps()
            return value[min(step, self.steps - 1)]
        return value

    def _warn_beyond_trained_steps(self) -> None:
        if getattr(self, "_warned_beyond", False):
            return
        self._warned_beyond = True
        warnings.warn(
            f"inner steps beyond the {self.steps} learned per-step rates (learn_inner_lr="
            f"'per_step') reuse the rates of step {self.steps} (said once)",
            stacklevel=4,
        )

    def flat(self, slots, steps: int, like: torch.Tensor) -> torch.Tensor:
        """The per-element rates [steps, P] in the layer program's layout (differentiable)."""
        if self.learn is None and self.adapted is None:
            return torch.full(
                (steps, like.shape[-1]), self.init, device=like.device, dtype=like.dtype
            )
        factory = {"device": like.device, "dtype": like.dtype}
        rows = []
        for step in range(steps):
            rows.append(
                torch.cat(
                    [
                        torch.as_tensor(self.rate(step, slot.name), **factory)
                        .expand(slot.shape)
                        .reshape(-1)
                        for slot in slots
                    ]
                )
            )
        return torch.stack(rows)

"""The MAML family's options that change the inner loop or the meta-objective (ANIL, MAML++).

``MetaOptimizer`` resolves its ``adapt=``, ``multi_step_loss=``, ``per_step_batch_norm=`` and
``first_order_until=`` arguments here and hands the backends one ``Variant`` per meta-step
(maml_ext/backend.py); ``None`` where every option is off, so the default path is unchanged.

- ANIL (Raghu et al. 2019): only the adapted parameters take inner steps (the others have inner
  rate 0: exactly MAML's recursion with those rates, so the fused sweep needs nothing new to be
  exact); every parameter is meta-learned.
- MAML++ multi-step loss (Antoniou et al. 2018): the meta-objective Σ_k w_k · (mean query loss after
  step k), with the authors' annealing of w (``msl_weights``).
- MAML++ per-step batch norm: step k's passes use their own batch-norm weight and bias.
  ``PerStepBatchNorm`` holds them: the model's own BN parameters are step 0's, and the module adds
  [K - 1, C] tensors for steps 1 … K - 1 (so nothing of the model goes unused). As in the authors'
  code, these parameters take no inner steps; they are meta-learned. The query pass after step k
  uses step k's parameters; steps beyond K (evaluation with more steps) reuse the last step's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn


def _key(name: str) -> str:
    # ParameterDict keys may not contain '.'.
    return name.replace(".", "-")


def head_parameters(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The parameter names of the model's last nn.Linear (ANIL's head)."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ValueError("adapt: 'head' means the last nn.Linear layer, and the model has none")
    prefix = f"{last}." if last else ""
    found = [name for name in names if name.startswith(prefix) and "." not in name[len(prefix) :]]
    if not found:
        raise ValueError(f"adapt: the head '{last}' has no trainable parameters")
    return found


def resolve_adapted(model: nn.Module, adapt, names: Sequence[str]) -> frozenset[str] | None:
    """The names of the parameters that take inner steps: None for all (``adapt="all"``)."""
    if isinstance(adapt, str):
        if adapt == "all":
            return None
        if adapt == "head":
            return frozenset(head_parameters(model, names))
        raise ValueError(
            f"adapt: expected 'all', 'head' or a list of parameter names or prefixes, got {adapt!r}"
        )
    if not isinstance(adapt, (list, tuple, set, frozenset)) or not adapt:
        raise ValueError(
            "adapt: expected 'all', 'head' or a non-empty list of parameter names or prefixes, "
            f"got {adapt!r}"
        )
    chosen: set[str] = set()
    for entry in adapt:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"adapt: expected parameter names or prefixes (str), got {entry!r}")
        prefix = entry.rstrip(".") + "."
        matched = [name for name in names if name == entry or name.startswith(prefix)]
        if not matched:
            raise ValueError(
                f"adapt: {entry!r} matches no trainable parameter (names: {', '.join(names)})"
            )
        chosen.update(matched)
    return None if chosen == set(names) else frozenset(chosen)


def msl_weights(steps: int, iteration: int, msl_iterations: int) -> list[float]:
    """MAML++'s per-step loss weights at outer ``iteration`` (Antoniou et al.'s annealing):
    all 1/K at first; the non-final ones decay linearly, by 1/(K · msl_iterations) per iteration,
    to a floor of 0.03/K, while the final one grows so that they sum to 1."""
    decay = 1.0 / steps / msl_iterations
    floor = 0.03 / steps
    weights = [max(1.0 / steps - iteration * decay, floor) for _ in range(steps - 1)]
    final = min(1.0 / steps + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [*weights, final]


class PerStepBatchNorm(nn.Module):
    """Per-step batch-norm weights and biases (MAML++): step 0 uses the model's own, step k >= 1
    ``extra[name][k - 1]`` ([K - 1, C], initialised from the model's values)."""

    def __init__(self, model: nn.Module, steps: int, trainable: Sequence[str]):
        super().__init__()
        self.steps = steps
        self.names: list[str] = []
        self.extra = nn.ParameterDict()
        for module_name, module in model.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
                continue
            prefix = f"{module_name}." if module_name else ""
            for kind in ("weight", "bias"):
                name = prefix + kind
                if name not in trainable:
                    continue
                value = getattr(module, kind).detach()
                self.names.append(name)
                self.extra[_key(name)] = nn.Parameter(
                    value.unsqueeze(0).repeat(steps - 1, *([1] * value.dim())).clone()
                )
        if not self.names:
            raise ValueError(
                "per_step_batch_norm: the model has no trainable batch-norm weights or biases"
            )

    def value(self, params: dict[str, torch.Tensor], name: str, step: int) -> torch.Tensor:
        """The parameter ``name`` of inner step ``step`` (steps beyond K reuse the last one's)."""
        step = min(step, self.steps - 1)
        return params[name] if step == 0 else self.extra[_key(name)][step - 1]

    def shift(self, params, slots, steps: int, like: torch.Tensor) -> torch.Tensor:
        """The fused op's ``inner_shift`` [steps, P] (differentiable): δ_k = b_{k+1} - b_k on the
        batch-norm slots for k < min(steps, K) - 1, zero elsewhere."""
        rows = []
        names = set(self.names)
        for k in range(steps):
            pieces = []
            for slot in slots:
                if slot.name in names and k + 1 < min(steps, self.steps):
                    delta = self.value(params, slot.name, k + 1) - self.value(params, slot.name, k)
                    pieces.append(delta.reshape(-1))
                else:
                    pieces.append(like.new_zeros(slot.numel))
            rows.append(torch.cat(pieces))
        return torch.stack(rows)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One meta-step's options for a backend (None fields: off; at least one is on, else no
    Variant is passed at all)."""

    query_weights: tuple[float, ...] | None = None  # MSL weights [K], or None (final loss only)
    batch_norm: PerStepBatchNorm | None = None

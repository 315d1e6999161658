"""Is an adapted network still a good place to adapt from? (issue 15's open question)

MAML tunes θ so that k SGD steps on a task's support set fit that task. After adapting to task A
(φ_A), can the network adapt as well to a new task B from φ_A as from θ, and come back to A? For
pairs of test tasks (A, B) and k steps each, from the same starting network:

- ``A from θ``: θ → A, scored on A (the usual test protocol);
- ``B from θ``: θ → B, scored on B;
- ``B from φ_A``: θ → A → B, scored on B (switching);
- ``A after B``: θ → A → B, scored on A (what adapting to B kept of A);
- ``A from φ_AB``: θ → A → B → A, scored on A (coming back).

Every adaptation is plain SGD on the task's support set with the method's inner rate, the same
as the test protocol's, so the pretrained baseline is treated exactly like MAML. The per-pair
differences ``B from φ_A − B from θ`` and ``A from φ_AB − A from θ`` carry the answer; they are
reported with 95% intervals (paired over the same tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from maml_ext.experiments.reporting import mean_ci95

__all__ = ["CONDITIONS", "functional_sgd", "switching_scores", "summarise_switching"]

CONDITIONS = ("A from θ", "B from θ", "B from φ_A", "A after B", "A from φ_AB")
# The paired differences reported with the conditions: (name, condition, baseline condition).
DIFFERENCES = (
    ("B: from φ_A − from θ", "B from φ_A", "B from θ"),
    ("A: from φ_AB − from θ", "A from φ_AB", "A from θ"),
)

Weights = dict[str, torch.Tensor]
# score(weights, x, y) -> per-task score [T] (lower is better for a loss, higher for accuracy).
ScoreFn = Callable[[Weights, torch.Tensor, torch.Tensor], torch.Tensor]


def _task_loss(model: nn.Module, loss: str):
    def task_loss(weights, x, y):
        out = functional_call(model, weights, (x,))
        if loss == "mse":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    return task_loss


def functional_sgd(
    model: nn.Module,
    weights: Weights,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    lr: float,
    loss: str,
) -> Weights:
    """``steps`` SGD steps of ``loss`` ("mse" or "cross_entropy") on each task's support set,
    from per-task ``weights`` ``{name: [T, *shape]}`` (each task from its own start)."""
    gradient = vmap(grad(_task_loss(model, loss)))
    for _ in range(steps):
        grads = gradient(weights, support_x, support_y)
        weights = {name: w - lr * grads[name] for name, w in weights.items()}
    return {name: w.detach() for name, w in weights.items()}


def switching_scores(
    model: nn.Module,
    start: Weights,
    task_a: Sequence[torch.Tensor],
    task_b: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    loss: str,
    score: ScoreFn,
) -> dict[str, torch.Tensor]:
    """Per-pair scores ``{condition: [T]}`` of :data:`CONDITIONS` for ``steps`` SGD steps per
    adaptation. ``start``: per-task start weights ``[T, ...]`` (θ repeated); ``task_a`` and
    ``task_b``: ``(support_x, support_y, query_x, query_y)`` each ``[T, ...]``."""
    sx_a, sy_a, qx_a, qy_a = task_a
    sx_b, sy_b, qx_b, qy_b = task_b

    def adapt(weights, sx, sy):
        return functional_sgd(model, weights, sx, sy, steps, lr, loss)

    with torch.enable_grad():
        phi_a = adapt(start, sx_a, sy_a)
        phi_b = adapt(start, sx_b, sy_b)
        phi_ab = adapt(phi_a, sx_b, sy_b)
        phi_aba = adapt(phi_ab, sx_a, sy_a)
    with torch.no_grad():
        return {
            "A from θ": score(phi_a, qx_a, qy_a),
            "B from θ": score(phi_b, qx_b, qy_b),
            "B from φ_A": score(phi_ab, qx_b, qy_b),
            "A after B": score(phi_ab, qx_a, qy_a),
            "A from φ_AB": score(phi_aba, qx_a, qy_a),
        }


def summarise_switching(scores: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Mean and 95% interval of every condition, and of the paired differences."""
    summary = {}
    for condition in CONDITIONS:
        mean, ci95, _ = mean_ci95(scores[condition])
        summary[condition] = {"mean": mean, "ci95": ci95}
    for name, condition, baseline in DIFFERENCES:
        mean, ci95, _ = mean_ci95(scores[condition] - scores[baseline])
        summary[name] = {"mean": mean, "ci95": ci95}
    return summary


def per_task_mse(model: nn.Module) -> ScoreFn:
    """Mean squared error per task of ``model`` at per-task weights."""

    def score(weights, x, y):
        out = vmap(lambda w, xt: functional_call(model, w, (xt,)))(weights, x)
        return ((out - y) ** 2).flatten(1).mean(1)

    return score


def per_task_accuracy(model: nn.Module) -> ScoreFn:
    """Classification accuracy per task of ``model`` at per-task weights."""

    def score(weights, x, y):
        logits = vmap(lambda w, xt: functional_call(model, w, (xt,)))(weights, x)
        return (logits.argmax(-1) == y).to(torch.float64).mean(1)

    return score


def repeat_weights(model: nn.Module, tasks: int) -> Weights:
    """θ as per-task weights ``{name: [tasks, *shape]}`` (copies, detached)."""
    return {
        name: p.detach().unsqueeze(0).expand(tasks, *p.shape).clone()
        for name, p in model.named_parameters()
    }

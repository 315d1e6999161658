"""Checkpoints of few-shot meta-training runs: reading one, and loading a ready MetaOptimizer.

A checkpoint written by ``python -m maml_ext train <preset>`` is a dict of plain Python values and
tensors (so ``torch.load(weights_only=True)`` reads it), saved with
:func:`maml_ext.checkpoint.save_atomic`:

- ``format``: :data:`CHECKPOINT_FORMAT`;
- ``meta_optimizer``: ``MetaOptimizer.state_dict()`` (model, learned inner rates, outer Adam);
- ``preset``: the run's :class:`~maml_ext.experiments.presets.FewShotPreset` as a dict (the
  network is rebuilt from it; ``algorithm`` names the meta-learning algorithm),
  ``settings``: the run's other settings (data, seeds, backend, the algorithm's options
  ``algorithm_options``, the outer schedule ``outer_schedule``, ...); ``outer_scheduler``: the
  outer LR scheduler's state (None without one);
- ``iteration``: meta-iterations done; ``sampler``: the training TaskSampler's state;
  ``rng``: torch's global CPU (and CUDA) generator states; plus logging state.

To use a trained network on your own few-shot problem::

    from maml_ext.experiments import load_checkpoint

    meta = load_checkpoint("runs/omniglot-5w1s/checkpoint.pt")
    adapted = meta.adapt(support_x, support_y, steps=3)        # [T, N*K, 1, 28, 28], [T, N*K]
    predictions = meta.predict(adapted, query_x).argmax(-1)    # [T, M]
"""

from __future__ import annotations

from pathlib import Path

import torch

from maml_ext.experiments.presets import FewShotPreset
from maml_ext.optimizer import MetaOptimizer

from ...types import PathLike

__all__ = ["CHECKPOINT_FORMAT", "read_checkpoint", "build_meta_optimizer", "load_checkpoint"]

CHECKPOINT_FORMAT = "maml_ext.fewshot.checkpoint/1"


def read_checkpoint(path: PathLike, map_location="cpu") -> dict:
    """The checkpoint's dict (tensors on ``map_location``), checked to be one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling reports damage with many exception types
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a maml_ext few-shot checkpoint (format {found!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    return state


def build_meta_optimizer(
    preset: FewShotPreset,
    *,
    device=None,
    backend: str = "auto",
    outer_optimizer: bool = True,
    algorithm_options: dict | None = None,
    distributed: bool = False,
) -> MetaOptimizer:
    """A fresh meta-learner of ``preset.algorithm`` (a MetaOptimizer for MAML and its variants,
    an ImplicitMetaOptimizer for iMAML, a Reptile) for ``preset``'s network (current RNG for the
    initial weights) with Adam at the preset's outer learning rate (or no outer optimiser);
    ``algorithm_options``: as :func:`maml_ext.experiments.algorithms.resolve_options` takes;
    ``distributed``: as for MetaOptimizer (the meta-batch split across the default process
    group's ranks)."""
    from maml_ext.experiments.algorithms import build_meta_optimizer as build

    return build(
        preset,
        device=device,
        backend=backend,
        outer_optimizer=outer_optimizer,
        options=algorithm_options,
        distributed=distributed,
    )


def load_checkpoint(
    path: PathLike,
    *,
    device: str | torch.device | None = None,
    backend: str = "auto",
    outer_optimizer: bool = True,
) -> MetaOptimizer:
    """A ready :class:`maml_ext.MetaOptimizer` (or the run's algorithm's ImplicitMetaOptimizer
    or Reptile, which have the same surface) from a training checkpoint.

    The network is rebuilt from the preset stored in the checkpoint and gets the trained weights,
    learned inner rates and inner-loop settings (steps, α, first order); with
    ``outer_optimizer=True`` also Adam with its saved state, so ``step`` continues training.
    ``device``: where to put the model (default CPU). ``backend``: as for MetaOptimizer.

    Adapt to your own tasks with ``adapt(support_x, support_y, steps=k)`` and classify with
    ``predict(adapted, query_x)``; tensors are task-batched ``[T, N, C, H, W]`` / ``[T, N]``.
    The preset (ways, image shape, ...) is in ``read_checkpoint(path)["preset"]``.
    """
    state = read_checkpoint(path)
    preset = FewShotPreset.from_dict(state["preset"])
    meta_optimizer = build_meta_optimizer(
        preset,
        device=device,
        backend=backend,
        outer_optimizer=outer_optimizer,
        algorithm_options=state["settings"].get("algorithm_options"),
    )
    saved = dict(state["meta_optimizer"])
    if not outer_optimizer:
        saved["outer_optimizer"] = None
    meta_optimizer.load_state_dict(saved)
    return meta_optimizer

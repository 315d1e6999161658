"""The baseline of the few-shot test protocol: the same network trained without meta-learning,
fine-tuned the same way.

It is trained as an ordinary classifier over all meta-training classes jointly (a softmax head
with one output per training class, rotations included; Adam 1e-3, batches of 64 images,
``iterations`` steps, batch norm with batch statistics as in MAML). For each test task its head is
replaced by a fresh N-way linear layer initialised to zero (so the 0-step accuracy is chance and
no random head favours a class), and the whole network is then fine-tuned exactly like MAML's:
``MetaOptimizer.adapt`` with the preset's inner learning rate.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from maml_ext.checkpoint import save_atomic
from maml_ext.experiments.presets import FewShotPreset
from maml_ext.experiments.reporting import progress_bar
from maml_ext.optimizer import MetaOptimizer

__all__ = [
    "DEFAULT_BASELINE_ITERATIONS",
    "BASELINE_BATCH",
    "BASELINE_LR",
    "BASELINE_FORMAT",
    "pretrain_baseline",
    "baseline_meta_optimizer",
    "cached_baseline",
    "save_baseline",
]

DEFAULT_BASELINE_ITERATIONS = 5000
BASELINE_BATCH = 64
BASELINE_LR = 1e-3
BASELINE_FORMAT = "maml_ext.fewshot.baseline/1"


def _classification_batch(dataset, generator: torch.Generator, size: int, device):
    """``size`` random images of the dataset (rotations included) and their class ids."""
    rotations = int(getattr(dataset, "rotations", 1))
    count = dataset.images.shape[0]
    index = torch.randint(count * rotations, (size,), generator=generator)
    image_index, rotation = index % count, index // count
    x = dataset.images[image_index]
    for turns in range(1, rotations):
        turned = rotation == turns
        if turned.any():
            x[turned] = torch.rot90(x[turned], turns, dims=(-2, -1))
    prepare = getattr(dataset, "prepare_batch", None)
    x = prepare(x) if prepare is not None else x
    y = dataset.labels[image_index].long() * rotations + rotation
    return x.to(device), y.to(device)


def pretrain_baseline(
    preset: FewShotPreset,
    train_data,
    *,
    iterations: int,
    seed: int = 0,
    batch_size: int = BASELINE_BATCH,
    lr: float = BASELINE_LR,
    device="cpu",
    progress: bool = False,
):
    """The preset's network trained as one classifier over all of ``train_data``'s classes
    (rotations included): Adam, cross-entropy, batches of ``batch_size`` images. Returns the
    model, whose last layer has one output per training class."""
    classes = int(train_data.labels.max()) + 1
    classes *= int(getattr(train_data, "rotations", 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = preset.with_overrides(ways=classes).build_model().to(device)
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    bar = progress_bar(progress, range(iterations), description="baseline pretraining")
    for iteration in bar:
        x, y = _classification_batch(train_data, generator, batch_size, device)
        loss = F.cross_entropy(model(x), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        if progress and iteration % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model


def _head_prefix(model) -> str:
    return f"{len(model) - 1}."


def baseline_meta_optimizer(
    preset: FewShotPreset, pretrained, *, device="cpu", backend="auto"
) -> MetaOptimizer:
    """A MetaOptimizer (no outer optimiser) for the pretrained body with a fresh zero-initialised
    ``preset.ways``-way head, fine-tuned with the preset's inner learning rate."""
    model = preset.build_model().to(device)
    head = _head_prefix(model)
    body = {
        name: value for name, value in pretrained.state_dict().items() if not name.startswith(head)
    }
    missing = model.load_state_dict(body, strict=False)
    if any(not name.startswith(head) for name in missing.missing_keys) or missing.unexpected_keys:
        raise ValueError(f"pretrained network does not match {preset.name}: {missing}")
    last = model[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return MetaOptimizer(model, None, inner_lr=preset.inner_lr, inner_steps=1, backend=backend)


def cached_baseline(path: Path, settings: dict, preset: FewShotPreset) -> torch.nn.Module | None:
    """The pretrained baseline saved at ``path`` when it was made with ``settings``, else None."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if (
        not isinstance(saved, dict)
        or saved.get("format") != BASELINE_FORMAT
        or saved.get("settings") != settings
    ):
        return None
    model = preset.with_overrides(ways=int(saved["num_classes"])).build_model()
    model.load_state_dict(saved["model"])
    return model


def save_baseline(model: torch.nn.Module, settings: dict, path: Path) -> None:
    """Saves a pretrained baseline so that :func:`cached_baseline` finds it for ``settings``."""
    save_atomic(
        {
            "format": BASELINE_FORMAT,
            "settings": settings,
            "num_classes": model[-1].out_features,
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
        },
        path,
    )

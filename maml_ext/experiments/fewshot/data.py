"""The data of a few-shot run: one split of the preset's dataset, and task samplers over it."""

from __future__ import annotations

from pathlib import Path

from maml_ext.experiments.presets import ConfigurationError, FewShotPreset

from ...types import PathLike

__all__ = ["load_split", "make_sampler"]


def load_split(
    preset: FewShotPreset,
    data_dir: PathLike,
    split: str,
    *,
    split_by: str = "character",
    split_seed: int = 0,
    cache_dir: PathLike | None = None,
):
    """The ``split`` ("train", "val", "test") of the preset's dataset, read from ``data_dir``.

    Omniglot: ``split_by`` is "character" or "alphabet" and ``split_seed`` seeds the cut (see
    :mod:`maml_ext.experiments.fewshot`). Image folders: "class" or "group" (or "character" /
    "alphabet" for the same), and every class must hold ``shots + queries`` images. miniImageNet
    has fixed splits; both options are ignored.
    Missing or damaged data raises :class:`ConfigurationError` with the loader's explanation.
    """
    from maml_ext.tasks._data_errors import DatasetError

    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise ConfigurationError(f"data folder {data_dir} does not exist (--data-dir)")
    try:
        if preset.dataset == "folder":
            return _load_folder_split(preset, data_dir, split, split_by, split_seed, cache_dir)
        if preset.dataset == "omniglot":
            from maml_ext.tasks import Omniglot

            if split_by not in ("character", "alphabet"):
                raise ConfigurationError(
                    f"split_by: expected 'character' or 'alphabet', got {split_by!r}"
                )
            return Omniglot(
                data_dir,
                split,
                split_by=split_by,
                seed=split_seed,
                rotations=True,
                cache_dir=cache_dir,
            )
        from maml_ext.tasks import MiniImageNet

        return MiniImageNet(data_dir, split, cache_dir=cache_dir)
    except (FileNotFoundError, DatasetError) as error:
        raise ConfigurationError(
            f"cannot load {preset.dataset} {split!r} from {data_dir}: {error}"
        ) from error


# Image folders split by class or by top-level folder; Omniglot's names for the same two rules
# (the run's default is "character") are accepted.
_FOLDER_SPLIT_BY = {"class": "class", "group": "group", "character": "class", "alphabet": "group"}


def _load_folder_split(preset, data_dir, split, split_by, split_seed, cache_dir):
    """:class:`ImageFolderTasks` of the split, checked to have ``shots + queries`` images in every
    class (all short classes named, before any training)."""
    from maml_ext.tasks import ImageFolderTasks

    if split_by not in _FOLDER_SPLIT_BY:
        raise ConfigurationError(f"split_by: expected 'class' or 'group', got {split_by!r}")
    # The channels are fixed once training has seen the data; ResNet-12 takes RGB.
    channels = preset.channels or (3 if preset.backbone == "resnet12" else None)
    data = ImageFolderTasks(
        data_dir,
        preset.image_size,
        split,
        split_by=_FOLDER_SPLIT_BY[split_by],
        seed=split_seed,
        channels=channels,
        cache_dir=cache_dir,
    )
    data.require_images_per_class(
        preset.shots + preset.queries, f"{preset.shots} shot(s) + {preset.queries} queries"
    )
    return data


def make_sampler(dataset, preset: FewShotPreset, meta_batch: int, seed: int, device):
    """A :class:`~maml_ext.tasks.TaskSampler` of the preset's task shape over ``dataset``."""
    from maml_ext.tasks import TaskSampler

    try:
        return TaskSampler(
            dataset,
            ways=preset.ways,
            shots=preset.shots,
            queries=preset.queries,
            meta_batch=meta_batch,
            seed=seed,
            device=device,
        )
    except ValueError as error:
        split = getattr(dataset, "split", "?")
        raise ConfigurationError(
            f"the {split!r} split cannot give {preset.name} tasks: {error}"
        ) from error

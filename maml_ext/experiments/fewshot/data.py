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
    :mod:`maml_ext.experiments.fewshot`). miniImageNet has fixed splits; both options are ignored.
    Missing or damaged data raises :class:`ConfigurationError` with the loader's explanation.
    """
    from maml_ext.tasks._data_errors import DatasetError

    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise ConfigurationError(f"data folder {data_dir} does not exist (--data-dir)")
    try:
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

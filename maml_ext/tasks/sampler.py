"""N-way K-shot task sampling from an image dataset held in memory, vectorised and reproducible.

A dataset the sampler can draw from exposes (:class:`Omniglot` and :class:`MiniImageNet` do):

- ``images``: a tensor ``[num_images, C, H, W]`` of any dtype (e.g. uint8 to save memory), or
  ``[num_images, *features]`` of any other sample shape (:class:`TensorTasks`: tabular rows);
- ``labels``: an int64 tensor ``[num_images]``, the base class of each image, ``0 .. B-1``;
- optionally ``rotations`` (int, default 1): class ``c`` is base class ``c // rotations`` turned by
  ``torch.rot90(image, c % rotations, dims=(-2, -1))``, so there are ``B * rotations`` classes;
- optionally ``prepare_batch(images) -> Tensor``: turns gathered stored images into the model's
  float input (e.g. uint8 to normalised float); default: unchanged;
- optionally ``class_name(class_id) -> str``, used in error messages.
"""

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

from ._random import task_generator

__all__ = ["TaskBatch", "TaskSampler"]


class TaskBatch(NamedTuple):
    """A meta-batch of ``T`` classification tasks, N ways, K shots and Q queries per class.

    Images of a task are ordered class by class: ``support_x[t, j*K : (j+1)*K]`` are the K images
    labelled ``j``. ``classes[t, j]`` is the dataset class that label ``j`` stands for in task
    ``t``; the assignment is a fresh random permutation for every task.
    """

    support_x: torch.Tensor  # [T, N*K, C, H, W]
    support_y: torch.Tensor  # [T, N*K] int64 in 0..N-1
    query_x: torch.Tensor  # [T, N*Q, C, H, W]
    query_y: torch.Tensor  # [T, N*Q] int64 in 0..N-1
    classes: torch.Tensor  # [T, N] int64 dataset class ids

    def to(
        self,
        device: None | str | torch.device = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> "TaskBatch":
        """The same batch on ``device``, with the images (not the labels) converted to ``dtype``."""

        def move(tensor: torch.Tensor, as_dtype: torch.dtype | None = None) -> torch.Tensor:
            return tensor.to(device=device, dtype=as_dtype, non_blocking=non_blocking)

        return TaskBatch(
            support_x=move(self.support_x, dtype),
            support_y=move(self.support_y),
            query_x=move(self.query_x, dtype),
            query_y=move(self.query_y),
            classes=move(self.classes),
        )

    def pin_memory(self) -> "TaskBatch":
        """The same batch in page-locked memory, for asynchronous copies to the GPU."""
        return TaskBatch(*(tensor.pin_memory() for tensor in self))


class TaskSampler:
    """Draws meta-batches of N-way K-shot tasks from a dataset, from its own seeded generator.

    For each of the ``meta_batch`` tasks: ``ways`` distinct classes (rotated classes included,
    see the module docstring), in random order, which gives their labels 0..N-1; then
    ``shots + queries`` distinct images of each class, the first ``shots`` for the support set and
    the rest for the query set. All of it is a few tensor operations per batch, whatever N, K, Q
    and T are: random keys sorted per row choose classes and images, one indexing gathers them.

    Args:
        dataset: see the module docstring for what it must expose.
        ways, shots, queries: N, K and Q (``queries`` may be 0).
        meta_batch: T, tasks per batch.
        seed: an int for a reproducible stream, a CPU ``torch.Generator`` to draw from, or None
            for a nondeterministic seed. Draws happen on the CPU, so a seed gives the same tasks
            on every device.
        num_batches: the length of one pass of ``iter(sampler)``; default None: endless.
        device: where to keep the dataset's images and build batches (e.g. ``"cuda"``: the
            images are copied there once and each batch is gathered there); default: where the
            images are.
        pin_memory: return batches in page-locked memory (only for CPU batches, and only where
            CUDA is available; otherwise a warning says it is ignored).

    Raises:
        ValueError: when the dataset has fewer than ``ways`` classes, or a class has fewer than
            ``shots + queries`` images; the message says how many there are.
    """

    def __init__(
        self,
        dataset,
        *,
        ways: int,
        shots: int,
        queries: int,
        meta_batch: int,
        seed: None | int | torch.Generator = None,
        num_batches: int | None = None,
        device: None | str | torch.device = None,
        pin_memory: bool = False,
    ):
        for name, value, low in (
            ("ways", ways, 1),
            ("shots", shots, 1),
            ("queries", queries, 0),
            ("meta_batch", meta_batch, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int of at least {low}, got {value!r}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be non-negative or None, got {num_batches}")
        self.ways, self.shots, self.queries, self.meta_batch = ways, shots, queries, meta_batch
        self.num_batches = num_batches
        self.dataset = dataset

        images, labels = dataset.images, dataset.labels
        if images.dim() < 2 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"the dataset must have images [num_images, C, H, W] and labels [num_images] "
                f"(or images [num_images, *features] of another sample shape); "
                f"got images {tuple(images.shape)} and labels {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"the dataset's labels must be integers, got {labels.dtype}")
        self.rotations = int(getattr(dataset, "rotations", 1))
        if self.rotations > 1 and (images.dim() < 3 or images.shape[-1] != images.shape[-2]):
            raise ValueError(f"rotated classes need square images, got {tuple(images.shape[-2:])}")
        self._images = images if device is None else images.to(device)
        self._prepare = getattr(dataset, "prepare_batch", None)
        self._members, self._counts = _class_members(labels.cpu())
        self.num_classes = self._counts.shape[0] * self.rotations
        self._check_request()

        self._pin = pin_memory and self._images.device.type == "cpu"
        if self._pin and not torch.cuda.is_available():
            warnings.warn("pin_memory=True ignored: CUDA is not available", stacklevel=2)
            self._pin = False

        self.generator = task_generator(seed)
        self.batches_sampled = 0

    def _class_name(self, class_id: int) -> str:
        name_of = getattr(self.dataset, "class_name", None)
        return repr(name_of(class_id)) if callable(name_of) else f"class {class_id}"

    def _check_request(self) -> None:
        base_classes = self._counts.shape[0]
        if self.num_classes < self.ways:
            detail = f" ({base_classes} × {self.rotations} rotations)" if self.rotations > 1 else ""
            raise ValueError(
                f"{self.ways}-way tasks need {self.ways} classes, but the dataset has "
                f"{self.num_classes}{detail}"
            )
        needed = self.shots + self.queries
        short = torch.nonzero(self._counts < needed).flatten()
        if short.numel():
            smallest = int(short[self._counts[short].argmin()])
            raise ValueError(
                f"{self.shots}-shot tasks with {self.queries} queries need {needed} images per "
                f"class, but {short.numel()} of {base_classes} classes have fewer; the smallest, "
                f"{self._class_name(smallest * self.rotations)}, has "
                f"{int(self._counts[smallest])}"
            )

    def sample(self) -> TaskBatch:
        """The next meta-batch."""
        tasks, ways, per_class = self.meta_batch, self.ways, self.shots + self.queries
        generator = self.generator

        # Sorting random keys gives a uniformly random ordered subset per row: the classes of
        # each task, and their order is the label permutation.
        class_keys = torch.rand(tasks, self.num_classes, generator=generator)
        classes = class_keys.argsort(dim=1)[:, :ways]
        base, rotation = classes // self.rotations, classes % self.rotations

        # The same for images within each class; padding slots of smaller classes sort last.
        counts = self._counts[base]
        image_keys = torch.rand(tasks, ways, self._members.shape[1], generator=generator)
        image_keys.masked_fill_(torch.arange(self._members.shape[1]) >= counts[..., None], 2.0)
        picks = image_keys.argsort(dim=-1)[..., :per_class]
        image_index = self._members[base].gather(-1, picks)

        device = self._images.device
        x = self._images[image_index.flatten().to(device)]
        x = x.reshape(tasks, ways, per_class, *x.shape[1:])
        for turns in range(1, self.rotations):
            turned = (rotation == turns).to(device)
            if turned.any():
                x[turned] = torch.rot90(x[turned], turns, dims=(-2, -1))

        labels = torch.arange(ways, device=device)
        batch = TaskBatch(
            support_x=self._prepared(x[:, :, : self.shots]),
            support_y=labels.repeat_interleave(self.shots).expand(tasks, -1).contiguous(),
            query_x=self._prepared(x[:, :, self.shots :]),
            query_y=labels.repeat_interleave(self.queries).expand(tasks, -1).contiguous(),
            classes=classes.to(device),
        )
        self.batches_sampled += 1
        return batch.pin_memory() if self._pin else batch

    def _prepared(self, images: torch.Tensor) -> torch.Tensor:
        """``[T, N, k, C, H, W]`` to ``[T, N*k, C, H, W]`` model input."""
        flat = images.reshape(images.shape[0], -1, *images.shape[3:])
        return self._prepare(flat) if self._prepare is not None else flat

    def __iter__(self) -> Iterator[TaskBatch]:
        """``num_batches`` batches, or endless batches when ``num_batches`` is None."""
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            yield self.sample()
            produced += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless TaskSampler (num_batches=None) has no length")
        return self.num_batches

    def _config(self) -> dict:
        return {
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "meta_batch": self.meta_batch,
            "num_classes": self.num_classes,
        }

    def state_dict(self) -> dict:
        """The generator state and what it was used for, so that a resumed run draws the same
        tasks as an uninterrupted one."""
        return {
            "generator_state": self.generator.get_state(),
            "batches_sampled": self.batches_sampled,
            "config": self._config(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a state saved by :meth:`state_dict` of a sampler with the same settings."""
        saved = state_dict.get("config", self._config())
        if saved != self._config():
            raise ValueError(
                f"the state was saved by a sampler with {saved}, this one has {self._config()}; "
                f"its tasks would not continue the saved run"
            )
        self.generator.set_state(state_dict["generator_state"])
        self.batches_sampled = int(state_dict.get("batches_sampled", 0))

    def __repr__(self) -> str:
        return (
            f"TaskSampler(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"meta_batch={self.meta_batch}, classes={self.num_classes})"
        )


def _class_members(labels: torch.Tensor):
    """Image indices per class as a padded matrix ``[classes, most images]``, and the counts.

    Padding repeats the class's first image; the sampler never picks it (its keys sort last).
    """
    labels = labels.long()
    if labels.numel() == 0:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if int(labels.min()) < 0:
        raise ValueError(f"the dataset's labels must be non-negative, got {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(int(counts.max()))
    position = starts[:, None] + torch.minimum(slot[None, :], (counts - 1).clamp(min=0)[:, None])
    members = order[position.clamp(max=labels.numel() - 1)]
    return members, counts

"""Few-shot tasks from tensors already in memory: tabular rows, time-series windows, images.

:class:`TensorTasks` draws meta-batches in the task-batched layout :class:`MetaOptimizer` takes,
``[T, N, *sample shape]``, from one tensor of samples and either

- class labels (classification): N-way K-shot tasks exactly as :class:`TaskSampler` draws them
  from an image dataset (it is the sampler underneath), or
- a task id per sample (regression, or any problem whose tasks are given): each batch takes
  ``meta_batch`` distinct tasks, and from each ``shots`` support and ``queries`` query samples,
  drawn at random without replacement.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._random import task_generator
from .sampler import TaskBatch, TaskSampler, _class_members

__all__ = ["TensorTasks"]


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int of at least {low}, got {value!r}")


def _dense_ids(name: str, ids: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(0..G-1 index of each sample, the distinct original ids)`` of an integer id tensor."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(ids).__name__}")
    if ids.dim() != 1 or ids.shape[0] != samples:
        raise ValueError(
            f"{name}: expected shape [{samples}] (one per sample of x), got {list(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected integers, got {ids.dtype}")
    distinct, index = torch.unique(ids.cpu(), return_inverse=True)
    return index.to(torch.int64), distinct


class _Samples:
    """What :class:`TaskSampler` reads: the samples as ``images`` and dense ``labels``."""

    rotations = 1

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, names: torch.Tensor):
        self.images, self.labels, self._names = x, labels, names
        self.split = "tensor"

    def class_name(self, class_id: int) -> str:
        return f"label {self._names[class_id].item()}"


class TensorTasks:
    """Meta-batches of few-shot tasks drawn from in-memory tensors, from a seeded generator.

    Classification: ``TensorTasks(x, labels, ways=5, shots=1, queries=15, meta_batch=4)``.
    Regression: ``TensorTasks(x, y, task=task_ids, shots=10, queries=10, meta_batch=25)``.

    Args:
        x: ``[num_samples, *sample shape]``, any float dtype (e.g. ``[S, features]`` rows or
            ``[S, C, H, W]`` images).
        y: classification (``task`` None): integer class labels ``[num_samples]`` of any values;
            regression: targets ``[num_samples, *target shape]`` (``[num_samples]`` is taken as
            ``[num_samples, 1]``, the shape of a model with one output).
        task: regression only: an integer task id per sample ``[num_samples]``.
        ways: classification only: N classes per task.
        shots, queries: support and query samples per class (classification) or per task.
        meta_batch: T tasks per batch; in regression at most the number of tasks (each batch's
            tasks are distinct).
        seed: an int, a CPU ``torch.Generator``, or None (nondeterministic).
        num_batches: the length of ``iter(tasks)``; None: endless.
        device: where batches are built (the samples are copied there once).

    ``sample()`` returns a :class:`TaskBatch`: ``support_x [T, N*K | K, *sample shape]``,
    ``support_y [T, N*K]`` labels 0..N-1 or ``[T, K, *target shape]`` targets, the same for the
    query set, and ``classes [T, N]``, the original labels of each task's classes (classification)
    or ``[T, 1]``, the task id of each task (regression). Batches keep the dtypes of ``x`` and
    ``y`` (``TaskBatch.to(dtype=...)`` converts the inputs only).

    Raises:
        ValueError: shapes that do not match, or a class / task with fewer than
            ``shots + queries`` samples (named), or too few classes / tasks for a batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        task: torch.Tensor | None = None,
        ways: int | None = None,
        shots: int,
        queries: int,
        meta_batch: int,
        seed: None | int | torch.Generator = None,
        num_batches: int | None = None,
        device: None | str | torch.device = None,
    ):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            found = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor [num_samples, *sample shape], got {found}")
        if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
            found = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"y: expected a tensor with {x.shape[0]} rows (one per sample of x), got {found}"
            )
        _check_count("shots", shots, 1)
        _check_count("queries", queries, 0)
        _check_count("meta_batch", meta_batch, 1)
        self.shots, self.queries, self.meta_batch = shots, queries, meta_batch
        self.mode = "classification" if task is None else "regression"
        if task is None:
            if ways is None:
                raise ValueError("ways: classification tasks (no task ids given) need ways=N")
            _check_count("ways", ways, 1)
            labels, self.class_ids = _dense_ids("y", y, x.shape[0])
            try:
                self._sampler = TaskSampler(
                    _Samples(x, labels, self.class_ids),
                    ways=ways,
                    shots=shots,
                    queries=queries,
                    meta_batch=meta_batch,
                    seed=seed,
                    num_batches=num_batches,
                    device=device,
                )
            except ValueError as error:
                raise ValueError(f"TensorTasks: {error}") from None
            self.ways = ways
            self.generator = self._sampler.generator
            return

        if ways is not None:
            raise ValueError("ways: regression tasks (task ids given) take no ways")
        if num_batches is not None:
            _check_count("num_batches", num_batches, 0)
        if not y.dtype.is_floating_point:
            raise ValueError(f"y: regression targets must be floating point, got {y.dtype}")
        task_index, self.task_ids = _dense_ids("task", task, x.shape[0])
        self._members, counts = _class_members(task_index)
        needed = shots + queries
        short = (counts < needed).nonzero().flatten().tolist()
        if short:
            listed = ", ".join(f"{self.task_ids[i].item()} ({int(counts[i])})" for i in short[:10])
            more = f" and {len(short) - 10} more" if len(short) > 10 else ""
            raise ValueError(
                f"task: {shots} shots + {queries} queries need {needed} samples per task, but "
                f"{len(short)} of {counts.numel()} tasks have fewer: {listed}{more} "
                f"(task id (samples))"
            )
        if meta_batch > counts.numel():
            raise ValueError(
                f"meta_batch: {meta_batch} distinct tasks per batch, but there are "
                f"only {counts.numel()} task ids"
            )
        self.ways, self.num_batches = None, num_batches
        self._counts = counts
        self._x = x if device is None else x.to(device)
        self._y = (y[:, None] if y.dim() == 1 else y).to(self._x.device)
        self.generator = task_generator(seed)

    @property
    def num_tasks(self) -> int | None:
        """Distinct task ids (regression); None for classification."""
        return None if self.mode == "classification" else self._counts.numel()

    def sample(self) -> TaskBatch:
        """The next meta-batch."""
        if self.mode == "classification":
            batch = self._sampler.sample()
            original = self.class_ids.to(batch.classes.device)[batch.classes]
            return batch._replace(classes=original)
        tasks, per_task, generator = self.meta_batch, self.shots + self.queries, self.generator
        # As TaskSampler: sorted random keys give random distinct tasks, then random distinct
        # samples of each task (the padding slots of smaller tasks sort last).
        chosen = torch.rand(self._counts.numel(), generator=generator).argsort()[:tasks]
        counts = self._counts[chosen]
        keys = torch.rand(tasks, self._members.shape[1], generator=generator)
        keys.masked_fill_(torch.arange(self._members.shape[1]) >= counts[:, None], 2.0)
        picks = keys.argsort(dim=-1)[:, :per_task]
        index = self._members[chosen].gather(-1, picks).to(self._x.device)
        x, y = self._x[index], self._y[index]
        return TaskBatch(
            support_x=x[:, : self.shots],
            support_y=y[:, : self.shots],
            query_x=x[:, self.shots :],
            query_y=y[:, self.shots :],
            classes=self.task_ids[chosen].to(self._x.device)[:, None],
        )

    def __iter__(self) -> Iterator[TaskBatch]:
        limit = self._sampler.num_batches if self.mode == "classification" else self.num_batches
        produced = 0
        while limit is None or produced < limit:
            yield self.sample()
            produced += 1

    def __repr__(self) -> str:
        if self.mode == "classification":
            shape = f"ways={self.ways}, classes={self.class_ids.numel()}"
        else:
            shape = f"tasks={self.num_tasks}"
        return (
            f"TensorTasks({self.mode}, {shape}, shots={self.shots}, queries={self.queries}, "
            f"meta_batch={self.meta_batch})"
        )

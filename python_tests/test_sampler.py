"""TaskSampler: shapes, labels, reproducibility and errors, on real Omniglot and on toy datasets."""

import io
import itertools
import types
import warnings

import pytest
import torch

from maml_ext.tasks import Omniglot, TaskBatch, TaskSampler


@pytest.fixture(scope="session")
def omniglot_train(omniglot_root, tmp_path_factory) -> Omniglot:
    # The same cache folder as test_omniglot.py, so the PNGs are decoded once per session.
    cache = tmp_path_factory.getbasetemp() / "omniglot-cache"
    return Omniglot(omniglot_root, "train", cache_dir=cache)


def toy_dataset(class_sizes, rotations=1, side=4):
    """Images whose every pixel holds the image's index, so a batch says where it came from."""
    labels = torch.repeat_interleave(torch.arange(len(class_sizes)), torch.tensor(class_sizes))
    count = labels.numel()
    images = (
        torch.arange(count, dtype=torch.float32)
        .reshape(-1, 1, 1, 1)
        .expand(count, 1, side, side)
        .contiguous()
    )
    return types.SimpleNamespace(images=images, labels=labels, rotations=rotations)


def source_index(batch_images: torch.Tensor) -> torch.Tensor:
    """The dataset index of each image of a toy batch ``[..., C, H, W]``."""
    return batch_images[..., 0, 0, 0].long()


def assert_batches_equal(first: TaskBatch, second: TaskBatch) -> None:
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Omniglot


@pytest.mark.parametrize(
    "ways, shots, queries, tasks", [(5, 1, 15, 4), (20, 1, 5, 2), (5, 5, 15, 3)]
)
def test_batch_shapes_and_labels(omniglot_train, ways, shots, queries, tasks):
    sampler = TaskSampler(
        omniglot_train, ways=ways, shots=shots, queries=queries, meta_batch=tasks, seed=0
    )
    batch = sampler.sample()
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (tasks, ways * shots, 1, 28, 28)
    assert batch.query_x.shape == (tasks, ways * queries, 1, 28, 28)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_y.dtype == batch.query_y.dtype == torch.int64
    expected_support = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    expected_query = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    assert torch.equal(batch.support_y, expected_support)
    assert torch.equal(batch.query_y, expected_query)
    assert batch.classes.shape == (tasks, ways)
    assert int(batch.classes.min()) >= 0 and int(batch.classes.max()) < sampler.num_classes
    for task_classes in batch.classes:
        assert task_classes.unique().numel() == ways


def test_images_come_from_their_class_turned_by_its_rotation(omniglot_train):
    sampler = TaskSampler(omniglot_train, ways=5, shots=2, queries=3, meta_batch=8, seed=1)
    batch = sampler.sample()
    images, labels = omniglot_train.images, omniglot_train.labels
    assert (batch.classes % 4 != 0).any()  # some rotated classes were drawn
    for task in range(8):
        for label in range(5):
            class_id = int(batch.classes[task, label])
            candidates = torch.rot90(images[labels == class_id // 4], class_id % 4, dims=(-2, -1))
            drawn = torch.cat(
                [
                    batch.support_x[task, batch.support_y[task] == label],
                    batch.query_x[task, batch.query_y[task] == label],
                ]
            )
            # Each drawn image equals exactly one drawing of the class: distinct drawings.
            matches = (drawn[:, None] == candidates[None]).flatten(2).all(dim=2)
            assert torch.all(matches.sum(dim=1) == 1)
            assert matches.float().argmax(dim=1).unique().numel() == 5


def test_labels_are_a_fresh_permutation_per_task(omniglot_train):
    batch = TaskSampler(omniglot_train, ways=5, shots=1, queries=1, meta_batch=50, seed=0).sample()
    sorted_tasks = sum(bool(torch.all(row[:-1] < row[1:])) for row in batch.classes)
    assert sorted_tasks < 10  # 1 in 120 for random orders
    assert batch.classes[:, 0].unique().numel() > 25  # label 0 stands for many classes


def test_same_seed_same_tasks_other_seed_other_tasks(omniglot_train):
    def batches(seed):
        sampler = TaskSampler(omniglot_train, ways=5, shots=1, queries=5, meta_batch=4, seed=seed)
        return [sampler.sample() for _ in range(3)]

    first, again, other = batches(7), batches(7), batches(8)
    for a, b in zip(first, again):
        assert_batches_equal(a, b)
    assert not torch.equal(first[0].classes, other[0].classes)
    assert not torch.equal(first[0].support_x, first[1].support_x)


def test_state_dict_resumes_with_the_same_next_batch(omniglot_train):
    settings = dict(ways=5, shots=1, queries=5, meta_batch=4)
    running = TaskSampler(omniglot_train, seed=3, **settings)
    running.sample(), running.sample()
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)  # as a training checkpoint would
    expected = running.sample()

    resumed = TaskSampler(omniglot_train, seed=99, **settings)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.batches_sampled == 2
    assert_batches_equal(resumed.sample(), expected)
    assert_batches_equal(resumed.sample(), running.sample())

    other = TaskSampler(omniglot_train, seed=3, **{**settings, "ways": 20})
    with pytest.raises(ValueError, match="'ways': 5.*'ways': 20"):
        other.load_state_dict(running.state_dict())


def test_too_many_ways_says_how_many_classes_there_are(omniglot_train):
    assert omniglot_train.num_classes == 164 * 4
    with pytest.raises(
        ValueError,
        match=r"700-way tasks need 700 classes, but the dataset has "
        r"656 \(164 × 4 rotations\)",
    ):
        TaskSampler(omniglot_train, ways=700, shots=1, queries=1, meta_batch=1)


def test_too_many_shots_says_how_many_images_there_are(omniglot_train):
    with pytest.raises(
        ValueError,
        match=r"5-shot tasks with 16 queries need 21 images per class, "
        r"but 164 of 164 classes have fewer; .* has 20",
    ):
        TaskSampler(omniglot_train, ways=5, shots=5, queries=16, meta_batch=1)


# --------------------------------------------------------------------------------------------
# Toy datasets


def test_classes_of_different_sizes_use_every_image_and_never_padding():
    data = toy_dataset([3, 7, 4, 3])  # the padded slots of the small classes must never appear
    sampler = TaskSampler(data, ways=4, shots=2, queries=1, meta_batch=16, seed=0)
    seen = set()
    for batch in itertools.islice(sampler, 20):
        support, query = source_index(batch.support_x), source_index(batch.query_x)
        for task in range(16):
            for label in range(4):
                drawn = torch.cat(
                    [
                        support[task, batch.support_y[task] == label],
                        query[task, batch.query_y[task] == label],
                    ]
                )
                assert drawn.unique().numel() == 3
                assert torch.all(data.labels[drawn] == batch.classes[task, label])
                seen.update(drawn.tolist())
    assert seen == set(range(17))


def test_rotated_classes_of_a_toy_dataset():
    data = toy_dataset([2, 2], rotations=4, side=3)
    data.images = torch.arange(4 * 9, dtype=torch.float32).reshape(4, 1, 3, 3)
    batch = TaskSampler(data, ways=8, shots=2, queries=0, meta_batch=1, seed=0).sample()
    assert batch.query_x.shape == (1, 0, 1, 3, 3)
    for label, class_id in enumerate(batch.classes[0].tolist()):
        originals = torch.rot90(
            data.images[2 * (class_id // 4) : 2 * (class_id // 4) + 2], class_id % 4, dims=(-2, -1)
        )
        drawn = batch.support_x[0, 2 * label : 2 * label + 2]
        assert {tuple(x.flatten().tolist()) for x in drawn} == {
            tuple(x.flatten().tolist()) for x in originals
        }


def test_prepare_batch_is_applied():
    data = toy_dataset([4, 4])
    data.images = data.images.to(torch.uint8)
    data.prepare_batch = lambda images: images.float() / 2
    batch = TaskSampler(data, ways=2, shots=1, queries=1, meta_batch=2, seed=0).sample()
    assert batch.support_x.dtype == torch.float32
    assert torch.all(batch.support_x * 2 == batch.support_x.round() * 2)
    assert torch.all(batch.support_x <= 3.5)


def test_iteration_length_and_endless_stream():
    data = toy_dataset([5, 5, 5])
    finite = TaskSampler(data, ways=3, shots=1, queries=1, meta_batch=2, seed=4, num_batches=3)
    assert len(finite) == 3 and len(list(finite)) == 3 and finite.batches_sampled == 3
    fresh = TaskSampler(data, ways=3, shots=1, queries=1, meta_batch=2, seed=4)
    first_of_iter = next(iter(TaskSampler(data, ways=3, shots=1, queries=1, meta_batch=2, seed=4)))
    assert_batches_equal(first_of_iter, fresh.sample())
    assert len(list(itertools.islice(fresh, 10))) == 10
    with pytest.raises(TypeError, match="endless"):
        len(fresh)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 0}, "ways must be an int of at least 1, got 0"),
        ({"shots": 0}, "shots must be an int of at least 1"),
        ({"queries": -1}, "queries must be an int of at least 0"),
        ({"meta_batch": 2.5}, "meta_batch must be an int"),
    ],
)
def test_bad_settings(kwargs, message):
    settings = {**dict(ways=2, shots=1, queries=1, meta_batch=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        TaskSampler(toy_dataset([3, 3]), **settings)


def test_dataset_shape_is_checked():
    data = toy_dataset([3, 3])
    data.labels = data.labels[:-1]
    with pytest.raises(ValueError, match=r"images \[num_images, C, H, W\] and labels"):
        TaskSampler(data, ways=2, shots=1, queries=1, meta_batch=1)


def test_batch_to_converts_images_not_labels():
    batch = TaskSampler(
        toy_dataset([3, 3]), ways=2, shots=1, queries=1, meta_batch=1, seed=0
    ).sample()
    double = batch.to(dtype=torch.float64)
    assert double.support_x.dtype == double.query_x.dtype == torch.float64
    assert double.support_y.dtype == double.classes.dtype == torch.int64
    assert torch.equal(double.support_x.float(), batch.support_x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the warning where CUDA is absent")
def test_pin_memory_without_cuda_warns_and_is_ignored():
    with pytest.warns(UserWarning, match="pin_memory=True ignored: CUDA is not available"):
        sampler = TaskSampler(
            toy_dataset([3, 3]), ways=2, shots=1, queries=1, meta_batch=1, pin_memory=True
        )
    assert not sampler.sample().support_x.is_pinned()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_batches():
    data = toy_dataset([4, 4, 4])
    settings = dict(ways=3, shots=2, queries=2, meta_batch=3, seed=5)
    on_cpu = TaskSampler(data, **settings).sample()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pinned = TaskSampler(data, pin_memory=True, **settings).sample()
    assert pinned.support_x.is_pinned()
    on_gpu = TaskSampler(data, device="cuda", **settings).sample()
    assert on_gpu.support_x.is_cuda and on_gpu.query_y.is_cuda
    assert_batches_equal(on_gpu.to("cpu"), on_cpu)
    moved = pinned.to("cuda", non_blocking=True)
    assert_batches_equal(moved.to("cpu"), on_cpu)

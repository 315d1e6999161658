"""TensorTasks: few-shot meta-batches from in-memory tensors, for classification (labels) and
regression (a task id per sample), checked sample by sample against the tensors they came from."""

import pytest
import torch

import maml_ext
from maml_ext.tasks import TaskBatch, TensorTasks


def _row_index(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The index in ``x`` of each of ``rows`` (every row of x is distinct)."""
    matches = (rows.flatten(1)[:, None] == x.flatten(1)[None]).all(-1)
    assert torch.all(matches.sum(1) == 1)
    return matches.float().argmax(1)


def test_classification_tasks_are_n_way_k_shot_of_the_given_labels(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(90, 6, generator=generator)
    labels = torch.tensor([3, 17, -5, 40, 8, 11]).repeat_interleave(15)[torch.randperm(90)]
    tasks = TensorTasks(x, labels, ways=4, shots=2, queries=3, meta_batch=5, seed=seed)
    batch = tasks.sample()
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (5, 8, 6) and batch.query_x.shape == (5, 12, 6)
    assert torch.equal(batch.support_y[0], torch.arange(4).repeat_interleave(2))
    assert torch.equal(batch.query_y[0], torch.arange(4).repeat_interleave(3))
    for t in range(5):
        assert batch.classes[t].unique().numel() == 4
        assert set(batch.classes[t].tolist()) <= set(labels.tolist())
        support = _row_index(x, batch.support_x[t])
        query = _row_index(x, batch.query_x[t])
        assert torch.cat([support, query]).unique().numel() == 20  # no sample twice
        assert torch.equal(labels[support], batch.classes[t][batch.support_y[t]])
        assert torch.equal(labels[query], batch.classes[t][batch.query_y[t]])
    again = TensorTasks(x, labels, ways=4, shots=2, queries=3, meta_batch=5, seed=seed).sample()
    assert all(torch.equal(a, b) for a, b in zip(batch, again))


def test_classification_of_images_and_its_errors():
    x = torch.rand(24, 1, 5, 5)
    labels = torch.arange(24) % 6
    batch = TensorTasks(x, labels, ways=3, shots=1, queries=2, meta_batch=2, seed=0).sample()
    assert batch.support_x.shape == (2, 3, 1, 5, 5) and batch.query_x.shape == (2, 6, 1, 5, 5)
    short = torch.cat([labels, torch.tensor([9, 9])])
    with pytest.raises(ValueError, match=r"need 4 images per class.*'label 9', has 2"):
        TensorTasks(torch.rand(26, 3), short, ways=2, shots=1, queries=3, meta_batch=1)
    with pytest.raises(ValueError, match="7-way tasks need 7 classes"):
        TensorTasks(x, labels, ways=7, shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match="ways: classification"):
        TensorTasks(x, labels, shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match="y: expected integers"):
        TensorTasks(x, labels.double(), ways=2, shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match=r"y: expected a tensor with 24 rows"):
        TensorTasks(x, labels[:-1], ways=2, shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match=r"x: expected a tensor \[num_samples"):
        TensorTasks(torch.rand(24), labels, ways=2, shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match="shots: expected an int of at least 1"):
        TensorTasks(x, labels, ways=2, shots=0, queries=1, meta_batch=1)


def test_regression_tasks_split_each_tasks_samples_into_support_and_query(seed):
    generator = torch.Generator().manual_seed(seed)
    task_ids = torch.tensor([7, 2, 9, 4, 100]).repeat_interleave(torch.tensor([12, 9, 15, 8, 10]))
    order = torch.randperm(task_ids.numel(), generator=generator)
    task_ids = task_ids[order]
    x = torch.randn(task_ids.numel(), 3, generator=generator)
    y = torch.randn(task_ids.numel(), generator=generator)
    tasks = TensorTasks(x, y, task=task_ids, shots=3, queries=5, meta_batch=4, seed=seed)
    assert tasks.num_tasks == 5
    drawn = torch.zeros(task_ids.numel(), dtype=torch.bool)
    for _ in range(30):
        batch = tasks.sample()
        assert batch.support_x.shape == (4, 3, 3) and batch.support_y.shape == (4, 3, 1)
        assert batch.query_x.shape == (4, 5, 3) and batch.query_y.shape == (4, 5, 1)
        assert batch.classes.shape == (4, 1) and batch.classes.unique().numel() == 4
        for t in range(4):
            rows = _row_index(x, torch.cat([batch.support_x[t], batch.query_x[t]]))
            assert rows.unique().numel() == 8
            assert torch.all(task_ids[rows] == batch.classes[t, 0])
            assert torch.equal(y[rows, None], torch.cat([batch.support_y[t], batch.query_y[t]]))
            drawn[rows] = True
    assert bool(drawn.all())  # every sample of every task is reachable
    first, second = (
        TensorTasks(x, y, task=task_ids, shots=3, queries=5, meta_batch=4, seed=seed).sample()
        for _ in range(2)
    )
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    three = TensorTasks(x, y, task=task_ids, shots=1, queries=1, meta_batch=1, num_batches=3)
    assert len(list(three)) == 3


def test_regression_errors_name_the_short_tasks():
    task_ids = torch.tensor([0] * 6 + [5] * 2 + [8] * 3)
    x, y = torch.randn(11, 2), torch.randn(11, 2)
    with pytest.raises(ValueError, match=r"2 of 3 tasks have fewer: 5 \(2\), 8 \(3\)"):
        TensorTasks(x, y, task=task_ids, shots=2, queries=2, meta_batch=1)
    with pytest.raises(ValueError, match="meta_batch: 4 distinct tasks per batch, but there are"):
        TensorTasks(x, y, task=task_ids, shots=1, queries=1, meta_batch=4)
    with pytest.raises(ValueError, match="y: regression targets must be floating point"):
        TensorTasks(x, y.long(), task=task_ids, shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match=r"task: expected shape \[11\]"):
        TensorTasks(x, y, task=task_ids[:-1], shots=1, queries=1, meta_batch=1)
    with pytest.raises(ValueError, match="ways: regression"):
        TensorTasks(x, y, task=task_ids, ways=2, shots=1, queries=1, meta_batch=1)
    batch = TensorTasks(x, y, task=task_ids, shots=1, queries=1, meta_batch=3, seed=0).sample()
    assert batch.support_y.shape == (3, 1, 2)  # a target shape is kept as given


def test_meta_training_on_tensor_regression_tasks_lowers_the_adapted_loss():
    # Tasks y = a * x + b with a, b per task: after meta-training, three inner steps on 5 support
    # points fit unseen tasks far better than before meta-training, or than no adaptation.
    generator = torch.Generator().manual_seed(0)
    tasks, per_task = 60, 20
    a, b = torch.randn(tasks, generator=generator), torch.randn(tasks, generator=generator)
    x = torch.rand(tasks * per_task, 1, generator=generator) * 4 - 2
    task_ids = torch.arange(tasks).repeat_interleave(per_task)
    y = a[task_ids] * x[:, 0] + b[task_ids]
    train = TensorTasks(
        x[: 50 * per_task],
        y[: 50 * per_task],
        task=task_ids[: 50 * per_task],
        shots=5,
        queries=10,
        meta_batch=10,
        seed=1,
    )
    test = TensorTasks(
        x[50 * per_task :],
        y[50 * per_task :],
        task=task_ids[50 * per_task :],
        shots=5,
        queries=10,
        meta_batch=10,
        seed=2,
    ).sample()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    meta = maml_ext.MetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        inner_lr=0.1,
        inner_steps=3,
        loss="mse",
    )

    def test_loss():
        adapted = meta.adapt(test.support_x, test.support_y)
        return float(((meta.predict(adapted, test.query_x) - test.query_y) ** 2).mean())

    before = test_loss()
    for _ in range(150):
        meta.step(*train.sample()[:4])
    with torch.no_grad():
        unadapted = float(((model(test.query_x) - test.query_y) ** 2).mean())
    after = test_loss()
    assert after < 0.5 * min(before, unadapted), (after, before, unadapted)

"""Few-shot presets, training with exact resume, the test protocol and the command line.

Runs use the real Omniglot images (the ``omniglot_root`` fixture) with tiny settings: a narrow
network, 2 tasks per meta-batch, 2 queries per class, a few iterations, one CPU thread.
"""

import dataclasses
import json
import math

import pytest
import torch

from maml_ext import MetaOptimizer
from maml_ext.experiments import fewshot
from maml_ext.experiments.fewshot import load_checkpoint, read_checkpoint
from maml_ext.experiments.presets import PRESETS, ConfigurationError, FewShotPreset, get_preset
from maml_ext.program import compile_program
from maml_ext.tasks import TaskSampler

TINY = PRESETS["omniglot-5w1s"].with_overrides(filters=8, queries=2, meta_batch=2)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # Deterministic and fast on a shared 2-core machine: two threads there can be 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fewshot_cache(tmp_path_factory):
    # The same folder test_omniglot.py uses, so a full run decodes the archives once.
    return tmp_path_factory.getbasetemp() / "omniglot-cache"


def _train(root, cache, out, **options):
    settings = dict(
        iterations=4,
        backend="reference",
        checkpoint_every=2,
        validate_every=0,
        val_tasks=5,
        log_every=1,
        cache_dir=cache,
        device="cpu",
        progress=False,
        verbose=False,
        cpu_threads=1,
    )
    settings.update(options)
    return fewshot.train_fewshot(TINY, root, out, **settings)


def _weights(path):
    return read_checkpoint(path)["meta_optimizer"]


def _assert_same_weights(first, second):
    for part in ("model", "outer_optimizer"):
        a, b = first[part], second[part]
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert len(flat_a) == len(flat_b) > 0
        for (key, x), (_, y) in zip(flat_a, flat_b):
            assert torch.equal(x, y), f"{part}: {key}"


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [
            item for key in sorted(tree, key=str) for item in _tensors(tree[key], f"{prefix}/{key}")
        ]
    return []


def _log_without_times(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def straight_run(omniglot_root, fewshot_cache, tmp_path_factory):
    """4 iterations in one go: the reference for the resume tests and the run evaluated below."""
    out = tmp_path_factory.mktemp("straight")
    summary = _train(omniglot_root, fewshot_cache, out)
    return out, summary


# --- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, ways, shots, meta_batch, steps, lr, filters, paper_eval",
    [
        ("omniglot-5w1s", 5, 1, 32, 1, 0.4, 64, 3),
        ("omniglot-5w5s", 5, 5, 32, 1, 0.4, 64, 3),
        ("omniglot-20w1s", 20, 1, 16, 5, 0.1, 64, 5),
        ("omniglot-20w5s", 20, 5, 16, 5, 0.1, 64, 5),
        ("miniimagenet-5w1s", 5, 1, 4, 5, 0.01, 32, 10),
        ("miniimagenet-5w5s", 5, 5, 2, 5, 0.01, 32, 10),
    ],
)
def test_presets_hold_the_papers_settings(
    name, ways, shots, meta_batch, steps, lr, filters, paper_eval
):
    preset = get_preset(name)
    assert (
        preset.ways,
        preset.shots,
        preset.meta_batch,
        preset.inner_steps,
        preset.inner_lr,
        preset.filters,
        preset.paper_eval_steps,
    ) == (ways, shots, meta_batch, steps, lr, filters, paper_eval)
    assert preset.queries == 15 and preset.outer_lr == 1e-3 and preset.iterations == 60000
    assert not preset.first_order
    notes = " ".join(preset.notes)
    assert "reference code" in notes and "query" in notes.lower()
    model = preset.build_model()
    x = torch.rand(3, *preset.image_shape)
    assert model(x).shape == (3, ways)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 4 and not any(m.track_running_stats for m in bn)
    compile_program(model)  # every layer is one the fused backend runs
    linear = model[-1]
    assert linear.in_features == (64 if name.startswith("omniglot") else 32 * 5 * 5)


def test_presets_are_frozen_and_validated():
    preset = get_preset("omniglot-5w1s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.meta_batch = 2
    assert preset.with_overrides(first_order=True, meta_batch=None).first_order
    with pytest.raises(ConfigurationError, match="meta_batch"):
        preset.with_overrides(meta_batch=0)
    with pytest.raises(ConfigurationError, match="unknown preset settings"):
        preset.with_overrides(learning_rate=1)
    with pytest.raises(ConfigurationError, match="omniglot-5w1s"):
        get_preset("omniglot-5w2s")
    assert FewShotPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


# --- training, checkpoints, resume -----------------------------------------------------------


def test_training_writes_logs_curve_and_checkpoint(straight_run):
    out, summary = straight_run
    for name in ("checkpoint.pt", "best.pt", "log.csv", "log.jsonl", "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows if row["phase"] == "train"] == [1, 2, 3, 4]
    [val] = [row for row in rows if row["phase"] == "val"]
    assert val["iteration"] == 4 and 0 <= val["accuracy"] <= 1 and val["accuracy_ci95"] > 0
    assert all(0 <= row["accuracy"] <= 1 and math.isfinite(row["loss"]) for row in rows)
    csv_lines = (out / "log.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(fewshot.LOG_COLUMNS) and len(csv_lines) == len(rows) + 1
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["iteration"] == 4 and state["settings"]["seed"] == 0
    assert FewShotPreset.from_dict(state["preset"]) == TINY
    assert state["sampler"]["batches_sampled"] == 4 and "torch" in state["rng"]
    assert summary["finished"] and summary["backend"] == "reference"


def test_resume_is_bit_for_bit(straight_run, omniglot_root, fewshot_cache, tmp_path):
    straight, _ = straight_run
    _train(omniglot_root, fewshot_cache, tmp_path, stop_after=2)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2
    fewshot.train_fewshot(
        TINY, None, tmp_path, resume=True, progress=False, verbose=False, cpu_threads=1
    )
    _assert_same_weights(_weights(straight / "checkpoint.pt"), _weights(tmp_path / "checkpoint.pt"))
    assert _log_without_times(tmp_path / "log.jsonl") == _log_without_times(straight / "log.jsonl")


def test_a_crash_while_checkpointing_loses_only_the_last_iterations(
    straight_run, omniglot_root, fewshot_cache, tmp_path, monkeypatch
):
    straight, _ = straight_run
    real_save = torch.save

    def crash_at_iteration_4(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            handle.truncate(handle.tell() // 2)
            raise KeyboardInterrupt("killed while writing the checkpoint (simulated)")

    monkeypatch.setattr(torch, "save", crash_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        _train(omniglot_root, fewshot_cache, tmp_path)
    monkeypatch.undo()
    # The checkpoint of iteration 2 is intact; the log ran ahead of it.
    assert read_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2
    assert max(row["iteration"] for row in _log_without_times(tmp_path / "log.jsonl")) == 4

    with pytest.raises(ConfigurationError, match="--resume"):
        _train(omniglot_root, fewshot_cache, tmp_path)  # would overwrite the run
    with pytest.raises(ConfigurationError, match="seed"):
        fewshot.train_fewshot(
            TINY, None, tmp_path, resume=True, seed=1, progress=False, verbose=False
        )
    fewshot.train_fewshot(
        TINY, None, tmp_path, resume=True, progress=False, verbose=False, cpu_threads=1
    )
    _assert_same_weights(_weights(straight / "checkpoint.pt"), _weights(tmp_path / "checkpoint.pt"))
    assert _log_without_times(tmp_path / "log.jsonl") == _log_without_times(straight / "log.jsonl")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_without_a_checkpoint_and_missing_data_error_clearly(omniglot_root, tmp_path):
    with pytest.raises(ConfigurationError, match="no checkpoint at"):
        fewshot.train_fewshot("omniglot-5w1s", omniglot_root, tmp_path, resume=True)
    with pytest.raises(ConfigurationError, match="needs --data-dir"):
        fewshot.train_fewshot("omniglot-5w1s", None, tmp_path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        fewshot.train_fewshot("omniglot-5w1s", tmp_path / "nowhere", tmp_path / "out", device="cpu")
    with pytest.raises(ConfigurationError, match="cannot load omniglot"):
        fewshot.train_fewshot("omniglot-5w1s", tmp_path, tmp_path / "out", device="cpu")


# --- the test protocol and load_checkpoint ---------------------------------------------------


def test_eval_reports_every_step_with_confidence_intervals(straight_run, tmp_path):
    out, _ = straight_run
    json_path = tmp_path / "eval.json"
    report = fewshot.evaluate_checkpoint(
        out / "checkpoint.pt",
        tasks=30,
        steps=3,
        seed=5,
        out=json_path,
        backend="reference",
        device="cpu",
        baseline=True,
        baseline_iterations=3,
        baseline_path=tmp_path / "baseline.pt",
        progress=False,
        verbose=False,
        cpu_threads=1,
    )
    written = json.loads(json_path.read_text())
    assert written["results"] == report["results"]
    assert written["tasks"] == 30 and written["steps"] == 3 and written["split"] == "test"
    assert written["trained_iterations"] == 4 and written["paper_eval_steps"] == 3
    for method in ("maml", "baseline"):
        assert sorted(written["results"][method], key=int) == ["0", "1", "2", "3"]
        for cell in written["results"][method].values():
            assert 0 <= cell["accuracy"] <= 1 and cell["ci95"] >= 0
            assert cell["ci95"] == pytest.approx(1.96 * cell["std"] / math.sqrt(30))
    # A fresh zero-initialised head scores every class alike: exactly chance before fine-tuning.
    assert written["results"]["baseline"]["0"]["accuracy"] == pytest.approx(1 / 5)
    assert written["results"]["maml"]["1"]["ci95"] > 0
    # The same seed gives the same tasks; the first tasks of a longer run are a shorter run's.
    again = fewshot.evaluate_checkpoint(
        out / "checkpoint.pt",
        tasks=30,
        steps=1,
        seed=5,
        out="",
        backend="reference",
        device="cpu",
        progress=False,
        verbose=False,
        cpu_threads=1,
    )
    assert again["results"]["maml"]["1"] == written["results"]["maml"]["1"]
    assert (tmp_path / "baseline.pt").is_file()
    # A list of step counts scores exactly those, the same as the full curve's rows.
    chosen = fewshot.evaluate_checkpoint(
        out / "checkpoint.pt",
        tasks=30,
        steps=[3, 1],
        seed=5,
        out="",
        backend="reference",
        device="cpu",
        progress=False,
        verbose=False,
        cpu_threads=1,
    )
    assert chosen["steps"] == [1, 3] and sorted(chosen["results"]["maml"]) == ["1", "3"]
    for k in ("1", "3"):
        assert chosen["results"]["maml"][k] == written["results"]["maml"][k]
    with pytest.raises(ConfigurationError, match="steps: expected a non-empty collection"):
        fewshot.evaluate_checkpoint(out / "checkpoint.pt", steps=[1, 1], progress=False)


def test_load_checkpoint_adapts_and_predicts_like_the_evaluation(
    straight_run, omniglot_root, fewshot_cache
):
    out, _ = straight_run
    meta = load_checkpoint(out / "checkpoint.pt", backend="reference")
    assert isinstance(meta, MetaOptimizer) and meta.inner_lr.init == TINY.inner_lr
    test = fewshot.load_split(TINY, omniglot_root, "test", cache_dir=fewshot_cache)
    batch = TaskSampler(
        test,
        ways=TINY.ways,
        shots=TINY.shots,
        queries=TINY.queries,
        meta_batch=3,
        seed=0,
        device="cpu",
    ).sample()
    adapted = meta.adapt(batch.support_x, batch.support_y, steps=2)
    logits = meta.predict(adapted, batch.query_x)
    assert logits.shape == (3, 5 * TINY.queries, 5)
    accuracy = (logits.argmax(-1) == batch.query_y).float().mean(1)
    expected = fewshot.per_step_accuracy(
        meta, batch.support_x, batch.support_y, batch.query_x, batch.query_y, [2]
    )[2]["accuracy"]
    assert torch.equal(accuracy, expected)


# --- command line ----------------------------------------------------------------------------


def test_cli_lists_presets_and_rejects_unknown_ones(capsys):
    from maml_ext.cli import EXPERIMENTS, main

    assert set(PRESETS) <= set(EXPERIMENTS) and "sinusoid" in EXPERIMENTS
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "omniglot-5w3s", "--data-dir", "x"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'omniglot-5w3s'" in error and "'omniglot-5w1s'" in error


def test_cli_errors_clearly_on_missing_or_wrong_data(capsys, tmp_path):
    from maml_ext.cli import main

    for argv, message in [
        (["train", "omniglot-5w1s", "--out", str(tmp_path / "a")], "needs --data-dir"),
        (
            [
                "train",
                "omniglot-5w1s",
                "--data-dir",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "b"),
            ],
            "does not exist",
        ),
        (["train", "sinusoid", "--data-dir", str(tmp_path)], "sinusoid does not take --data-dir"),
        (["eval", str(tmp_path / "missing.pt")], "no checkpoint at"),
        (
            [
                "train",
                "omniglot-5w1s",
                "--data-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "c"),
                "--split-by",
                "drawer",
            ],
            "invalid choice: 'drawer'",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, (argv, error)


def test_cli_passes_the_fewshot_options(monkeypatch):
    from maml_ext.cli import main

    calls = []
    monkeypatch.setattr(
        fewshot, "train_fewshot", lambda name, **options: calls.append((name, options)) or {}
    )
    assert (
        main(
            [
                "train",
                "omniglot-20w1s",
                "--data-dir",
                "data",
                "--out",
                "o",
                "--iterations",
                "9",
                "--first-order",
                "--meta-batch",
                "4",
                "--seed",
                "2",
                "--checkpoint-every",
                "3",
                "--validate-every",
                "5",
                "--split-by",
                "alphabet",
                "--backend",
                "fused",
            ]
        )
        == 0
    )
    assert calls == [
        (
            "omniglot-20w1s",
            dict(
                data_dir="data",
                out_dir="o",
                iterations=9,
                first_order=True,
                meta_batch=4,
                seed=2,
                checkpoint_every=3,
                validate_every=5,
                split_by="alphabet",
                backend="fused",
            ),
        )
    ]
    calls.clear()
    assert main(["train", "omniglot-5w1s", "--out", "o", "--resume"]) == 0
    assert calls == [("omniglot-5w1s", dict(out_dir="o", resume=True))]


def test_cli_eval_writes_json(straight_run, tmp_path, capsys):
    from maml_ext.cli import main

    out, _ = straight_run
    json_path = tmp_path / "result.json"
    assert (
        main(
            [
                "eval",
                str(out / "checkpoint.pt"),
                "--tasks",
                "5",
                "--steps",
                "1",
                "--seed",
                "3",
                "--backend",
                "reference",
                "--out",
                str(json_path),
            ]
        )
        == 0
    )
    written = json.loads(json_path.read_text())
    assert written["tasks"] == 5 and sorted(written["results"]["maml"]) == ["0", "1"]
    printed = capsys.readouterr().out
    assert "maml" in printed and str(json_path) in printed

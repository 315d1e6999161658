"""The own-data path end to end: ``python -m maml_ext train folder-5w1s --data-dir DIR`` on a
tiny generated tree of class folders, then ``eval`` and ``load_checkpoint``; short classes are
named before training; the backbone choice."""

import json

import numpy as np
import pytest
import torch

from maml_ext.cli import main
from maml_ext.experiments import fewshot, load_checkpoint, read_checkpoint
from maml_ext.experiments.presets import PRESETS, ConfigurationError, FewShotPreset
from maml_ext.experiments.reporting import DEFAULT_EVAL_SEED

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tree(tmp_path):
    """5 alphabets x 3 characters x 3 drawings, grayscale, PNG and JPEG, 20x20."""
    root = tmp_path / "letters"
    rng = np.random.default_rng(0)
    for group in ("Latin", "Greek", "Runic", "Hebrew", "Thai"):
        for character in range(3):
            folder = root / group / f"char{character}"
            folder.mkdir(parents=True)
            for drawing in range(3):
                pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
                suffix = "png" if drawing % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{drawing}.{suffix}")
    return root


TRAIN = [
    "--image-size", "16", "--ways", "2", "--shots", "1", "--queries", "1",
    "--iterations", "2", "--meta-batch", "2", "--validate-every", "0", "--device", "cpu",
    "--backend", "fused",
]  # fmt: skip


def test_train_eval_and_load_checkpoint_on_a_folder(tree, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "folder-5w1s", "--data-dir", str(tree), "--out", str(out)]
    assert main(argv + TRAIN + ["--split-by", "group"]) == 0
    for name in ("checkpoint.pt", "best.pt", "log.csv", "learning_curve.png"):
        assert (out / name).is_file(), name
    state = read_checkpoint(out / "checkpoint.pt")
    preset = state["preset"]
    assert (preset["name"], preset["dataset"]) == ("folder-5w1s", "folder")
    assert preset["image_size"] == 16
    assert (preset["ways"], preset["shots"], preset["queries"]) == (2, 1, 1)
    assert preset["channels"] == 1 and preset["backbone"] == "conv4"  # grayscale images
    assert state["iteration"] == 2 and state["settings"]["split_by"] == "group"

    assert main(["eval", str(out / "checkpoint.pt"), "--tasks", "6", "--steps", "10"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["preset"] == "folder-5w1s" and report["split"] == "test"
    assert sorted(report["results"]["maml"], key=int) == [str(k) for k in range(11)]
    printed = capsys.readouterr().out
    assert "test accuracy on 6 tasks (2-way 1-shot" in printed and "(paper)" not in printed

    meta = load_checkpoint(out / "checkpoint.pt")
    assert meta.model[0].in_channels == 1 and meta.model[-1].out_features == 2
    # The loaded optimiser scores the evaluation's tasks exactly as eval did.
    loaded_preset = FewShotPreset.from_dict(preset)
    test_data = fewshot.load_split(loaded_preset, tree, "test", split_by="group")
    assert set(test_data.groups).isdisjoint(
        fewshot.load_split(loaded_preset, tree, "train", split_by="group").groups
    )
    again = fewshot.evaluate_tasks(
        meta, test_data, loaded_preset, tasks=6, steps=[0, 3, 10], seed=DEFAULT_EVAL_SEED
    )
    for k in (0, 3, 10):
        assert (
            again[k]["accuracy"].double().mean().item()
            == report["results"]["maml"][str(k)]["accuracy"]
        ), k


def test_classes_too_small_are_named_before_training(tree, tmp_path, capsys):
    for extra in ("1.png", "2.jpg"):
        (tree / "Greek" / "char2" / extra).unlink()
    out = tmp_path / "run"
    argv = ["train", "folder-5w1s", "--data-dir", str(tree), "--out", str(out)] + TRAIN
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--split-by", "group"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "Greek/char2 (1)" in message and "1 shot(s) + 1 queries" in message
    assert "Latin/" not in message  # only the short class is named
    assert not (out / "checkpoint.pt").exists()
    queries = TRAIN.index("--queries") + 1
    five_queries = TRAIN[:queries] + ["5"] + TRAIN[queries + 1 :]
    other = tmp_path / "other"
    with pytest.raises(SystemExit):
        main(["train", "folder-5w1s", "--data-dir", str(tree), "--out", str(other), *five_queries])
    message = capsys.readouterr().err
    # Every class of the training split (10 of the 15, split by class) is named.
    assert "10 of 10 classes of the 'train' split" in message
    assert "fewer than the 6 images needed for 1 shot(s) + 5 queries" in message
    assert message.count(" (3)") + message.count(" (1)") == 10
    assert not other.exists()


def test_folder_options_are_checked(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "omniglot-5w1s", "--data-dir", str(tree), "--image-size", "32"])
    assert exit_.value.code == 2
    assert "image_size: only image-folder presets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "folder-5w1s", "--data-dir", str(tree), "--image-size", "8"])
    assert "at least 16 pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "folder-5w1s", "--data-dir", str(tree), "--ways", "0"])
    assert "--ways must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "sinusoid", "--ways", "3"])
    assert "sinusoid does not take --ways" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="cannot change to 3"):
        out = tmp_path / "run"
        fewshot.train_fewshot(
            "folder-5w1s",
            tree,
            out,
            iterations=1,
            ways=2,
            shots=1,
            queries=1,
            image_size=16,
            meta_batch=1,
            validate_every=0,
            val_tasks=1,
            device="cpu",
            progress=False,
            verbose=False,
        )
        fewshot.train_fewshot("folder-5w1s", out_dir=out, resume=True, ways=3, progress=False)


def test_the_resnet12_backbone_is_maml_ext_models_resnet12():
    from maml_ext import models

    preset = PRESETS["folder-5w1s"].with_overrides(backbone="resnet12", ways=4, image_size=32)
    model = preset.build_model()
    reference = models.resnet12(4, 3, image_size=32)
    assert [tuple(p.shape) for p in model.parameters()] == [
        tuple(p.shape) for p in reference.parameters()
    ]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigurationError, match="backbone: expected one of conv4, resnet12"):
        PRESETS["folder-5w1s"].with_overrides(backbone="vgg")


def test_the_folder_preset_network_follows_the_images():
    from maml_ext.program import compile_program

    preset = PRESETS["folder-5w1s"]
    assert (preset.dataset, preset.image_size, preset.channels, preset.backbone) == (
        "folder",
        84,
        0,
        "conv4",
    )
    for channels, size in ((1, 28), (3, 84), (3, 40)):
        shaped = preset.with_overrides(channels=channels, image_size=size, ways=4)
        assert shaped.image_shape == (channels, size, size)
        model = shaped.build_model()
        assert model(torch.rand(2, channels, size, size)).shape == (2, 4)
        assert model[-1].in_features == 32 * (size // 16) ** 2
        compile_program(model)  # the fused backend runs it

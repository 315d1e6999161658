"""MiniImageNet on small datasets built here in the two usual layouts."""

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maml_ext.tasks import DatasetError, MiniImageNet, TaskSampler
from maml_ext.tasks.miniimagenet import MINI_IMAGENET_MEAN, MINI_IMAGENET_STD

CLASSES = {
    "train": ["n01532829", "n01558993", "n01704323"],
    "val": ["n01855672", "n02091244"],
    "test": ["n01930112", "n01981276"],
}
IMAGES_PER_CLASS = 5


def write_csv_layout(root: Path, seed: int = 0) -> Path:
    """Ravi & Larochelle's layout: split CSVs and an images/ folder of JPEGs of mixed sizes."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for split, classes in CLASSES.items():
        with open(root / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label"])
            for wnid in classes:
                for n in range(IMAGES_PER_CLASS):
                    name = f"{wnid}{n:08d}.jpg"
                    size = (84, 84) if n % 2 == 0 else (120, 90)  # some need resizing
                    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / "images" / name, quality=95)
                    writer.writerow([name, wnid])
    return root


def write_pickle_layout(root: Path, seed: int = 0) -> dict:
    """learn2learn's cache files; rows deliberately not grouped by class. Returns the contents."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    contents = {}
    for split, file_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        count = len(CLASSES[split]) * IMAGES_PER_CLASS
        order = rng.permutation(count)
        class_dict = {
            wnid: order[i * IMAGES_PER_CLASS : (i + 1) * IMAGES_PER_CLASS].tolist()
            for i, wnid in enumerate(CLASSES[split])
        }
        data = {
            "image_data": rng.integers(0, 256, (count, 84, 84, 3), dtype=np.uint8),
            "class_dict": class_dict,
        }
        with open(root / f"mini-imagenet-cache-{file_split}.pkl", "wb") as file:
            pickle.dump(data, file, protocol=4)
        contents[split] = data
    return contents


def expected_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (84, 84):
            rgb = rgb.resize((84, 84), Image.Resampling.LANCZOS)
        return np.array(rgb)


@pytest.fixture
def csv_root(tmp_path) -> Path:
    return write_csv_layout(tmp_path / "mini")


def normalised(pixels_chw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MINI_IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(MINI_IMAGENET_STD).reshape(3, 1, 1)
    return (pixels_chw.float() / 255 - mean) / std


# --------------------------------------------------------------------------------------------
# The CSV layout


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_csv_layout(csv_root, tmp_path, split):
    data = MiniImageNet(csv_root, split, cache_dir=tmp_path / "cache")
    classes = CLASSES[split]
    assert data.layout == "csv"
    assert data.class_names == sorted(classes) and data.num_classes == len(classes)
    assert data.images.shape == (len(classes) * IMAGES_PER_CLASS, 3, 84, 84)
    assert data.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(data.labels), torch.full((len(classes),), IMAGES_PER_CLASS))
    with open(csv_root / f"{split}.csv") as file:
        rows = list(csv.DictReader(file))
    for index in (0, 1, len(rows) - 1):  # an 84x84 image, a resized one, the last
        pixels = expected_pixels(csv_root / "images" / rows[index]["filename"])
        assert torch.equal(data.images[index], torch.from_numpy(pixels).permute(2, 0, 1))
        assert data.class_names[int(data.labels[index])] == rows[index]["label"]


def test_csv_layout_is_cached_and_the_cache_follows_the_images(csv_root, tmp_path):
    first = MiniImageNet(csv_root, "train", cache_dir=tmp_path / "cache")
    second = MiniImageNet(csv_root, "train", cache_dir=tmp_path / "cache")
    assert not first.from_cache and second.from_cache
    assert second.cache_path.parent == tmp_path / "cache"
    assert torch.equal(first.images, second.images)

    changed = csv_root / "images" / f"{CLASSES['train'][0]}00000000.jpg"
    Image.new("RGB", (84, 84), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = MiniImageNet(csv_root, "train", cache_dir=tmp_path / "cache")
    assert not third.from_cache
    assert third.images[0, 0].float().mean() > 250 and third.images[0, 2].float().mean() < 5


def test_normalisation_constants(csv_root, tmp_path):
    data = MiniImageNet(csv_root, "val", cache_dir=tmp_path / "cache")
    image, label = data[3]
    assert image.shape == (3, 84, 84) and image.dtype == torch.float32
    assert label == int(data.labels[3])
    assert torch.allclose(image, normalised(data.images[3]), atol=1e-6)
    assert MINI_IMAGENET_MEAN[0] == pytest.approx(120.39586422 / 255)
    assert MINI_IMAGENET_STD[2] == pytest.approx(72.54505529 / 255)

    raw = MiniImageNet(csv_root, "val", normalize=False, cache_dir=tmp_path / "cache")
    assert torch.equal(raw[3][0], data.images[3].float() / 255)
    assert data.images[3].dtype == torch.uint8  # preparing a batch leaves the stored pixels alone


# --------------------------------------------------------------------------------------------
# The pickle layout


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_pickle_layout(tmp_path, split):
    contents = write_pickle_layout(tmp_path)[split]
    data = MiniImageNet(tmp_path, split)
    assert data.layout == "pickle" and data.cache_path is None
    assert data.class_names == sorted(CLASSES[split])
    assert data.images.shape == (len(CLASSES[split]) * IMAGES_PER_CLASS, 3, 84, 84)
    expected = torch.from_numpy(contents["image_data"]).permute(0, 3, 1, 2)
    for label, wnid in enumerate(data.class_names):
        rows = contents["class_dict"][wnid]
        mine = data.images[data.labels == label]
        assert torch.equal(mine, expected[rows])


def test_csv_is_preferred_and_layout_can_be_chosen(csv_root, tmp_path):
    write_pickle_layout(csv_root)
    assert MiniImageNet(csv_root, "test", cache=False).layout == "csv"
    assert MiniImageNet(csv_root, "test", layout="pickle").layout == "pickle"


def test_python2_pickles_are_read(tmp_path):
    data = {
        "image_data": np.zeros((2, 84, 84, 3), dtype=np.uint8),
        "class_dict": {"n\u00e9": [0, 1]},
    }
    payload = pickle.dumps(data, protocol=2)
    # Python 2 wrote its str keys as byte strings (SHORT_BINSTRING), which Python 3 cannot decode
    # as ASCII: swap the key's unicode opcode for one.
    unicode_key = b"X\x03\x00\x00\x00n\xc3\xa9"
    assert unicode_key in payload
    payload = payload.replace(unicode_key, b"U\x02n\xe9")
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(payload)
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(payload)
    loaded = MiniImageNet(tmp_path, "train")
    assert loaded.class_names == ["n\u00e9"] and loaded.images.shape == (2, 3, 84, 84)


# --------------------------------------------------------------------------------------------
# With the sampler


def test_sampler_draws_normalised_rgb_tasks(tmp_path):
    contents = write_pickle_layout(tmp_path)["train"]
    data = MiniImageNet(tmp_path, "train")
    sampler = TaskSampler(data, ways=3, shots=2, queries=3, meta_batch=2, seed=0)
    batch = sampler.sample()
    assert batch.support_x.shape == (2, 6, 3, 84, 84)
    assert batch.query_x.shape == (2, 9, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32 and batch.support_x.is_contiguous()
    pixels = torch.from_numpy(contents["image_data"]).permute(0, 3, 1, 2)
    class_rows = contents["class_dict"][data.class_names[int(batch.classes[0, 0])]]
    candidates = normalised(pixels[class_rows])
    first = batch.support_x[0, 0]
    assert any(torch.allclose(first, candidate, atol=1e-6) for candidate in candidates)

    with pytest.raises(
        ValueError,
        match=r"2-shot tasks with 4 queries need 6 images per class, "
        r"but 3 of 3 classes have fewer; the smallest, "
        r"'n01532829', has 5",
    ):
        TaskSampler(data, ways=3, shots=2, queries=4, meta_batch=1)
    with pytest.raises(ValueError, match="5-way tasks need 5 classes, but the dataset has 3$"):
        TaskSampler(data, ways=5, shots=1, queries=1, meta_batch=1)


# --------------------------------------------------------------------------------------------
# Bad files


def test_missing_root_and_missing_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="miniImageNet root .*absent is not a folder"):
        MiniImageNet(tmp_path / "absent", "train")
    with pytest.raises(
        FileNotFoundError,
        match=r"no miniImageNet 'val' split in .*: expected "
        r"val\.csv with an images/ folder, or "
        r"mini-imagenet-cache-validation\.pkl",
    ):
        MiniImageNet(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-train\.pkl is missing"):
        MiniImageNet(tmp_path, "train", layout="pickle")
    with pytest.raises(ValueError, match="split must be one of"):
        MiniImageNet(tmp_path, "validation")


def test_csv_with_a_wrong_header(csv_root):
    (csv_root / "train.csv").write_text("image,class\na.jpg,n1\n")
    with pytest.raises(
        DatasetError,
        match=r"train\.csv: expected the header 'filename,label', "
        r"found \['image', 'class'\]",
    ):
        MiniImageNet(csv_root, "train", cache=False)


def test_csv_with_a_bad_row(csv_root):
    with open(csv_root / "val.csv", "a") as file:
        file.write("only-a-filename.jpg\n")
    with pytest.raises(DatasetError, match=r"val\.csv, line 12: expected 'filename,label'"):
        MiniImageNet(csv_root, "val", cache=False)


def test_csv_naming_a_missing_image(csv_root):
    missing = csv_root / "images" / f"{CLASSES['test'][1]}00000003.jpg"
    missing.unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"1 images listed in .*test\.csv are missing, "
        rf"e\.g\. {missing}",
    ):
        MiniImageNet(csv_root, "test", cache=False)


def test_csv_without_the_images_folder(csv_root):
    for path in (csv_root / "images").iterdir():
        path.unlink()
    (csv_root / "images").rmdir()
    with pytest.raises(FileNotFoundError, match=r"images is missing: train\.csv lists images"):
        MiniImageNet(csv_root, "train", cache=False)


def test_corrupt_jpeg_names_the_file(csv_root):
    broken = csv_root / "images" / f"{CLASSES['val'][0]}00000002.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DatasetError, match=rf"{broken}: not a readable image"):
        MiniImageNet(csv_root, "val", cache=False)


def test_corrupt_pickle_names_the_file(tmp_path):
    write_pickle_layout(tmp_path)
    path = tmp_path / "mini-imagenet-cache-test.pkl"
    path.write_bytes(path.read_bytes()[:1000])  # truncated download
    with pytest.raises(DatasetError, match=rf"{path} is not a readable pickle"):
        MiniImageNet(tmp_path, "test")


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], r"expected a dict with 'image_data' .* found list"),
        ({"images": 1, "labels": 2}, r"expected a dict .*; found \['images', 'labels'\]"),
        (
            {"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {"n1": [0, 1]}},
            r"'image_data' is uint8 \(2, 32, 32, 3\); expected",
        ),
        (
            {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n1": [0, 5]}},
            r"class_dict\['n1'\] holds indices outside 0\.\.1",
        ),
        (
            {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0], "b": [0]}},
            "class_dict lists some images under several classes",
        ),
    ],
)
def test_pickle_with_the_wrong_structure(tmp_path, content, message):
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(DatasetError, match=rf"{path}: {message}"):
        MiniImageNet(tmp_path, "train")

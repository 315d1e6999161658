"""ImageFolderTasks on generated trees of PNG and JPEG files: layouts, decoding, splits, the
cache (read-only roots included), and the errors that name a short class or a damaged image."""

import os
import stat

import numpy as np
import pytest
import torch

from maml_ext.tasks import DatasetError, ImageFolderTasks, TaskSampler, _data_errors

Image = pytest.importorskip("PIL.Image")

SIZE = 12


def _write(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_tree(root, layout, rng, *, groups=4, classes=3, images=4, colour_class=None):
    """Class folders of random 15x19 images, alternately PNG and JPEG; ``layout`` "grouped"
    (root/gN/cM/…) or "flat" (root/gN-cM/…). ``colour_class`` (a path) gets RGB images."""
    names = []
    for g in range(groups):
        for c in range(classes):
            name = f"g{g}/c{c}" if layout == "grouped" else f"g{g}-c{c}"
            names.append(name)
            for i in range(images):
                shape = (15, 19, 3) if name == colour_class else (15, 19)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                _write(root / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}", pixels)
    return sorted(names)


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """No cache setting from the environment; the user cache folder inside tmp_path."""
    monkeypatch.delenv("MAML_EXT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "maml_ext"


def _expected_pixels(path, channels):
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        pixels = np.asarray(image)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


@pytest.mark.parametrize("layout", ["grouped", "flat"])
def test_every_image_is_decoded_resized_and_labelled_by_its_folder(tmp_path, rng, layout):
    root = tmp_path / "data"
    names = make_tree(root, layout, rng)
    (root / "g0" / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text("not an image")  # skipped: not an image extension
    data = ImageFolderTasks(root, SIZE, "all", cache=False)
    assert data.class_names == names
    assert data.channels == 1 and data.images.dtype == torch.uint8
    assert data.images.shape == (len(names) * 4, 1, SIZE, SIZE)
    assert sorted({name.split("/")[0] for name in names}) == data.groups
    for index in rng.permutation(len(data.files))[:6]:
        path = data.files[index]
        expected_class = os.path.relpath(os.path.dirname(path), root).replace(os.sep, "/")
        assert data.class_names[int(data.labels[index])] == expected_class
        assert np.array_equal(data.images[index].numpy(), _expected_pixels(path, 1)), path
    x, label = data[3]
    assert x.dtype == torch.float32 and float(x.max()) <= 1 and label == int(data.labels[3])
    assert torch.equal(x, data.images[3].float() / 255)


def test_one_colour_image_makes_every_image_rgb_unless_channels_is_given(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng, colour_class="g1/c2")
    data = ImageFolderTasks(root, SIZE, "all", cache=False)
    assert data.channels == 3 and data.images.shape[1] == 3
    for index in (0, len(data.files) - 1, data.files.index(str(root / "g1/c2/01.png"))):
        path = data.files[index]
        assert np.array_equal(data.images[index].numpy(), _expected_pixels(path, 3)), path
    gray = ImageFolderTasks(root, SIZE, "all", channels=1, cache=False)
    assert gray.images.shape[1] == 1
    index = gray.files.index(str(root / "g1/c2/01.png"))
    assert np.array_equal(gray.images[index].numpy(), _expected_pixels(gray.files[index], 1))


@pytest.mark.parametrize("layout", ["grouped", "flat"])
@pytest.mark.parametrize("split_by", ["class", "group"])
def test_splits_partition_the_classes_reproducibly(tmp_path, rng, layout, split_by):
    root = tmp_path / "data"
    names = make_tree(root, layout, rng, groups=10, classes=2, images=2)
    splits = {
        split: ImageFolderTasks(root, SIZE, split, split_by=split_by, seed=3, cache=False)
        for split in ("train", "val", "test")
    }
    by_split = {split: data.class_names for split, data in splits.items()}
    assert sorted(sum(by_split.values(), [])) == names  # disjoint and complete
    assert all(by_split.values())
    if split_by == "group":
        group_sets = [{name.split("/")[0] for name in classes} for classes in by_split.values()]
        assert sum(len(groups) for groups in group_sets) == len(set().union(*group_sets))
    again = ImageFolderTasks(root, SIZE, "train", split_by=split_by, seed=3, cache=False)
    assert again.class_names == by_split["train"]
    assert torch.equal(again.images, splits["train"].images)
    others = [
        ImageFolderTasks(root, SIZE, "train", split_by=split_by, seed=s, cache=False).class_names
        for s in range(4, 8)
    ]
    assert any(classes != by_split["train"] for classes in others)
    for data in splits.values():  # labels index the split's own classes
        assert int(data.labels.max()) + 1 == data.num_classes
        for label, path in zip(data.labels.tolist(), data.files):
            assert path.startswith(str(root / data.class_names[label]) + os.sep)


def test_explicit_group_lists(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng)
    groups = {"train": ["g0", "g3"], "test": ["g1"]}
    train = ImageFolderTasks(root, SIZE, "train", groups=groups, cache=False)
    assert train.groups == ["g0", "g3"] and train.split_by == "group"
    with pytest.raises(DatasetError, match="split is empty"):
        ImageFolderTasks(root, SIZE, "val", groups=groups, cache=False)
    with pytest.raises(DatasetError, match=r"groups\['train'\] names 'g9'.*folders read"):
        ImageFolderTasks(root, SIZE, "train", groups={"train": ["g9"]}, cache=False)


def test_a_class_too_small_is_named(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng, images=4)
    for name in ("g2/c1", "g0/c0"):
        for extra in sorted((root / name).iterdir())[2:]:
            extra.unlink()
    data = ImageFolderTasks(root, SIZE, "all")
    data.require_images_per_class(2)  # enough for every class
    with pytest.raises(DatasetError) as error:
        data.require_images_per_class(3, "1 shot + 2 queries")
    message = str(error.value)
    assert "2 of 12 classes" in message and "1 shot + 2 queries" in message
    assert "g0/c0 (2), g2/c1 (2)" in message
    assert "g1/c0" not in message
    with pytest.raises(DatasetError, match=r"g0/c0 \(2\), g2/c1 \(2\)"):
        ImageFolderTasks(root, SIZE, "all", min_images=4)


def test_an_unreadable_image_is_named(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng)
    damaged = root / "g2" / "c1" / "01.png"
    damaged.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    with pytest.raises(DatasetError, match="not a readable image") as error:
        ImageFolderTasks(root, SIZE, "all")
    assert str(damaged) in str(error.value)
    assert not any((root / ".maml_ext_cache").glob("*.npz"))  # nothing half-built is cached


def test_bad_layouts_are_explained(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng, groups=1)
    _write(root / "stray.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match="holds images itself"):
        ImageFolderTasks(root, SIZE, "all", cache=False)
    (root / "stray.png").unlink()
    _write(root / "g0" / "c0" / "deeper" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"c0 holds both images .* and folders \(deeper\)"):
        ImageFolderTasks(root, SIZE, "all", cache=False)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        ImageFolderTasks(empty, SIZE, "all", cache=False)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolderTasks(tmp_path / "missing", SIZE)
    for bad, message in (
        (dict(image_size=0), "image_size"),
        (dict(split="dev"), "split"),
        (dict(split_by="alphabet"), "split_by"),
        (dict(channels=2), "channels"),
        (dict(fractions=(1, 1)), "fractions"),
    ):
        with pytest.raises(ValueError, match=message):
            ImageFolderTasks(**{"root": root, "image_size": SIZE, **bad})


def test_the_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng)
    first = ImageFolderTasks(root, SIZE, "train")
    assert not first.from_cache and first.cache_path.parent == root / ".maml_ext_cache"
    second = ImageFolderTasks(root, SIZE, "test")  # every split shares the tree's cache file
    assert second.from_cache and second.cache_path == first.cache_path
    assert torch.equal(ImageFolderTasks(root, SIZE, "train").images, first.images)
    fixed = ImageFolderTasks(root, SIZE, "val", channels=1)  # what the automatic choice found
    assert fixed.from_cache and fixed.cache_path == first.cache_path
    rgb = ImageFolderTasks(root, SIZE, "train", channels=3)
    assert not rgb.from_cache and rgb.images.shape[1] == 3
    assert ImageFolderTasks(root, SIZE, "train", channels=3).from_cache
    other_size = ImageFolderTasks(root, SIZE + 4, "train")
    assert not other_size.from_cache and other_size.cache_path != first.cache_path
    changed = root / first.class_names[0] / "00.jpg"
    _write(changed, np.full((15, 19), 255, np.uint8))
    rebuilt = ImageFolderTasks(root, SIZE, "train")
    assert not rebuilt.from_cache
    index = rebuilt.files.index(str(changed))
    assert int(rebuilt.images[index].min()) == 255  # the new, white image
    assert int(first.images[index].min()) < 255  # the old one: random pixels


def _read_only(root):
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), stat.S_IRUSR)
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)


def _writable(root):
    for folder, _, files in os.walk(root):
        os.chmod(folder, stat.S_IRWXU)
        for name in files:
            os.chmod(os.path.join(folder, name), stat.S_IRUSR | stat.S_IWUSR)


def _tree_listing(root):
    return sorted(
        os.path.relpath(os.path.join(f, n), root) for f, d, ns in os.walk(root) for n in ns + d
    )


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: permission bits do not stop root from writing",
)
def test_a_read_only_root_is_cached_elsewhere(tmp_path, rng, isolated_cache):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng)
    before = _tree_listing(root)
    _read_only(root)
    try:
        data = ImageFolderTasks(root, SIZE, "train")
        assert data.cache_path.parent == isolated_cache and data.cache_path.is_file()
        assert ImageFolderTasks(root, SIZE, "train").from_cache
        assert _tree_listing(root) == before
    finally:
        _writable(root)


def test_a_root_reported_not_writable_is_cached_elsewhere(
    tmp_path, rng, isolated_cache, monkeypatch
):
    # The same path as the chmod test, where that one cannot run (as root): the loader's check
    # of the root's permission says no, and nothing may be written under it.
    root = tmp_path / "data"
    make_tree(root, "grouped", rng)
    before = _tree_listing(root)
    real_access = os.access
    monkeypatch.setattr(
        _data_errors.os,
        "access",
        lambda path, mode: False if os.path.abspath(path) == str(root) else real_access(path, mode),
    )
    data = ImageFolderTasks(root, SIZE, "train")
    assert data.cache_path.parent == isolated_cache and data.cache_path.is_file()
    assert ImageFolderTasks(root, SIZE, "val").from_cache
    assert _tree_listing(root) == before


def test_rotations_and_sampling(tmp_path, rng):
    root = tmp_path / "data"
    make_tree(root, "grouped", rng)
    data = ImageFolderTasks(root, SIZE, "all", rotations=True)
    sampler = TaskSampler(data, ways=5, shots=1, queries=2, meta_batch=3, seed=0)
    assert sampler.num_classes == 4 * data.num_classes
    batch = sampler.sample()
    assert batch.support_x.shape == (3, 5, 1, SIZE, SIZE)
    assert batch.query_x.shape == (3, 10, 1, SIZE, SIZE)
    assert batch.support_x.dtype == torch.float32 and float(batch.support_x.max()) <= 1
    for t in range(3):
        for j in range(5):
            class_id = int(batch.classes[t, j])
            base, turns = divmod(class_id, 4)
            candidates = torch.rot90(data.images[data.labels == base], turns, dims=(-2, -1))
            drawn = (batch.support_x[t, j] * 255).round().to(torch.uint8)
            assert any(torch.equal(drawn, c) for c in candidates)
    assert data.class_name(4 * 2 + 1) == f"{data.class_names[2]} (90°)"
    assert data.class_name(4 * 2) == data.class_names[2]
    with pytest.raises(ValueError, match="fewer"):
        TaskSampler(data, ways=2, shots=3, queries=2, meta_batch=1)

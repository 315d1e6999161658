"""The Omniglot loader, on the real minimal archives and on small archives made here."""

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from maml_ext.tasks import DatasetError, Omniglot, omniglot_image
from maml_ext.tasks.omniglot import split_counts

SMALL1, SMALL2 = "images_background_small1", "images_background_small2"
ALL_ALPHABETS = [
    "Balinese",
    "Early_Aramaic",
    "Greek",
    "Japanese_(katakana)",
    "Korean",
    "Latin",
    "Sanskrit",
    "Tagalog",
]


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory) -> Path:
    # A fixed path under the session's base temp dir, so every test module shares one decoding.
    return tmp_path_factory.getbasetemp() / "omniglot-cache"


@pytest.fixture(scope="session")
def everything(omniglot_root, omniglot_cache) -> Omniglot:
    return Omniglot(omniglot_root, "all", cache_dir=omniglot_cache)


def load(root, split="all", **kwargs) -> Omniglot:
    """A dataset from the shared cache (each call re-splits cached arrays: milliseconds)."""
    return Omniglot(root, split, **kwargs)


# --------------------------------------------------------------------------------------------
# Small synthetic archives


def drawing_png(seed: int) -> bytes:
    """A 105x105 one-bit PNG, black strokes on white, like Omniglot's."""
    rng = np.random.default_rng(seed)
    image = Image.new("1", (105, 105), 1)
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        pen.line([tuple(rng.integers(10, 95, 2)), tuple(rng.integers(10, 95, 2))], fill=0, width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_archive(path: Path, characters, drawings=3, seed=0, top=None, extra=None) -> Path:
    """A zip in the official layout with ``drawings`` PNGs per ``(alphabet, character)``."""
    top = top if top is not None else path.stem
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet, character in characters:
            for d in range(drawings):
                member = f"{alphabet}/{character}/0000_{d + 1:02d}.png"
                # Seeded by the names, so a character is drawn alike in every archive.
                name_seed = zlib.crc32(f"{alphabet}/{character}".encode())
                archive.writestr(
                    f"{top}/{member}" if top else member, drawing_png(name_seed + 1000 * seed + d)
                )
        for member, data in (extra or {}).items():
            archive.writestr(member, data)
    return path


TOY = [("Alpha", "character01"), ("Alpha", "character02"), ("Beta", "character01")]


# --------------------------------------------------------------------------------------------
# The real archives


@pytest.mark.parametrize(
    "archive, alphabets, characters, images",
    [(SMALL1, 5, 136, 2720), (SMALL2, 5, 156, 3120)],
)
def test_each_minimal_archive_has_the_published_counts(
    omniglot_root, omniglot_cache, archive, alphabets, characters, images
):
    data = load(omniglot_root, archives=[archive], rotations=False, cache_dir=omniglot_cache)
    assert len(data.alphabets) == alphabets
    assert data.num_characters == characters == data.num_classes
    assert data.images.shape == (images, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert torch.equal(torch.bincount(data.labels), torch.full((characters,), 20))
    assert data.duplicate_characters == []


def test_both_archives_count_shared_characters_once(everything):
    assert everything.alphabets == ALL_ALPHABETS
    assert everything.num_characters == 242
    assert everything.images.shape == (4840, 1, 28, 28)
    assert len(set(everything.characters)) == 242
    # Greek (24 characters) and Latin (26) are in both archives.
    assert len(everything.duplicate_characters) == 50
    assert {name.split("/")[0] for name in everything.duplicate_characters} == {"Greek", "Latin"}
    shared = [d for d in everything.drawings if "/Greek/" in d or "/Latin/" in d]
    assert len(shared) == 50 * 20


def test_images_are_ink_on_blank_paper(everything):
    images = everything.images
    assert images.min() == 0 and images.max() == 1
    # A few drawings reach the edge; almost all corners are blank paper.
    corners = images[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).float().mean() > 0.99
    ink_per_image = images.mean(dim=(1, 2, 3))
    assert torch.all(ink_per_image > 0.01) and torch.all(ink_per_image < 0.4)


def test_dataset_images_are_omniglot_image_of_their_png(everything, omniglot_root, tmp_path):
    for index in (0, 1234, 4839):
        archive_path, member = everything.drawings[index].rsplit(":", 1)
        with zipfile.ZipFile(archive_path) as archive:
            data = archive.read(member)
        from_pil = omniglot_image(Image.open(io.BytesIO(data)))
        assert from_pil.shape == (1, 28, 28) and from_pil.dtype == torch.float32
        assert torch.equal(from_pil, everything.images[index])
        path = tmp_path / f"{index}.png"
        path.write_bytes(data)
        assert torch.equal(omniglot_image(path), everything.images[index])
        assert torch.equal(omniglot_image(str(path)), everything.images[index])


def test_second_load_comes_from_the_cache(everything, omniglot_root, omniglot_cache):
    again = Omniglot(omniglot_root, "all", cache_dir=omniglot_cache)
    assert again.from_cache
    assert again.cache_paths == everything.cache_paths
    assert [path.parent for path in again.cache_paths] == [omniglot_cache] * 2
    assert all(path.is_file() for path in again.cache_paths)
    assert torch.equal(again.images, everything.images)
    assert torch.equal(again.labels, everything.labels)
    assert again.characters == everything.characters
    assert again.drawings == everything.drawings


def test_unpacked_folder_reads_like_the_zip(omniglot_root, omniglot_cache, tmp_path):
    # One alphabet is enough to compare, and keeps the test quick.
    with zipfile.ZipFile(omniglot_root / f"{SMALL1}.zip") as archive:
        greek = [name for name in archive.namelist() if "/Greek/" in name]
        archive.extractall(tmp_path / "data", members=greek)
    from_folder = Omniglot(tmp_path / "data", "all", cache_dir=tmp_path / "cache")
    from_zip = load(
        omniglot_root,
        "train",
        alphabets={"train": ["Greek"]},
        archives=[SMALL1],
        cache_dir=omniglot_cache,
    )
    assert from_folder.archives == [tmp_path / "data" / SMALL1]
    assert from_folder.num_characters == 24
    assert from_folder.characters == from_zip.characters
    assert torch.equal(from_folder.images, from_zip.images)
    assert torch.equal(from_folder.labels, from_zip.labels)
    assert from_folder.drawings[0] == str(
        tmp_path / "data" / SMALL1 / "Greek" / "character01" / "0394_01.png"
    )
    # The unpacked folder itself may be the root, too.
    direct = Omniglot(tmp_path / "data" / SMALL1, "all", cache_dir=tmp_path / "cache")
    assert direct.from_cache and torch.equal(direct.images, from_zip.images)


# --------------------------------------------------------------------------------------------
# Rotations


def test_rotations_are_extra_classes_made_by_rot90(everything, omniglot_root, omniglot_cache):
    count = everything.images.shape[0]
    assert everything.rotations == 4
    assert everything.num_classes == 4 * 242
    assert len(everything) == 4 * count
    for index in (0, 777, count - 1):
        for turns in range(4):
            image, class_id = everything[turns * count + index]
            assert torch.equal(image, torch.rot90(everything.images[index], turns, dims=(-2, -1)))
            assert class_id == int(everything.labels[index]) * 4 + turns
    assert not torch.equal(everything[count][0], everything[0][0])
    assert everything.class_name(1) == "Balinese/character01 rotated 90°"
    assert everything.class_name(4) == "Balinese/character02"

    upright = load(omniglot_root, rotations=False, cache_dir=omniglot_cache)
    assert upright.rotations == 1 and upright.num_classes == 242 and len(upright) == count
    assert torch.equal(upright.images, everything.images)


# --------------------------------------------------------------------------------------------
# Splits


def test_split_by_character_is_disjoint_complete_and_seeded(omniglot_root, omniglot_cache):
    def split(name, seed=0):
        return load(omniglot_root, name, split_by="character", seed=seed, cache_dir=omniglot_cache)

    parts = {name: split(name) for name in ("train", "val", "test")}
    sizes = {name: data.num_characters for name, data in parts.items()}
    assert sizes == {"train": 164, "val": 15, "test": 63}  # 242 in the paper's 1100:100:423
    sets = {name: set(data.characters) for name, data in parts.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert len(sets["train"] | sets["val"] | sets["test"]) == 242
    assert sum(data.images.shape[0] for data in parts.values()) == 4840
    assert int(parts["train"].labels.max()) == 163

    assert split("train").characters == parts["train"].characters
    assert set(split("train", seed=1).characters) != sets["train"]
    # Character splits mix alphabets.
    assert len(parts["test"].alphabets) > 1


def test_split_sizes_follow_the_paper():
    assert split_counts(1623, (1100, 100, 423)) == (1100, 100, 423)
    assert split_counts(242, (0.8, 0.1, 0.1)) == split_counts(242, (8, 1, 1)) == (194, 24, 24)
    assert sum(split_counts(7, (1, 1, 1))) == 7
    with pytest.raises(ValueError, match="fractions"):
        split_counts(10, (1, -1, 1))


def test_seeded_split_by_alphabet_keeps_alphabets_whole(everything, omniglot_root, omniglot_cache):
    parts = {
        name: load(omniglot_root, name, split_by="alphabet", seed=3, cache_dir=omniglot_cache)
        for name in ("train", "val", "test")
    }
    alphabet_sets = [set(data.alphabets) for data in parts.values()]
    assert sorted(a for s in alphabet_sets for a in s) == ALL_ALPHABETS
    assert [len(s) for s in alphabet_sets] == [5, 1, 2]
    assert sum(data.num_characters for data in parts.values()) == 242
    for data in parts.values():  # every character of a chosen alphabet is there
        assert set(data.characters) == {
            key for key in everything.characters if key[0] in data.alphabets
        }
    again = load(omniglot_root, "train", split_by="alphabet", seed=3, cache_dir=omniglot_cache)
    assert again.alphabets == parts["train"].alphabets
    other_seeds = {
        tuple(
            load(
                omniglot_root, "test", split_by="alphabet", seed=s, cache_dir=omniglot_cache
            ).alphabets
        )
        for s in range(4)
    }
    assert len(other_seeds) > 1


def test_explicit_alphabet_lists(omniglot_root, omniglot_cache):
    lists = {"train": ["Greek", "Latin", "Korean"], "test": ["Balinese"]}
    train = load(omniglot_root, "train", alphabets=lists, cache_dir=omniglot_cache)
    test = load(omniglot_root, "test", alphabets=lists, cache_dir=omniglot_cache)
    assert train.split_by == "alphabet"
    assert train.alphabets == ["Greek", "Korean", "Latin"]
    assert train.num_characters == 24 + 26 + 40
    assert test.alphabets == ["Balinese"]

    with pytest.raises(ValueError, match=r"'val' split is empty"):
        load(omniglot_root, "val", alphabets=lists, cache_dir=omniglot_cache)
    with pytest.raises(ValueError, match=r"'Klingon'.*available: Balinese, Early_Aramaic"):
        load(omniglot_root, "train", alphabets={"train": ["Klingon"]}, cache_dir=omniglot_cache)
    with pytest.raises(ValueError, match=r"'Greek' is listed for both 'train' and 'test'"):
        load(
            omniglot_root,
            "train",
            alphabets={"train": ["Greek"], "test": ["Greek"]},
            cache_dir=omniglot_cache,
        )
    with pytest.raises(ValueError, match="split by alphabet"):
        load(
            omniglot_root, "train", alphabets=lists, split_by="character", cache_dir=omniglot_cache
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "validation"}, r"split must be one of \('train', 'val', 'test', 'all'\)"),
        ({"split_by": "drawer"}, "split_by must be 'character' or 'alphabet'"),
        ({"fractions": (1, 1)}, "fractions must be three"),
    ],
)
def test_bad_arguments_are_rejected_before_reading(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Omniglot(tmp_path / "nowhere", **kwargs)


# --------------------------------------------------------------------------------------------
# Synthetic archives: caching, de-duplication, bad files


def test_cache_is_invalidated_when_an_archive_changes(tmp_path):
    archive = write_archive(tmp_path / "images_background.zip", TOY)
    cache = tmp_path / "cache"
    first = Omniglot(archive.parent, "all", cache_dir=cache)
    second = Omniglot(archive.parent, "all", cache_dir=cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.images.shape == (9, 1, 28, 28) and torch.equal(first.images, second.images)

    write_archive(archive, TOY, seed=1)
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    third = Omniglot(archive.parent, "all", cache_dir=cache)
    assert not third.from_cache
    assert not torch.equal(third.images, first.images)
    assert third.cache_paths != first.cache_paths


def test_unreadable_cache_file_is_rebuilt(tmp_path):
    archive = write_archive(tmp_path / "images_background.zip", TOY)
    first = Omniglot(archive.parent, "all", cache_dir=tmp_path / "cache")
    first.cache_paths[0].write_bytes(b"not an npz file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        again = Omniglot(archive.parent, "all", cache_dir=tmp_path / "cache")
    assert not again.from_cache and torch.equal(again.images, first.images)
    assert Omniglot(archive.parent, "all", cache_dir=tmp_path / "cache").from_cache


def test_without_cache_nothing_is_written(tmp_path):
    archive = write_archive(tmp_path / "images_background.zip", TOY)
    data = Omniglot(archive.parent, "all", cache=False, cache_dir=tmp_path / "cache")
    assert data.cache_paths == [] and not data.from_cache and data.num_characters == 3
    assert not (tmp_path / "cache").exists()


def test_identical_copies_count_once_and_different_ones_are_an_error(tmp_path):
    write_archive(tmp_path / "images_background_a.zip", TOY)
    write_archive(tmp_path / "images_background_b.zip", TOY[1:] + [("Gamma", "character01")])
    data = Omniglot(tmp_path, "all", cache=False)
    assert data.num_characters == 4
    assert data.duplicate_characters == ["Alpha/character02", "Beta/character01"]

    # The same names with other drawings: the loader cannot tell which to believe.
    write_archive(tmp_path / "images_background_b.zip", TOY[1:], seed=5)
    with pytest.raises(
        DatasetError,
        match=r"Alpha/character02 differs between .*_a\.zip and "
        r".*_b\.zip",
    ):
        Omniglot(tmp_path, "all", cache=False)


def test_zip_is_preferred_over_its_unpacked_folder(tmp_path):
    archive = write_archive(tmp_path / "images_background.zip", TOY)
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(tmp_path)
    data = Omniglot(tmp_path, "all", cache=False)
    assert data.archives == [archive]
    assert data.duplicate_characters == []


def test_non_image_files_are_ignored(tmp_path):
    extra = {
        "images_background/README.txt": b"hello",
        "__MACOSX/images_background/x.png": b"",
        "images_background/Alpha/.DS_Store": b"junk",
    }
    write_archive(tmp_path / "images_background.zip", TOY, extra=extra)
    assert Omniglot(tmp_path, "all", cache=False).images.shape[0] == 9


def test_corrupt_png_in_a_zip_names_archive_and_member(tmp_path):
    extra = {"images_background/Beta/character01/broken_01.png": b"\x89PNG\r\n\x1a\n garbage"}
    write_archive(tmp_path / "images_background.zip", TOY, extra=extra)
    with pytest.raises(DatasetError) as error:
        Omniglot(tmp_path, "all", cache=False)
    message = str(error.value)
    assert "images_background.zip:images_background/Beta/character01/broken_01.png" in message
    assert "not a readable PNG" in message


def test_corrupt_png_in_a_folder_names_the_file(tmp_path):
    archive = write_archive(tmp_path / "images_background.zip", TOY)
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(tmp_path / "unpacked")
    broken = tmp_path / "unpacked" / "images_background" / "Alpha" / "character01" / "0000_02.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    with pytest.raises(DatasetError, match=rf"{broken}: not a readable PNG"):
        Omniglot(tmp_path / "unpacked", "all", cache=False)


def test_missing_root_and_missing_archives(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=rf"Omniglot root {tmp_path / 'absent'} does not "
        r"exist.*images_background\*\.zip",
    ):
        Omniglot(tmp_path / "absent", "all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"no Omniglot archives in .*empty.*"
        r"images_evaluation\*\.zip",
    ):
        Omniglot(tmp_path / "empty", "all")
    write_archive(tmp_path / "images_background.zip", TOY)
    with pytest.raises(
        FileNotFoundError,
        match=r"no Omniglot archive 'images_evaluation' in .*"
        r"looked for .*images_evaluation\.zip",
    ):
        Omniglot(tmp_path, "all", archives=["images_evaluation"])


def test_wrong_layout_says_what_was_expected(tmp_path):
    # The drawings sit directly under the alphabets: no top folder.
    write_archive(tmp_path / "images_background.zip", TOY, top="")
    with pytest.raises(
        DatasetError,
        match=r"Alpha/character01/0000_01\.png: a drawing at the "
        r"wrong depth; expected <archive>/<Alphabet>/"
        r"<characterNN>/",
    ):
        Omniglot(tmp_path, "all", cache=False)
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as archive:
        archive.writestr("images_evaluation/notes.txt", "no drawings here")
    with pytest.raises(DatasetError, match=r"images_evaluation\.zip holds no PNG drawings"):
        Omniglot(tmp_path, "all", archives=["images_evaluation"], cache=False)


def test_a_file_that_is_not_a_zip(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match=r"images_background\.zip is not a readable zip"):
        Omniglot(tmp_path, "all", cache=False)


# --------------------------------------------------------------------------------------------
# omniglot_image on other people's drawings


def test_omniglot_image_of_a_colour_drawing_on_a_wide_canvas():
    canvas = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(canvas).rectangle([0, 40, 199, 59], fill="black")  # a full-width bar
    image = omniglot_image(canvas)
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    # Padding to a square keeps the bar thin and centred: paper above and below it.
    assert torch.all(image[0, :8] == 0) and torch.all(image[0, -8:] == 0)
    assert torch.all(image[0, 14, 2:-2] > 0.95)


def test_transparent_background_counts_as_paper():
    strokes = Image.new("RGBA", (105, 105), (0, 0, 0, 0))
    ImageDraw.Draw(strokes).ellipse([20, 20, 80, 80], outline=(0, 0, 0, 255), width=6)
    on_white = Image.new("RGB", (105, 105), "white")
    ImageDraw.Draw(on_white).ellipse([20, 20, 80, 80], outline="black", width=6)
    transparent = omniglot_image(strokes)
    assert torch.equal(transparent, omniglot_image(on_white))
    assert transparent.max() > 0.9 and transparent[0, 14, 14] == 0

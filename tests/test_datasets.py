"""Folder, zip and synthetic datasets: content, labels, cache modes, bad input, the commands."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pic.data.folder import FolderData
from pic.data.make_zip import main as make_zip_main
from pic.data.sort_val import main as sort_val_main
from pic.data.synthetic import SyntheticData
from pic.data.zipdata import ZipData

CLASSES = ["n02", "n01", "n10"]  # created unsorted on purpose: labels follow sorted names


def to_array(image) -> np.ndarray:
    """The transform used here: the decoded image itself, as an (H, W, 3) uint8 array."""
    if isinstance(image, torch.Tensor):
        return [image.permute(1, 2, 0).numpy()]
    return [np.asarray(image)]


def write_png(path: Path, seed: int) -> np.ndarray:
    # PNG is lossless, so every decoder must return exactly these pixels.
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, dict[str, list[tuple[np.ndarray, int]]]]:
    """root/{train,val}/<class>/*.png and the expected (pixels, label) per split, in order."""
    root = tmp_path / "folder"
    expected: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "val": []}
    seed = 0
    for split, count in (("train", 3), ("val", 2)):
        files = []
        for name in CLASSES:
            for i in reversed(range(count)):
                seed += 1
                files.append(
                    (name, f"img{i}.png", write_png(root / split / name / f"img{i}.png", seed))
                )
        for name, _, pixels in sorted(files, key=lambda f: (f[0], f[1])):
            expected[split].append((pixels, sorted(CLASSES).index(name)))
    return root, expected


def items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_folder_items_in_sorted_order_with_class_labels(tree, split, decoder):
    root, expected = tree
    data = FolderData(str(root), decoder=decoder)
    assert data.num_classes == len(CLASSES)
    dataset = data.build(split, to_array)
    assert len(dataset) == len(expected[split]) and dataset.rank_indices is None
    for i, (item, (pixels, label)) in enumerate(zip(items(dataset), expected[split], strict=True)):
        assert item["index"] == i and item["label"] == label and item["replaced"] == 0
        np.testing.assert_array_equal(item["crops"][0], pixels)


def test_make_zip_round_trip_gives_the_same_dataset(tree, tmp_path):
    root, expected = tree
    assert make_zip_main([str(root), str(tmp_path / "zip")]) == 0
    data = ZipData(str(tmp_path / "zip"))
    assert data.num_classes == len(CLASSES)
    for split in ("train", "val"):
        dataset = data.build(split, to_array)
        got = [(item["crops"][0], item["label"]) for item in items(dataset)]
        assert len(got) == len(expected[split])
        for (pixels, label), (want_pixels, want_label) in zip(got, expected[split], strict=True):
            assert label == want_label
            np.testing.assert_array_equal(pixels, want_pixels)


def test_make_zip_reports_a_missing_source(tmp_path, capsys):
    assert make_zip_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert str(tmp_path / "nope" / "train") in capsys.readouterr().err


@pytest.fixture()
def zip_root(tree, tmp_path) -> Path:
    make_zip_main([str(tree[0]), str(tmp_path / "zip")])
    return tmp_path / "zip"


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_full_cache_serves_images_without_storage(tree, zip_root, kind):
    root = tree[0] if kind == "folder" else zip_root
    factory = FolderData if kind == "folder" else ZipData
    cached = factory(str(root), cache_mode="full").build("train", to_array)
    shutil.rmtree(root)  # everything must now come from RAM
    for item, (pixels, label) in zip(items(cached), tree[1]["train"], strict=True):
        assert item["label"] == label and item["replaced"] == 0
        np.testing.assert_array_equal(item["crops"][0], pixels)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_part_cache_holds_this_ranks_shard(tree, zip_root, kind):
    root = tree[0] if kind == "folder" else zip_root
    factory = FolderData if kind == "folder" else ZipData
    n = len(tree[1]["train"])
    shards = [
        factory(str(root), cache_mode="part").build("train", to_array, rank=r, world_size=2)
        for r in range(2)
    ]
    assert shards[0].rank_indices == list(range(0, n, 2))
    assert shards[1].rank_indices == list(range(1, n, 2))
    shutil.rmtree(root)
    for rank, dataset in enumerate(shards):
        assert len(dataset) == n  # indices stay global
        for i in dataset.rank_indices:
            np.testing.assert_array_equal(dataset[i]["crops"][0], tree[1]["train"][i][0])
        # Not held by this rank and storage is gone: replaced by an image of this rank's shard.
        item = dataset[1 - rank]
        assert item["replaced"] == 1 and item["index"] in dataset.rank_indices


def test_zip_dataset_works_in_forked_loader_workers(zip_root):
    dataset = ZipData(str(zip_root)).build("train", lambda im: [torch.from_numpy(to_array(im)[0])])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    indices = torch.cat([batch["index"] for batch in loader]).tolist()
    assert indices == list(range(len(dataset)))


def test_synthetic_images_are_a_function_of_the_index():
    data = SyntheticData(num_images=20, num_val_images=5, num_classes=3, resolution=16)
    a, b = data.build("train", to_array), data.build("train", to_array)
    np.testing.assert_array_equal(a[7]["crops"][0], b[7]["crops"][0])
    assert a[7]["crops"][0].shape == (16, 16, 3)
    assert not np.array_equal(a[7]["crops"][0], a[8]["crops"][0])
    assert not np.array_equal(a[0]["crops"][0], data.build("val", to_array)[0]["crops"][0])
    assert [a[i]["label"] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert len(a) == 20 and len(data.build("val", to_array)) == 5


# ---------------------------------------------------------------- corrupt images


@pytest.fixture()
def corrupt_tree(tree) -> tuple[Path, Path]:
    root = tree[0]
    bad = root / "train" / "n01" / "img1.png"  # index 1 (n01 comes first, files sorted)
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return root, bad


def test_corrupt_image_is_replaced_reported_and_counted(corrupt_tree, caplog):
    root, bad = corrupt_tree
    dataset = FolderData(str(root)).build("train", to_array)
    with caplog.at_level(logging.WARNING):
        item = dataset[1]
    assert item["replaced"] == 1 and item["index"] == 2  # the next readable image
    assert str(bad) in caplog.text
    assert dataset[0]["replaced"] == 0


def test_corrupt_image_is_an_error_when_strict(corrupt_tree):
    root, bad = corrupt_tree
    dataset = FolderData(str(root), strict=True).build("train", to_array)
    with pytest.raises(RuntimeError, match=str(bad)):
        dataset[1]


def test_corrupt_zip_member_is_replaced(tmp_path):
    root = tmp_path / "z"
    root.mkdir()
    with zipfile.ZipFile(root / "train.zip", "w") as archive:
        archive.writestr("a.jpg", b"not an image")
        good = tmp_path / "b.png"
        write_png(good, 1)
        archive.write(good, "b.png")
    (root / "train_map.txt").write_text("a.jpg 0\nb.png 1\n")
    item = ZipData(str(root)).build("train", to_array)[0]
    assert item["replaced"] == 1 and item["index"] == 1 and item["label"] == 1


# ---------------------------------------------------------------- bad input at start-up


def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "train")):
        FolderData(str(tmp_path / "nope")).build("train", to_array)


def test_empty_class_folder_is_named(tree):
    root = tree[0]
    empty = root / "val" / "n10"
    shutil.rmtree(empty)
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} contains no images"):
        FolderData(str(root)).build("val", to_array)


def test_val_missing_a_train_class_is_named(tree):
    root = tree[0]
    shutil.rmtree(root / "val" / "n02")
    with pytest.raises(FileNotFoundError, match=str(root / "val" / "n02")):
        FolderData(str(root)).build("val", to_array)


def test_split_without_class_folders_is_named(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'train'} has no class sub-folders"):
        FolderData(str(tmp_path)).build("train", to_array)


@pytest.mark.parametrize(
    "map_text, message",
    [
        ("n01/img0.png 0\n\nn01/img1.png\n", r"train_map.txt:3: expected '<path in zip> <label>'"),
        ("n01/img0.png 0\nn01/img1.png zero\n", r"train_map.txt:2: label 'zero' is not an integer"),
        ("n01/img0.png -1\n", r"train_map.txt:1: label -1 is negative"),
        ("n01/img0.png 0\n\nn01/missing.png 0\n", r"train_map.txt:3: 'n01/missing.png' is not in"),
        ("\n\n", "lists no images"),
    ],
)
def test_bad_map_file_names_file_and_line(zip_root, map_text, message):
    (zip_root / "train_map.txt").write_text(map_text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ZipData(str(zip_root)).build("train", to_array)


def test_map_file_accepts_tabs_and_spaces(zip_root):
    (zip_root / "train_map.txt").write_text("n01/img0.png\t0\nn02/img1.png   1\n")
    dataset = ZipData(str(zip_root)).build("train", to_array)
    assert [dataset[i]["label"] for i in range(2)] == [0, 1]


def test_missing_and_invalid_zip_are_named(zip_root):
    (zip_root / "val.zip").unlink()
    with pytest.raises(FileNotFoundError, match=str(zip_root / "val.zip")):
        ZipData(str(zip_root)).build("val", to_array)
    (zip_root / "val.zip").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{zip_root / 'val.zip'} is not a valid zip"):
        ZipData(str(zip_root)).build("val", to_array)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cache_mode="some"), "data.cache_mode"),
        (dict(decoder="opencv"), "data.decoder"),
    ],
)
@pytest.mark.parametrize("factory", [FolderData, ZipData])
def test_bad_options_are_named(factory, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        factory(str(tmp_path), **kwargs)


def test_bad_split_is_named(tree):
    with pytest.raises(ValueError, match="'test'"):
        FolderData(str(tree[0])).build("test", to_array)


# ---------------------------------------------------------------- sort_val


def test_sort_val_moves_images_into_class_folders(tmp_path):
    flat = tmp_path / "val"
    pixels = {name: write_png(flat / name, i) for i, name in enumerate(["v1.png", "v2.png"])}
    (tmp_path / "map.txt").write_text("v1.png n02\nv2.png\tn01\n")
    assert sort_val_main([str(flat), str(tmp_path / "map.txt")]) == 0
    assert sorted(p.relative_to(flat).as_posix() for p in flat.rglob("*.png")) == [
        "n01/v2.png",
        "n02/v1.png",
    ]
    np.testing.assert_array_equal(np.asarray(Image.open(flat / "n02" / "v1.png")), pixels["v1.png"])


@pytest.mark.parametrize(
    "map_text, message",
    [
        ("v1.png n02\nv2.png\n", "map.txt:2: expected '<file name> <class>'"),
        ("v1.png n02\nv3.png n01\n", "map.txt:2: .*v3.png does not exist"),
        ("v1.png n02\nv1.png n01\n", "map.txt:2: v1.png is listed twice"),
    ],
)
def test_sort_val_bad_map_leaves_folder_untouched(tmp_path, capsys, map_text, message):
    flat = tmp_path / "val"
    for i, name in enumerate(["v1.png", "v2.png"]):
        write_png(flat / name, i)
    (tmp_path / "map.txt").write_text(map_text)
    assert sort_val_main([str(flat), str(tmp_path / "map.txt")]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in flat.iterdir()) == ["v1.png", "v2.png"]


@pytest.mark.parametrize("main", [make_zip_main, sort_val_main])
def test_commands_have_help(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_torchvision_decoder_falls_back_to_pil_for_other_formats(tmp_path):
    pixels = np.random.default_rng(5).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / split / "c" / "x.bmp")  # decode_image: no BMP
    item = FolderData(str(tmp_path), decoder="torchvision").build("train", to_array)[0]
    assert item["replaced"] == 0
    np.testing.assert_array_equal(item["crops"][0], pixels)


# ---------------------------------------------------------------- labels and names (issue 15)


def _map_lines(zip_root: Path, split: str) -> list[str]:
    return (zip_root / f"{split}_map.txt").read_text().splitlines()


def test_val_label_outside_the_train_classes_is_named(zip_root):
    lines = _map_lines(zip_root, "val")
    lines[3] = lines[3].rsplit(maxsplit=1)[0] + " 7"  # 3 train classes: 0..2
    (zip_root / "val_map.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"val_map.txt:4: label 7 is not a class of .*"
                                         r"train_map.txt \(labels 0..2\); 1 such line"):
        ZipData(str(zip_root)).build("val", to_array)


def test_train_label_that_makes_empty_classes_is_named(zip_root):
    lines = _map_lines(zip_root, "train")
    lines[5] = lines[5].rsplit(maxsplit=1)[0] + " 999"
    (zip_root / "train_map.txt").write_text("\n".join(lines) + "\n")
    message = r"train_map.txt:6: label 999 makes 1000 classes, but 996 of them have no image"
    with pytest.raises(ValueError, match=message):
        ZipData(str(zip_root)).num_classes  # noqa: B018 (the property reads the map)
    with pytest.raises(ValueError, match=message):
        ZipData(str(zip_root)).build("train", to_array)


def test_duplicated_map_lines_are_counted_in_a_warning(zip_root, caplog):
    lines = _map_lines(zip_root, "train")
    (zip_root / "train_map.txt").write_text("\n".join([*lines, lines[0], "", lines[2]]) + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = ZipData(str(zip_root)).build("train", to_array)
    assert len(dataset) == len(lines) + 2  # kept (instance indices follow the lines), but said
    assert re.search(rf"train_map.txt: 2 duplicated line\(s\).*line {len(lines) + 1} repeats "
                     r"line 1", caplog.text)


def test_val_class_absent_from_train_is_named(tree):
    root = tree[0]
    write_png(root / "val" / "n99" / "x.png", 3)
    with pytest.raises(ValueError, match=f"{root / 'val' / 'n99'} is not a class of "
                                         f"{root / 'train'}"):
        FolderData(str(root)).build("val", to_array)


def test_map_file_that_is_not_utf8_is_named_with_its_line(zip_root):
    lines = _map_lines(zip_root, "train")
    data = ("\n".join(lines[:2]) + "\n").encode() + b"caf\xe9.png 0\n"
    (zip_root / "train_map.txt").write_bytes(data)
    with pytest.raises(ValueError, match=r"train_map.txt:3: not UTF-8 text \(byte 0xe9 at "
                                         r"column 4\)"):
        ZipData(str(zip_root)).build("train", to_array)


def test_warning_for_a_corrupt_image_with_a_non_utf8_name_is_logged(tree):
    """The log stream is strict UTF-8 (as a UTF-8 terminal or log file): before, the warning's
    path (lone surrogates) failed the write and the warning was lost."""
    root = tree[0]
    bad = os.fsencode(root / "train" / "n01") + b"/caf\xe9.png"  # first of n01, index 0
    with open(bad, "wb") as f:
        f.write(b"\x89PNG truncated")
    dataset = FolderData(str(root)).build("train", to_array)
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("pic.data.base")
    logger.addHandler(handler)
    try:
        item = dataset[0]
    finally:
        logger.removeHandler(handler)
    assert item["replaced"] == 1
    stream.flush()
    text = stream.buffer.getvalue().decode()
    assert "skipping unreadable image" in text and "caf\\xe9.png" in text


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_fingerprint_follows_the_listing_not_the_location(tree, zip_root, tmp_path, kind):
    root = tree[0] if kind == "folder" else zip_root
    factory = FolderData if kind == "folder" else ZipData
    before = factory(str(root)).build("train", to_array).fingerprint()
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert factory(str(moved)).build("train", to_array).fingerprint() == before
    assert factory(str(root)).build("val", to_array).fingerprint() != before
    if kind == "folder":
        (moved / "train" / "n01" / "img0.png").unlink()
    else:
        lines = _map_lines(moved, "train")
        (moved / "train_map.txt").write_text("\n".join(lines[1:]) + "\n")
    assert factory(str(moved)).build("train", to_array).fingerprint() != before

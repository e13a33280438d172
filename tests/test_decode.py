"""Crop decoding: a JPEG rectangle decoded alone equals the same rectangle of a full decode
(torchvision's decoder, an independent path), the training transforms give identical views
from a lazily decoded JPEG and from decoded pixels, and corrupt files are still caught."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from pic import native
from pic.data import decode as D
from pic.data import transforms as T
from pic.data.folder import FolderData

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour field with texture: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
    return (base + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, subsampling: int = 2, mode: str = "RGB",
         progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90,
                                              subsampling=subsampling, progressive=progressive)
    return buffer.getvalue()


def full_decode(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                       mode=D.ImageReadMode.RGB)


def test_the_native_library_is_built() -> None:
    assert D.crop_decoding(), f"{native.PATH} is missing: `make install` builds it (needs cc " \
                              "and libjpeg headers: apt install libjpeg-dev)"


# 4:2:0, 4:2:2 and 4:4:4 chroma subsampling, grayscale (expanded to RGB), progressive.
@pytest.mark.parametrize("subsampling, mode, progressive",
                         [(2, "RGB", False), (1, "RGB", False), (0, "RGB", False),
                          (2, "L", False), (2, "RGB", True)])
def test_region_equals_the_same_rectangle_of_a_full_decode(subsampling: int, mode: str,
                                                           progressive: bool) -> None:
    height, width = 83, 117  # not multiples of the 8/16-px blocks
    data = jpeg(photo(height, width), subsampling, mode, progressive)
    image = D.lazy_jpeg(data)
    assert image is not None and (image.height, image.width) == (height, width)
    full = full_decode(data)
    rng = np.random.default_rng(1)
    boxes = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1),
             (0, 16, 40, 32), (17, 15, 20, 50), (height - 30, width - 40, 30, 40)]
    for _ in range(40):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        boxes.append((top, left, int(rng.integers(1, height - top + 1)),
                      int(rng.integers(1, width - left + 1))))
    for top, left, h, w in boxes:
        region = image.region(top, left, h, w)
        assert region.shape == (3, h, w)
        assert torch.equal(region, full[:, top:top + h, left:left + w]), (top, left, h, w)


@pytest.mark.parametrize("build", [
    lambda: T.linear_eval_resized_crop(32, MEAN, STD),
    lambda: T.simclr(24, MEAN, STD),
    lambda: T.MultiCrop(MEAN, STD, [T.CropGroup(32, 1, [0.3, 1.0]),
                                    T.CropGroup(16, 3, [0.05, 0.2])]),
])
def test_views_from_a_lazy_jpeg_equal_views_from_its_pixels(build) -> None:
    transform = build()
    data = jpeg(photo(70, 90, seed=2))
    for seed in range(5):
        torch.manual_seed(seed)
        lazy = transform(D.lazy_jpeg(data))
        torch.manual_seed(seed)
        eager = transform(full_decode(data))
        assert all(torch.equal(a, b) for a, b in zip(lazy, eager, strict=True))


def test_cmyk_jpeg_falls_back_to_the_full_decoder() -> None:
    data = jpeg(photo(40, 50), mode="CMYK")  # the crop decoder outputs RGB only
    image = D.lazy_jpeg(data)
    assert image is not None
    region = image.region(5, 7, 10, 12)
    assert torch.equal(region, D.decode(data, "torchvision")[:, 5:15, 7:19])


def test_without_the_library_images_are_decoded_whole(monkeypatch) -> None:
    data = jpeg(photo(20, 30))
    monkeypatch.setattr(native, "LIB", None)
    assert not D.crop_decoding() and D.lazy_jpeg(data) is None
    decoded = D.decode(data, "torchvision", lazy=True)
    assert isinstance(decoded, torch.Tensor) and torch.equal(decoded, full_decode(data))


def test_only_transforms_that_accept_a_jpeg_file_get_one(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        (tmp_path / split / "c" / "a.jpg").write_bytes(jpeg(photo(20, 30)))
    seen = []
    data = FolderData(str(tmp_path))
    data.build("train", lambda image: seen.append(type(image)) or [])[0]
    assert seen == [torch.Tensor]  # a plain callable: decoded pixels
    item = data.build("train", T.linear_eval_resized_crop(16, MEAN, STD))[0]
    assert item["crops"][0].shape == (3, 16, 16)


def truncated_jpeg() -> bytes:
    data = jpeg(photo(64, 64, seed=3))
    return data[:len(data) // 2]


def test_truncated_jpeg_is_decoded_whole_and_rejected() -> None:
    data = truncated_jpeg()
    # Without its end marker it is not decoded lazily: a crop of the intact top would pass.
    assert D.lazy_jpeg(data) is None
    with pytest.raises(Exception, match="truncated"):
        D.decode(data, "torchvision", lazy=True)
    # Were it lazy, a crop reaching the missing part falls back to a full decode, which fails.
    with pytest.raises(D.UnreadableImage, match="truncated"):
        D.JPEGFile(data, 64, 64).region(40, 0, 24, 64)


def test_corrupt_jpeg_found_at_crop_time_is_replaced_and_counted(tmp_path: Path, caplog,
                                                                  monkeypatch) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        (tmp_path / split / "c" / "b.jpg").write_bytes(jpeg(photo(64, 64)))
    bad = tmp_path / "train" / "c" / "a.jpg"
    bad.write_bytes(truncated_jpeg())
    # Every JPEG lazy, the truncated one too: its crop covers the whole image and fails.
    monkeypatch.setattr(D, "lazy_jpeg", lambda data: D.JPEGFile(data, 64, 64))
    transform = T.linear_eval_resized_crop(16, MEAN, STD)
    monkeypatch.setattr(transform.crop, "scale", (1.0, 1.0))
    monkeypatch.setattr(transform.crop, "ratio", (1.0, 1.0))
    with caplog.at_level(logging.WARNING):
        item = FolderData(str(tmp_path)).build("train", transform)[0]
    assert item["replaced"] == 1 and item["index"] == 1 and str(bad) in caplog.text
    with pytest.raises(RuntimeError, match=str(bad)):
        FolderData(str(tmp_path), strict=True).build("train", transform)[0]


def test_a_bug_in_a_transform_is_not_taken_for_a_bad_image(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        (tmp_path / split / "c" / "a.jpg").write_bytes(jpeg(photo(20, 30)))

    def broken(image):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        FolderData(str(tmp_path)).build("train", broken)[0]

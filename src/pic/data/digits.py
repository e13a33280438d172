"""scikit-learn's handwritten digits: 1,797 real 8×8 images shipped with the library.

Upsampled to 32×32 RGB so that the same transforms and backbones as for natural images apply.
The split is fixed (stratified, 1,257 train / 540 held out), so results are comparable.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import ImageData, InstanceDataset, Transform, digest


def _digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(p, mode="L").resize((size, size), Image.BILINEAR))
        for p in pixels
    ])
    return images, digits.target.astype(np.int64)


class DigitsDataset(InstanceDataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform) -> None:
        super().__init__(transform, strict=True)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L").convert("RGB")

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"sklearn digits #{index}"

    def fingerprint(self) -> str:
        return digest(self.images.tobytes(), self.labels)  # 1.3 MB: cheap


class Digits(ImageData):
    """The embedded default dataset (no download, no files)."""

    num_classes = 10

    def __init__(self, image_size: int = 32, held_out: float = 0.3, split_seed: int = 0,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        self.image_size = image_size
        self.held_out = held_out
        self.split_seed = split_seed
        self.mean = list(mean) if mean is not None else [0.305, 0.305, 0.305]
        self.std = list(std) if std is not None else [0.324, 0.324, 0.324]

    def build(self, split: str, transform: Transform, rank: int = 0,
              world_size: int = 1) -> DigitsDataset:
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"data=digits: split must be 'train' or 'val', got {split!r}")
        images, labels = _digit_images(self.image_size)
        train, val = train_test_split(np.arange(len(labels)), test_size=self.held_out,
                                      stratify=labels, random_state=self.split_seed)
        keep = np.sort(train if split == "train" else val)
        return DigitsDataset(images[keep], labels[keep], transform)

"""`data=synthetic`: random images generated from their index, for benchmarks and tests.

Image i is a function of (split, seed, i) alone: a coarse random colour grid upsampled to
`resolution` px plus fine noise, so crops differ in content and the augmentations have work to
do. Any N, no disk; label = i % num_classes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import ImageData, InstanceDataset, Transform, digest
from .encoded import check_split

_SPLIT_STREAM = {"train": 0, "val": 1}


class SyntheticDataset(InstanceDataset):
    """`size` generated RGB images of `resolution` x `resolution` px."""

    def __init__(
        self,
        size: int,
        num_classes: int,
        resolution: int,
        seed: int,
        split: str,
        transform: Transform,
    ) -> None:
        super().__init__(transform, strict=True)  # a generated image cannot be corrupt
        self.size = size
        self.num_classes = num_classes
        self.resolution = resolution
        self.seed = seed
        self.split = split

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(grid).resize((self.resolution, self.resolution), Image.BILINEAR)
        noise = rng.integers(-16, 17, size=(self.resolution, self.resolution, 3))
        pixels = (np.asarray(image, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
        return Image.fromarray(pixels)

    def label(self, index: int) -> int:
        return index % self.num_classes

    def describe(self, index: int) -> str:
        return f"synthetic {self.split} image #{index}"

    def fingerprint(self) -> str:
        """What defines every image and label: O(1), where listing N names costs minutes and
        gigabytes at N = 10^8."""
        return digest("synthetic", self.split, [self.size, self.num_classes, self.resolution,
                                                self.seed])


class SyntheticData(ImageData):
    """Factory of generated train/val splits of `num_images` / `num_val_images` images."""

    def __init__(
        self,
        num_images: int = 10_000,
        num_val_images: int = 1_000,
        num_classes: int = 10,
        resolution: int = 64,
        image_size: int = 32,
        seed: int = 0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        for key, value in (
            ("num_images", num_images),
            ("num_val_images", num_val_images),
            ("num_classes", num_classes),
            ("resolution", resolution),
            ("image_size", image_size),
        ):
            if value < 1:
                raise ValueError(f"data=synthetic: data.{key} must be >= 1, got {value}")
        self.num_images = num_images
        self.num_val_images = num_val_images
        self.num_classes = num_classes
        self.resolution = resolution
        self.image_size = image_size
        self.seed = seed
        # Uniform pixels in [0, 255] have mean 0.5 and std ~0.29 per channel.
        self.mean = list(mean) if mean is not None else [0.5, 0.5, 0.5]
        self.std = list(std) if std is not None else [0.29, 0.29, 0.29]

    def build(
        self, split: str, transform: Transform, rank: int = 0, world_size: int = 1
    ) -> SyntheticDataset:
        check_split(split, "synthetic")
        size = self.num_images if split == "train" else self.num_val_images
        return SyntheticDataset(
            size, self.num_classes, self.resolution, self.seed, split, transform
        )

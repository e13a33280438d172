"""`data=folder`: an image folder tree, `root/{train,val}/<class>/<image>`.

Classes are the sorted sub-folder names of `root/train` (label = position); files are sorted
within each class, so image indices (PIC's instance labels) are stable across runs and machines.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from .base import Transform
from .encoded import EncodedImageData, EncodedImageDataset, check_split, printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of `split_dir`; errors name the folder at fault."""
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"data=folder: {printable(str(split_dir))} is not a folder (check data.root)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise ValueError(f"data=folder: {printable(str(split_dir))} has no class sub-folders")
    return classes


def scan_folder(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int], list[int]]:
    """(paths, labels, sizes in bytes) of the images under `split_dir/<class>/`, sorted."""
    paths: list[Path] = []
    labels: list[int] = []
    sizes: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"data=folder: class folder {printable(str(class_dir))} is "
                                    "missing (classes come from train/)")
        entries = sorted(
            (e for e in os.scandir(class_dir) if e.is_file() and not e.name.startswith(".")),
            key=lambda e: e.name,
        )
        images = [e for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise ValueError(f"data=folder: {printable(str(class_dir))} contains no images "
                             f"{IMAGE_EXTENSIONS}")
        for e in images:
            paths.append(Path(e.path))
            labels.append(label)
            sizes.append(e.stat().st_size)
    return paths, labels, sizes


class FolderDataset(EncodedImageDataset):
    """Images read from individual files under `split_dir`; `options` are
    :class:`~.encoded.EncodedImageDataset`'s."""

    def __init__(self, split_dir: Path, paths: list[Path], labels: list[int], sizes: list[int],
                 transform: Transform, **options) -> None:
        self.split_dir, self.paths = split_dir, paths
        super().__init__(labels, sizes, transform, **options)

    def read(self, index: int) -> bytes:
        return self.paths[index].read_bytes()

    def name(self, index: int) -> str:
        return self.paths[index].relative_to(self.split_dir).as_posix()

    def describe(self, index: int) -> str:
        return printable(str(self.paths[index]))


class FolderData(EncodedImageData):
    """Factory for `root/train/<class>/*` and `root/val/<class>/*`."""

    @cached_property
    def classes(self) -> list[str]:
        """Class names, from `root/train` (val must have the same folders)."""
        return list_classes(self.root / "train")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build(
        self, split: str, transform: Transform, rank: int = 0, world_size: int = 1
    ) -> FolderDataset:
        check_split(split, "folder")
        split_dir = self.root / split
        # Every folder of val/ must be a train class: one that is not would be silently dropped.
        unknown = sorted(set(list_classes(split_dir)) - set(self.classes))
        if unknown:
            raise ValueError(
                f"data=folder: {printable(str(split_dir / unknown[0]))} is not a class of "
                f"{printable(str(self.root / 'train'))} ({len(unknown)} such folder(s) in "
                f"{split}/; classes come from train/)")
        paths, labels, sizes = scan_folder(split_dir, self.classes)
        return FolderDataset(split_dir, paths, labels, sizes, transform,
                             **self.dataset_options(rank, world_size))

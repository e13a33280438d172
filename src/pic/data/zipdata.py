"""`data=zip`: zipped images, `root/{train,val}.zip` plus `root/{train,val}_map.txt`.

Each map line is `<path inside the zip><tab or spaces><integer label>`; the image index is the
line's position among the non-blank lines. Nothing is extracted: each process (each loader
worker) opens the zip once, on first use, and keeps the handle.
"""

from __future__ import annotations

import os
import zipfile
from functools import cached_property
from pathlib import Path

from .base import Transform
from .encoded import EncodedImageData, EncodedImageDataset, check_split


def read_map(map_path: Path) -> tuple[list[str], list[int]]:
    """(paths, labels) of a map file; one error naming file and line for a malformed line."""
    if not map_path.is_file():
        raise FileNotFoundError(f"data=zip: map file {map_path} not found (check data.root)")
    paths: list[str] = []
    labels: list[int] = []
    with open(map_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            # rsplit: the label is the last field, so a path may itself contain spaces.
            fields = line.strip().rsplit(maxsplit=1)
            if len(fields) != 2:
                raise ValueError(
                    f"{map_path}:{number}: expected '<path in zip> <label>', got {line.strip()!r}"
                )
            path, label = fields
            try:
                value = int(label)
            except ValueError:
                raise ValueError(
                    f"{map_path}:{number}: label {label!r} is not an integer"
                ) from None
            if value < 0:
                raise ValueError(f"{map_path}:{number}: label {value} is negative")
            paths.append(path)
            labels.append(value)
    if not paths:
        raise ValueError(f"data=zip: map file {map_path} lists no images")
    return paths, labels


class ZipDataset(EncodedImageDataset):
    """Images read from the members of one zip file, listed by a map file."""

    def __init__(
        self,
        zip_path: Path,
        map_path: Path,
        transform: Transform,
        strict: bool = False,
        decoder: str = "torchvision",
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.zip_path = zip_path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        names, labels = read_map(map_path)
        if not zip_path.is_file():
            raise FileNotFoundError(f"data=zip: {zip_path} not found (check data.root)")
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = {info.filename: info for info in archive.infolist()}
        except zipfile.BadZipFile as err:
            raise ValueError(f"data=zip: {zip_path} is not a valid zip file: {err}") from None
        self.members = []
        for number, name in enumerate(names):
            if name not in members:
                line = _line_of(map_path, number)
                raise FileNotFoundError(f"{map_path}:{line}: {name!r} is not in {zip_path}")
            self.members.append(members[name])
        sizes = [info.file_size for info in self.members]
        super().__init__(labels, sizes, transform, strict, decoder, cache_mode, rank, world_size)
        self._close()  # caching opened the zip in this process; workers open their own

    def _archive(self) -> zipfile.ZipFile:
        # A handle inherited through fork shares its file offset with the parent: reopen per
        # process (each loader worker opens the zip once and keeps it).
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return self._zip

    def _close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self) -> dict:
        # Spawned workers receive the dataset pickled: send no open handle.
        state = self.__dict__.copy()
        state["_zip"] = None
        return state

    def read(self, index: int) -> bytes:
        return self._archive().read(self.members[index])

    def describe(self, index: int) -> str:
        return f"{self.zip_path}:{self.members[index].filename}"


def _line_of(map_path: Path, entry: int) -> int:
    """1-based line number of the `entry`-th non-blank line (only called to report an error)."""
    with open(map_path, encoding="utf-8") as f:
        nonblank = (n for n, line in enumerate(f, start=1) if line.strip())
        for i, number in enumerate(nonblank):
            if i == entry:
                return number
    raise IndexError(entry)


class ZipData(EncodedImageData):
    """Factory for `root/{train,val}.zip` + `root/{train,val}_map.txt` (ImageNet's zip format).

    The number of classes is the largest train label + 1. `image_size` is the training crop
    size; `mean`/`std` (RGB, 0-1 scale) normalise the crops, ImageNet's statistics by default.
    """

    @cached_property
    def num_classes(self) -> int:
        _, labels = read_map(self.root / "train_map.txt")
        return max(labels) + 1

    def build(
        self, split: str, transform: Transform, rank: int = 0, world_size: int = 1
    ) -> ZipDataset:
        check_split(split, "zip")
        return ZipDataset(
            self.root / f"{split}.zip",
            self.root / f"{split}_map.txt",
            transform,
            self.strict,
            self.decoder,
            self.cache_mode,
            rank,
            world_size,
        )

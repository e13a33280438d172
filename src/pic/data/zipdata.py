"""`data=zip`: zipped images, `root/{train,val}.zip` plus `root/{train,val}_map.txt`.

Each map line is `<path inside the zip><tab or spaces><integer label>`; the image index is the
line's position among the non-blank lines. Nothing is extracted: each process (each loader
worker) opens the zip once, on first use, and keeps the handle.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .base import Transform
from .encoded import EncodedImageData, EncodedImageDataset, check_split, printable

log = logging.getLogger(__name__)


@dataclass
class MapFile:
    """A map file's entries: member paths, labels, and each entry's 1-based line number."""

    path: Path
    names: list[str]
    labels: list[int]
    lines: list[int]

    def where(self, entry: int) -> str:
        """``<map file>:<line>`` of entry ``entry``, for messages."""
        return f"{self.path}:{self.lines[entry]}"


def read_map(map_path: Path) -> MapFile:
    """The entries of a map file; one error naming file and line for a malformed line, and a
    warning counting duplicated lines (each would be one more instance)."""
    if not map_path.is_file():
        raise FileNotFoundError(f"data=zip: map file {map_path} not found (check data.root)")
    entries = MapFile(map_path, [], [], [])
    for number, raw in enumerate(map_path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{map_path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} "
                             f"at column {err.start + 1}); map files must be UTF-8") from None
        if not line:
            continue
        # rsplit: the label is the last field, so a path may itself contain spaces.
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise ValueError(f"{map_path}:{number}: expected '<path in zip> <label>', got "
                             f"{line!r}")
        try:
            value = int(fields[1])
        except ValueError:
            raise ValueError(f"{map_path}:{number}: label {fields[1]!r} is not an integer") \
                from None
        if value < 0:
            raise ValueError(f"{map_path}:{number}: label {value} is negative")
        entries.names.append(fields[0])
        entries.labels.append(value)
        entries.lines.append(number)
    if not entries.names:
        raise ValueError(f"data=zip: map file {map_path} lists no images")
    _warn_duplicates(entries)
    return entries


def _warn_duplicates(entries: MapFile) -> None:
    first: dict[str, int] = {}
    repeats = []
    for i, name in enumerate(entries.names):
        if first.setdefault(name, i) != i:
            repeats.append(i)
    if repeats:
        i = repeats[0]
        log.warning("%s: %d duplicated line(s), each counted as one more instance (first: line "
                    "%d repeats line %d, %r)", entries.path, len(repeats), entries.lines[i],
                    entries.lines[first[entries.names[i]]], entries.names[i])


def check_train_labels(entries: MapFile) -> int:
    """The number of classes, K = largest label + 1, once every label below K has an image."""
    labels = np.asarray(entries.labels)
    counts = np.bincount(labels)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        top = int(np.argmax(labels))
        raise ValueError(
            f"{entries.where(top)}: label {labels[top]} makes {len(counts)} classes, but "
            f"{len(empty)} of them have no image (first: {int(empty[0])}); labels must be "
            f"0..K-1 with an image each")
    return len(counts)


def check_val_labels(entries: MapFile, num_classes: int, train_map: Path) -> None:
    """Every val label is a train class (one that is not could only be scored wrong)."""
    bad = np.flatnonzero(np.asarray(entries.labels) >= num_classes)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{entries.where(i)}: label {entries.labels[i]} is not a class of "
                         f"{train_map} (labels 0..{num_classes - 1}); {len(bad)} such line(s)")


class ZipDataset(EncodedImageDataset):
    """Images read from the members of one zip file, listed by a map file; `options` are
    :class:`~.encoded.EncodedImageDataset`'s."""

    def __init__(self, zip_path: Path, entries: MapFile, transform: Transform,
                 **options) -> None:
        self.zip_path = zip_path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if not zip_path.is_file():
            raise FileNotFoundError(f"data=zip: {zip_path} not found (check data.root)")
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = {info.filename: info for info in archive.infolist()}
        except zipfile.BadZipFile as err:
            raise ValueError(f"data=zip: {zip_path} is not a valid zip file: {err}") from None
        self.members = []
        for i, name in enumerate(entries.names):
            if name not in members:
                raise FileNotFoundError(f"{entries.where(i)}: {name!r} is not in {zip_path}")
            self.members.append(members[name])
        sizes = [info.file_size for info in self.members]
        super().__init__(entries.labels, sizes, transform, **options)
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

    def name(self, index: int) -> str:
        return self.members[index].filename

    def describe(self, index: int) -> str:
        return printable(f"{self.zip_path}:{self.members[index].filename}")


class ZipData(EncodedImageData):
    """Factory for `root/{train,val}.zip` + `root/{train,val}_map.txt` (ImageNet's zip format).

    The number of classes is the largest train label + 1; every class must have a train image
    and every val label must be a class.
    """

    @cached_property
    def num_classes(self) -> int:
        return check_train_labels(read_map(self.root / "train_map.txt"))

    def build(
        self, split: str, transform: Transform, rank: int = 0, world_size: int = 1
    ) -> ZipDataset:
        check_split(split, "zip")
        entries = read_map(self.root / f"{split}_map.txt")
        if split == "train":
            check_train_labels(entries)
        else:
            check_val_labels(entries, self.num_classes, self.root / "train_map.txt")
        return ZipDataset(self.root / f"{split}.zip", entries, transform,
                          **self.dataset_options(rank, world_size))

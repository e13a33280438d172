"""Datasets of encoded image files (folder tree, zip members) with an optional RAM cache.

The cache keeps the encoded bytes, not decoded pixels (a JPEG is ~10x smaller), in one flat
uint8 array plus offsets. One array instead of a million `bytes` objects matters with forked
loader workers: reading Python objects touches their reference counts, which copies the
memory pages into every worker; a numpy buffer is read without writing to it.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from pathlib import Path

import numpy as np

from .base import ImageData, InstanceDataset, Transform, digest
from .decode import check_decoder, decode, describe_decoder

log = logging.getLogger(__name__)

CACHE_MODES = ("no", "full", "part")
SPLITS = ("train", "val")


def check_split(split: str, data: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"data={data}: split must be one of {SPLITS}, got {split!r}")


def check_cache_mode(cache_mode: str) -> None:
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"data.cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")


class EncodedImageDataset(InstanceDataset):
    """N encoded images with integer labels; subclasses say how to read image i's bytes.

    cache_mode: `no` reads every item from storage; `full` reads all N images into RAM at
    construction; `part` only those with index % world_size == rank, and `rank_indices` lists
    them so that the sampler draws only cached images.
    """

    def __init__(
        self,
        labels: list[int],
        sizes: list[int] | None,
        transform: Transform,
        strict: bool = False,
        decoder: str = "torchvision",
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(transform, strict)
        check_decoder(decoder)
        check_cache_mode(cache_mode)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sizes = np.asarray(sizes if sizes is not None else [], dtype=np.int64)
        self.decoder = decoder
        self.cache_mode = cache_mode
        # Cache: bytes of image i are buffer[offsets[i]:offsets[i] + lengths[i]]; length -1 =
        # not cached.
        self._buffer: np.ndarray | None = None
        if cache_mode != "no":
            held = range(len(labels))
            if cache_mode == "part":
                held = range(rank, len(labels), world_size)
                self.rank_indices = list(held)
            assert sizes is not None, "caching needs the file sizes"
            self._fill_cache(list(held), list(sizes))
        log.info(
            "%s: %d images, decoder %s", type(self).__name__, len(self), describe_decoder(decoder)
        )

    def _fill_cache(self, held: list[int], sizes: list[int]) -> None:
        self._offsets = np.zeros(len(self.labels), dtype=np.int64)
        self._lengths = np.full(len(self.labels), -1, dtype=np.int64)
        position = 0
        for i in held:
            self._offsets[i] = position
            position += sizes[i]
        self._buffer = np.empty(position, dtype=np.uint8)
        for i in held:
            data = self.read(i)
            start = self._offsets[i]
            # Sizes come from the directory listing; a file that changed since is an error.
            if len(data) != sizes[i]:
                raise RuntimeError(f"{self.describe(i)} changed size while caching")
            self._buffer[start : start + len(data)] = np.frombuffer(data, dtype=np.uint8)
            self._lengths[i] = len(data)
        log.info(
            "%s: cached %d images (%.1f MiB) in RAM",
            type(self).__name__,
            len(held),
            position / 2**20,
        )

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def read(self, index: int) -> bytes:
        """The encoded bytes of image `index` from storage."""

    @abstractmethod
    def name(self, index: int) -> str:
        """Image `index`'s name inside the dataset (relative path, zip member): what the
        fingerprint hashes, so that a copy of the data elsewhere has the same one."""

    def fingerprint(self) -> str:
        """Names, labels and byte sizes of every image: the listing, no image read."""
        return digest([self.name(i) for i in range(len(self))], self.labels, self.sizes)

    def encoded(self, index: int) -> bytes:
        """The encoded bytes of image `index`, from the cache when it holds them."""
        if self._buffer is not None and self._lengths[index] >= 0:
            start = self._offsets[index]
            return self._buffer[start : start + self._lengths[index]].tobytes()
        return self.read(index)

    def load(self, index: int):  # PIL.Image.Image, a uint8 (3, H, W) tensor, or a JPEGFile
        # A JPEGFile only for our own transforms, which decode the crops' rectangle themselves.
        lazy = getattr(self.transform, "accepts_jpeg_file", False)
        return decode(self.encoded(index), self.decoder, lazy=lazy)

    def label(self, index: int) -> int:
        return int(self.labels[index])


class EncodedImageData(ImageData):
    """What the folder and zip factories share: the root, the cache (``cache_mode``), the
    bad-image policy (``strict``) and the ``decoder``; ``image_size``, ``mean`` and ``std`` go
    to :class:`~.base.ImageData` (ImageNet's statistics by default)."""

    def __init__(self, root: str, cache_mode: str = "no", strict: bool = False,
                 decoder: str = "torchvision", **kwargs) -> None:
        super().__init__(**kwargs)
        check_cache_mode(cache_mode)
        check_decoder(decoder)
        self.root = Path(root)
        self.cache_mode = cache_mode
        self.strict = strict
        self.decoder = decoder

    def dataset_options(self, rank: int, world_size: int) -> dict[str, object]:
        """The keywords every :class:`EncodedImageDataset` of this factory takes."""
        return {"strict": self.strict, "decoder": self.decoder, "cache_mode": self.cache_mode,
                "rank": rank, "world_size": world_size}


def printable(text: str) -> str:
    """``text`` safe for any log stream: a file name that is not UTF-8 (Python keeps its
    bytes as lone surrogates) shows its bytes as ``\\xNN`` instead of failing the write."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")

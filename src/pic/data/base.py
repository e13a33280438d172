"""What every dataset of the platform provides: crops, instance index, class label.

A ``conf/data/<name>.yaml`` builds an :class:`ImageData` factory; the task asks it for the
``train`` or ``val`` split with a transform. Items are dicts so that the default collate
batches them: ``crops`` (list of tensors, one per view), ``index`` (the instance label of
PIC / the bank row of InstDisc), ``label`` (the class, for evaluation only) and ``replaced``
(how many unreadable images were skipped to produce this item).
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image

from ..bounds import Positive
from .decode import UnreadableImage

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], list[torch.Tensor]]


def digest(*parts: object) -> str:
    """Short sha256 (16 hex digits) of bytes, strings, lists of strings and integer arrays."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, list) and all(isinstance(p, str) for p in part):
            data = "\n".join(part).encode("utf-8", "surrogateescape")
        elif isinstance(part, str):
            data = part.encode("utf-8", "surrogateescape")
        else:
            data = np.ascontiguousarray(np.asarray(part, dtype=np.int64)).tobytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


class InstanceDataset(torch.utils.data.Dataset, ABC):
    """Base of every dataset: subclasses implement :meth:`load` and :meth:`label`.

    A bad image (any exception from :meth:`load`, or :class:`~.decode.UnreadableImage` from a
    transform that decodes lazily) is reported with :meth:`describe` and, unless
    ``strict``, replaced by the next readable image; the item then carries that image's index so
    that instance labels stay consistent.
    """

    #: With a per-rank cache, the indices this rank holds (the sampler draws only these).
    rank_indices: list[int] | None = None
    #: Give up after this many consecutive unreadable images: the data is broken, not one file.
    max_consecutive_bad = 100

    def __init__(self, transform: Transform, strict: bool = False) -> None:
        self.transform = transform
        self.strict = strict

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """The RGB image of ``index``; raises on an unreadable file."""

    @abstractmethod
    def label(self, index: int) -> int: ...

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from (a path), for error messages."""
        return f"{type(self).__name__}[{index}]"

    def fingerprint(self) -> str:
        """A digest of what the dataset is (its items' names and labels, no pixels), stored in
        checkpoints and results so that runs on different data are never mixed silently.
        Datasets with a cheaper or more telling listing override it."""
        return digest([self.describe(i) for i in range(len(self))],
                      [self.label(i) for i in range(len(self))])

    def _candidates(self, index: int) -> Iterator[int]:
        """index, then the replacements to try in order; lazy: an item rarely needs one."""
        yield index
        pool = self.rank_indices
        if pool is None:
            for k in range(1, self.max_consecutive_bad + 1):
                yield (index + k) % len(self)
            return
        start = pool.index(index) if index in pool else 0
        for k in range(1, self.max_consecutive_bad + 1):
            yield pool[(start + k) % len(pool)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        replaced = 0
        for candidate in self._candidates(index):
            image = None
            try:
                image = self.load(candidate)
                crops = self.transform(image)
            except Exception as err:
                # Any error from the decoder means the same: this file is bad. From the
                # transform, only a lazily decoded image found corrupt does.
                if image is not None and not isinstance(err, UnreadableImage):
                    raise
                if self.strict:
                    raise RuntimeError(
                        f"unreadable image {self.describe(candidate)}: {err} "
                        "(set data.strict=false to skip bad images)"
                    ) from err
                log.warning("skipping unreadable image %s: %s", self.describe(candidate), err)
                replaced += 1
                continue
            return {"crops": crops, "index": candidate,
                    "label": self.label(candidate), "replaced": replaced}
        raise RuntimeError(f"{replaced} consecutive unreadable images from "
                           f"{self.describe(index)} on: the dataset is broken")


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ImageData(ABC):
    """Factory of the two splits; holds what transforms need to know about the images: the
    training crop size and ``mean``/``std`` (RGB, 0–1 scale) for normalising crops, ImageNet's
    statistics by default."""

    num_classes: int

    def __init__(self, image_size: Annotated[int, Positive] = 224,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        self.image_size = image_size
        self.mean = list(mean) if mean is not None else IMAGENET_MEAN
        self.std = list(std) if std is not None else IMAGENET_STD

    @abstractmethod
    def build(self, split: str, transform: Transform, rank: int = 0,
              world_size: int = 1) -> InstanceDataset:
        """The ``train`` or ``val`` split; validates its files now (errors name file and line)."""

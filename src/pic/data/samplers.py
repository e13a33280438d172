"""Samplers: which dataset indices each rank visits in one sampler-epoch.

The order depends only on (seed, epoch) (plus rank), never on global RNG state, so a resumed run
replays it exactly; `set_epoch(epoch, start)` resumes in the middle of an epoch or window.

Sharding: with `indices=None` every rank computes the same global order and takes a strided
shard of it (rank r: positions r, r + world, ...), so ranks are disjoint and together cover the
order. With `indices` (the part cache: this rank holds only those images) a rank permutes only
its own indices. Every rank yields the same number of samples (the tail is dropped), so DDP
ranks run the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
from torch.utils.data import Sampler

from ..bounds import Positive, Range

# Tags that keep the random streams of the index list and of the per-epoch shuffles apart.
_LIST_STREAM = 0
_EPOCH_STREAM = 1
#: Feistel rounds of the list's permutation (4 already give a pseudo-random permutation).
_ROUNDS = 6
#: The name of the list's permutation, stored with rows kept in its order.
LIST_ORDER = "feistel6-splitmix64"


def _rng(*keys: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (numpy SeedSequence)."""
    return np.random.default_rng(list(keys))


# splitmix64's constants, made once (numpy converts an int >= 2**63 slowly).
_GAMMA, _MUL1, _MUL2 = (np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                               0x94D049BB133111EB))
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping): a bijection of 64-bit words."""
    x = x + _GAMMA
    x = (x ^ (x >> _S30)) * _MUL1
    x = (x ^ (x >> _S27)) * _MUL2
    return x ^ (x >> _S31)


def _feistel(x: np.ndarray, keys: np.ndarray, half: int, inverse: bool) -> np.ndarray:
    """A balanced Feistel network on 2·half-bit words (uint64 array): a bijection of
    [0, 4**half), the rounds' functions splitmix64(side ^ key)."""
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    left, right = x >> shift, x & mask
    for key in keys[::-1] if inverse else keys:
        if inverse:
            left, right = right ^ (_mix(left ^ key) & mask), left
        else:
            left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << shift) | right


def _permute(seed: int, size: int, cycle: int, x: np.ndarray, inverse: bool) -> np.ndarray:
    """The list's permutation of [0, size) (or its inverse) at ``x``: the Feistel network on
    the smallest even-bit domain >= size, cycle-walking (re-applied until inside [0, size));
    < 4 applications per element on average. O(len(x)), whatever ``size``."""
    x = np.asarray(x, dtype=np.int64)
    if len(x) and not (0 <= int(x.min()) and int(x.max()) < size):
        raise IndexError(f"list position or index outside [0, {size})")
    keys = np.random.SeedSequence([seed, _LIST_STREAM, cycle]).generate_state(_ROUNDS,
                                                                              np.uint64)
    half = max(1, -(-(size - 1).bit_length() // 2))
    out = _feistel(x.astype(np.uint64), keys, half, inverse)
    walk = np.flatnonzero(out >= np.uint64(size))
    while len(walk):
        out[walk] = _feistel(out[walk], keys, half, inverse)
        walk = walk[out[walk] >= np.uint64(size)]
    return out.astype(np.int64)


def list_order(seed: int, size: int, positions: np.ndarray, cycle: int = 0) -> np.ndarray:
    """The sliding window's shuffled list on pass ``cycle`` (every pass without reshuffle) at
    ``positions`` (1-D): pool positions, same shape. Counter-based: no list of ``size`` is built.
    PIC's sampled classifier stores its rows in this order."""
    return _permute(seed, size, cycle, positions, inverse=False)


def list_position(seed: int, size: int, items: np.ndarray, cycle: int = 0) -> np.ndarray:
    """Inverse of :func:`list_order`: the list positions of pool positions ``items``."""
    return _permute(seed, size, cycle, items, inverse=True)


class _ShardedSampler(Sampler[int]):
    """Shared validation, sharding and resume logic; subclasses define `_epoch_order`."""

    passes_per_epoch: float

    def __init__(
        self,
        dataset_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        indices: list[int] | None = None,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"sampler: dataset_size must be >= 1, got {dataset_size}")
        if seed < 0:
            raise ValueError(f"sampler: seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"sampler: need 0 <= rank < world_size, got {rank=} {world_size=}")
        if dataset_size < world_size:
            raise ValueError(
                f"sampler: dataset of {dataset_size} images is smaller than world_size "
                f"{world_size}; every rank needs at least one image"
            )
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.indices = None if indices is None else np.asarray(list(indices), dtype=np.int64)
        if self.indices is not None:
            if len(self.indices) < dataset_size // world_size:
                raise ValueError(
                    f"sampler: rank {rank} holds {len(self.indices)} indices, fewer than "
                    f"dataset_size // world_size = {dataset_size // world_size}"
                )
            bad = self.indices[(self.indices < 0) | (self.indices >= dataset_size)]
            if len(bad):
                raise ValueError(f"sampler: index {int(bad[0])} outside [0, {dataset_size})")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the sampler-epoch; skip its first `start` samples (already consumed)."""
        if epoch < 0:
            raise ValueError(f"sampler: epoch must be >= 0, got {epoch}")
        if not 0 <= start <= len(self):
            raise ValueError(f"sampler: start must be in [0, {len(self)}], got {start}")
        self.epoch = epoch
        self.start = start

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for one full sampler-epoch, shape (len(self),)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        yield from self._epoch_order(self.epoch)[self.start :].tolist()


class EpochSampler(_ShardedSampler):
    """One seeded permutation of the dataset per epoch (each image once per epoch)."""

    passes_per_epoch = 1.0

    def __len__(self) -> int:
        return self.dataset_size // self.world_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, _EPOCH_STREAM, epoch)
        if self.indices is None:
            order = rng.permutation(self.dataset_size)
            return order[self.rank :: self.world_size][: len(self)]
        return self.indices[rng.permutation(len(self.indices))][: len(self)]


class SlidingWindowSampler(_ShardedSampler):
    """PIC's sliding-window data scheduler.

    One seeded shuffle of the index list; sampler-epoch t is the window of W consecutive list
    positions t*S ... t*S + W - 1 (cyclic), shuffled inside by a generator seeded by (seed, t).
    Consecutive windows share W - S images, so an image is revisited every ~W/B iterations
    instead of ~N/B. With `reshuffle`, the list is reshuffled at each wrap-around (list pass c
    uses its own seeded permutation); a window that straddles a wrap then takes the tail of one
    pass and the head of the next, so it may repeat an image.

    W and S are global (clipped to the dataset: W <= N, S <= W); each of the `world_size` ranks
    yields W // world samples per window and advances by S // world.
    """

    def __init__(
        self,
        dataset_size: int,
        window_size: Annotated[int, Positive] = 131072,
        stride: Annotated[int, Range(gt=0, le="window_size")] = 16384,
        reshuffle: bool = False,
        **shard: Any,
    ) -> None:
        """``shard``: seed, rank, world_size, indices, as :class:`EpochSampler`."""
        super().__init__(dataset_size, **shard)
        if window_size < 1 or stride < 1:
            raise ValueError(
                f"sampler: window_size and stride must be >= 1, got {window_size=} {stride=}"
            )
        window = min(window_size, dataset_size)
        step = min(stride, window)
        world = self.world_size
        if step < world:
            raise ValueError(
                f"sampler: stride {step} (after clipping to the dataset) is smaller than "
                f"world_size {world}; every rank must advance by at least one image"
            )
        # Per-rank window and stride; the global ones are these times world_size.
        self.rank_window = window // world
        self.rank_stride = step // world
        self.window_size = self.rank_window * world
        self.stride = self.rank_stride * world
        self.reshuffle = reshuffle
        self.passes_per_epoch = self.window_size / dataset_size

    def __len__(self) -> int:
        return self.rank_window

    def _pool(self) -> tuple[np.ndarray | None, int, int, int]:
        """(pool of indices or None for range(N), pool size, window, stride) in pool positions."""
        if self.indices is None:
            return None, self.dataset_size, self.window_size, self.stride
        return self.indices, len(self.indices), self.rank_window, self.rank_stride

    def window(self, t: int) -> np.ndarray:
        """Unshuffled content of window t in list order (this rank's pool), shape (window,).
        O(window): the list's permutation is computed at the window's positions only."""
        pool, size, window, stride = self._pool()
        positions = t * stride + np.arange(window, dtype=np.int64)
        cycles, offsets = np.divmod(positions, size)
        content = np.empty(window, dtype=np.int64)
        for c in np.unique(cycles):  # a window spans at most two passes of the list
            where = cycles == c
            cycle = int(c) if self.reshuffle else 0
            content[where] = list_order(self.seed, size, offsets[where], cycle)
        return content if pool is None else pool[content]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        content = self.window(epoch)
        content = content[_rng(self.seed, _EPOCH_STREAM, epoch).permutation(len(content))]
        if self.indices is None:
            return content[self.rank :: self.world_size]
        return content

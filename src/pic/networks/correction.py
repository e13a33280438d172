"""Sampling and exact weight update correction for the sampled PIC classifier.

- :func:`initial_rows`: a row's initial weights as a pure function of (seed, row), from a
  counter-based generator: rows never visited need no storage and no initialisation pass.
- :func:`uniform_rows`: K distinct rows uniformly at random in O(K log K).
- :class:`Correction`: the zero-gradient SGD maps that bring a row stored at update s to the
  current update t exactly, for any gap, without touching rows outside the step's set.

With PyTorch's SGD (b ← m·b + g + λ·w, w ← w − η_t·b) a row with g = 0 evolves linearly by
A_t = [[m, λ], [−η_t·m, 1 − η_t·λ]] acting on (b, w). Maps are composed forwards only
(det A_t = m: a prefix product is never inverted). Three kinds of stored row:

- a hole (never written): its value at update 0 is (b, w) = (0, w₀), and ``P`` = A_{t−1}···A_0;
- a row written at update s > t − MAX_GAP: ``q[s mod MAX_GAP]`` = A_{t−1}···A_s;
- a parked row: every written row of its block of BLOCK_ROWS rows was brought to update p_b
  at once, and ``M[b]`` = A_{t−1}···A_{p_b}. A block is parked again just before its oldest
  later write would fall out of the ring, so rows outside the step's set are written only then:
  with rows in the sliding window's order, a block is parked about once per MAX_GAP updates
  while in the window and once after it leaves.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Length of the ring of recent maps (updates).
MAX_GAP = 16384
#: Rows per parking block (contiguous in storage order).
BLOCK_ROWS = 4096
#: ``dirty`` of a block with no write since it was parked.
CLEAN = 2**62

_MASK32 = (1 << 32) - 1


def _signed(c: int) -> int:
    """A 64-bit constant as torch's wrapping int64."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (arithmetic modulo 2**64): a bijection of 64-bit words."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def initial_rows(seed: int, rows: torch.Tensor, dim: int,
                 init_norm: float | None) -> torch.Tensor:
    """len(rows)×D float32 initial weights: normal(0, 0.01) element-wise, or rows of norm
    ``init_norm``; element j of row r depends on (seed, r, j) alone.

    One 64-bit hash per element gives two 32-bit uniforms for Box–Muller (cosine branch).
    """
    key = int(mix64(torch.tensor([seed & ((1 << 63) - 1)]))[0])
    counters = rows.long().cpu()[:, None] * dim + torch.arange(dim)
    h = mix64(counters ^ key)
    u1 = (_shr(h, 32).double() + 1) / 2.0**32  # (0, 1]: log is finite
    u2 = (h & _MASK32).double() / 2.0**32
    weight = (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2) * 0.01).float()
    if init_norm is not None:
        weight = torch.nn.functional.normalize(weight, dim=1) * init_norm
    return weight


def uniform_rows(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct rows of range(n), every k-subset equally likely; sorted, int64.

    Drawing with replacement and keeping a random k of the distinct values keeps the cost
    O(k log k), independent of n (a permutation of n would cost O(n) per step).
    """
    if k >= n:
        return torch.arange(n)
    if 2 * k >= n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    distinct = torch.empty(0, dtype=torch.long)
    while len(distinct) < k:
        draws = torch.randint(n, (2 * k,), generator=generator)
        distinct = torch.unique(torch.cat([distinct, draws]))
    keep = torch.randperm(len(distinct), generator=generator)[:k]
    return distinct[keep].sort().values


def _apply(a: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """A·X for one 2×2 map a (4,) and maps X (4, n), entries (x00, x01, x10, x11)."""
    return torch.stack([a[0] * maps[0] + a[1] * maps[2], a[0] * maps[1] + a[1] * maps[3],
                        a[2] * maps[0] + a[3] * maps[2], a[2] * maps[1] + a[3] * maps[3]])


class Correction:
    """The maps from any stored row's update to the current one (all float64, CPU).

    ``t`` is the number of updates applied. A stored row carries ``clock`` = 1 + the update it
    is current at (0: a hole).
    """

    def __init__(self, num_rows: int) -> None:
        self.gap, self.block_rows = MAX_GAP, BLOCK_ROWS  # read now: tests shrink them
        blocks = -(-num_rows // self.block_rows)
        eye = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        self.q = eye[:, None].repeat(1, self.gap)  # q[:, s mod gap] = A_{t-1}···A_s
        self.P = eye.clone()  # A_{t-1}···A_0, for holes
        self.M = eye[:, None].repeat(1, blocks)  # A_{t-1}···A_{park[b]}
        self.park = torch.full((blocks,), -1, dtype=torch.long)  # -1: never parked
        self.dirty = torch.full((blocks,), CLEAN, dtype=torch.long)  # first write after park

    def coefficients(self, rows: torch.Tensor, clock: torch.Tensor, t: int) -> torch.Tensor:
        """(4, n) float64 maps bringing ``rows`` (storage rows, int64) from their ``clock`` to
        update ``t``. Raises if a row's update fell out of the ring (a bookkeeping bug)."""
        clock = clock.long().cpu()
        s = clock - 1
        block = rows.cpu() // self.block_rows
        parked = s == self.park[block]
        ring = ~parked & (clock > 0) & (s < t)
        if bool((ring & (t - s > self.gap)).any()):
            raise RuntimeError("weight update correction: a row's history expired")
        c = self.q[:, s % self.gap]
        c[:, clock == 0] = self.P[:, None]
        c[:, parked] = self.M[:, block[parked]]
        c[:, ~parked & (s == t)] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=c.dtype)[:, None]
        return c

    def advance(self, t: int, lr: float, m: float, lam: float) -> None:
        """Compose A_{t−1} (the update that made the count ``t``: lr, momentum m, weight decay
        λ) onto every kept map."""
        a = torch.tensor([m, lam, -lr * m, 1 - lr * lam], dtype=torch.float64)
        self.q = _apply(a, self.q)
        self.q[:, (t - 1) % self.gap] = a
        self.P = _apply(a, self.P[:, None])[:, 0]
        self.M = _apply(a, self.M)

    def wrote(self, rows: torch.Tensor, t: int) -> None:
        """``rows`` (storage rows) were written current at update ``t``."""
        blocks = torch.unique(rows.cpu() // self.block_rows)
        self.dirty[blocks] = torch.minimum(self.dirty[blocks], torch.tensor(t))

    def due(self, t: int) -> torch.Tensor:
        """Blocks to park now: their oldest write after parking leaves the ring next update."""
        return (self.dirty <= t - self.gap).nonzero().flatten()

    def parked(self, block: int, t: int) -> None:
        self.park[block], self.dirty[block] = t, CLEAN
        self.M[:, block] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """Only the blocks ever written (a checkpoint grows with the rows visited, not with N):
        every other block is as built, its M composed along with P, which equals P."""
        active = ((self.park >= 0) | (self.dirty != CLEAN)).nonzero().flatten()
        return {"q": self.q, "P": self.P, "blocks": active, "M": self.M[:, active],
                "park": self.park[active], "dirty": self.dirty[active],
                "num_blocks": self.park.numel(), "gap": self.gap, "block_rows": self.block_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["gap"], state["block_rows"], state["num_blocks"]) != (
                self.gap, self.block_rows, self.park.numel()):
            raise ValueError(f"checkpoint correction history is {state['gap']} updates × "
                             f"{state['num_blocks']} blocks of {state['block_rows']} rows, "
                             f"this classifier's {self.gap} × {self.park.numel()} of "
                             f"{self.block_rows}")
        self.q, self.P = state["q"].clone(), state["P"].clone()
        self.M = self.P[:, None].repeat(1, self.park.numel())
        self.park.fill_(-1)
        self.dirty.fill_(CLEAN)
        active = state["blocks"]
        self.M[:, active], self.park[active], self.dirty[active] = (
            state["M"], state["park"], state["dirty"])

"""PIC's instance classifier: one weight row per training image, used through cosine logits.

Two forms share one interface, ``forward(labels) -> (rows C×D, labels into rows B)``:

- :class:`InstanceClassifier`: dense W, an ``nn.Parameter`` updated by the global optimizer.
- :class:`SampledInstanceClassifier`: each step scores against the batch's positives plus K
  sampled negatives (or all N rows), in device, host or memory-mapped storage. W and its
  momentum are not parameters: the classifier applies SGD itself to the step's rows in
  :meth:`~SampledInstanceClassifier.after_step`, and brings every other row up to date lazily
  with the exact zero-gradient SGD update (weight update correction).
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import dist, native

#: Every row is brought up to date at least once per MAX_GAP updates (a round-robin sweep of
#: ceil(N / MAX_GAP) rows per step), so the correction needs only the last MAX_GAP updates.
MAX_GAP = 16384
#: A row's update count is stored modulo CLOCK in its float32 last column (exact below 2**24).
#: Gaps never exceed MAX_GAP, which divides CLOCK, so the count modulo CLOCK identifies both
#: the history slot and whether the row is current.
CLOCK = 1 << 24
#: Rows are initialised, synchronised and copied in blocks of this many elements (RAM bound).
BLOCK_ELEMENTS = 1 << 24
STORAGES = ("device", "host", "mmap")
SAMPLINGS = ("recent", "uniform")


def initial_rows(rows: int, dim: int, init_norm: float | None) -> torch.Tensor:
    """rows×D initial weights from the global RNG: normal(0, 0.01), or rows of norm init_norm."""
    weight = torch.randn(rows, dim) * 0.01
    if init_norm is not None:
        weight = nn.functional.normalize(weight, dim=1) * init_norm
    return weight


class InstanceClassifier(nn.Module):
    """N×D weight ``W``; logits of a feature f are normalize(f)·normalize(W)ᵀ / τ.

    ``init_norm=None`` draws W element-wise from normal(0, 0.01) as in the paper (row norm
    ≈ 0.01·√D); a number rescales every row to that norm. The gradient through normalize(W)
    scales as 1/‖w‖, so pick the norm together with the learning rate.
    """

    def __init__(self, num_instances: int, dim: int, init_norm: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(initial_rows(num_instances, dim, init_norm))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to score against (C×D) and each label's row in them (B)."""
        return self.weight, labels

    def after_step(self, lr: float) -> None:
        """Nothing to do: the global optimizer updates W."""


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


def huge_page_zeros(rows: int, width: int) -> torch.Tensor:
    """rows×width float32 zeros in anonymous memory advised to use transparent huge pages.

    The sampled classifier reads and writes a few thousand rows at random per step; with 4 KiB
    pages nearly every row costs a TLB miss, with 2 MiB pages few do (bench/pic_head.py).
    """
    # Private: shared anonymous memory is shmem, which has its own (usually off) huge page
    # setting. Anonymous mappings start zeroed.
    buffer = mmap.mmap(-1, rows * width * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only; elsewhere ordinary pages
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.float32).view(rows, width)


class SampledInstanceClassifier(nn.Module):
    """PIC's classifier with negative sampling and exact weight update correction.

    Per row it keeps w (D float32), its SGD momentum buffer b (D float32) and the update count
    the row is current at (modulo CLOCK), side by side in one N×(2D+1) ``table``: a step's
    random rows then cost one gather and one scatter. ``weight``, ``momentum_buffer`` and
    ``last`` are views of its columns. The update is PyTorch's SGD,
    b ← m·b + g + λ·w, w ← w − η_t·b. A row outside the step's set has g = 0, so (b, w)
    evolves linearly by A_t = [[m, λ], [−η_t·m, 1 − η_t·λ]]. ``q[s mod MAX_GAP]`` holds the
    product A_{t−1}···A_s (composed forwards; det A_t = m, so prefix products are never
    inverted), and a row is brought from ``last`` to t with one 2×2 map when it is next used,
    swept or saved.

    Args:
        num_instances: N.
        dim: D.
        init_norm: as :class:`InstanceClassifier`.
        num_negatives: K sampled rows per step besides the positives; None or K >= N: all rows.
        sampling: ``recent`` (the K most recent instance indices seen, a FIFO over the global
            batch) or ``uniform`` (K distinct rows, seeded by the update count: identical on
            every rank without communication).
        weight_correction: apply the zero-gradient updates to rows outside the step's set.
        momentum, weight_decay: m and λ; must be the optimizer's.
        storage: ``device`` (moves with the module), ``host`` (CPU memory) or ``mmap`` (files
            under ``storage_dir``); only the step's rows go to the features' device.
        storage_dir: directory of the mmap table file and its checkpoint snapshots.
    """

    def __init__(self, num_instances: int, dim: int, init_norm: float | None = None,
                 num_negatives: int | None = None, sampling: str = "recent",
                 weight_correction: bool = True, momentum: float = 0.9,
                 weight_decay: float = 1e-4, storage: str = "device",
                 storage_dir: str | None = None) -> None:
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"model.classifier_storage={storage!r}: expected one of {STORAGES}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"model.negative_sampling={sampling!r}: expected one of {SAMPLINGS}")
        if num_negatives is not None and num_negatives < 1:
            raise ValueError(f"model.num_negatives={num_negatives}: expected >= 1, or null for "
                             "all N rows")
        if storage == "mmap" and storage_dir is None:
            raise ValueError("model.classifier_storage=mmap needs model.storage_dir (a directory "
                             "for the weight files, normally the run directory)")
        self.num_instances, self.dim = num_instances, dim
        self.num_negatives = num_instances if num_negatives is None else num_negatives
        self.sampling, self.weight_correction = sampling, weight_correction
        self.momentum, self.weight_decay = momentum, weight_decay
        self.storage = storage
        self.storage_dir = None if storage_dir is None else Path(storage_dir)
        self.sweep_rows = -(-num_instances // MAX_GAP)

        self.width = 2 * dim + 1
        self.block_rows = max(1, BLOCK_ELEMENTS // self.width)
        self._allocate(init_norm)
        # The seed of the uniform draws and of the first FIFO content: from the global RNG,
        # which every rank has seeded identically.
        self.seed = int(torch.randint(2**62, ()).item())
        self.t = 0  # successful updates so far
        self.sweep = 0  # first row of the next sweep block
        self.fifo_pos = 0
        self._synced_at = -1  # update count of the last sync_state()
        self._snapshot: str | None = None  # mmap: file stem of the last snapshot
        self._pending: tuple[Any, ...] | None = None  # the step's rows, until after_step
        g = torch.Generator().manual_seed(self.seed)
        fifo = torch.randint(num_instances, (min(self.num_negatives, num_instances),),
                             generator=g)
        q = torch.eye(2, dtype=torch.float64).reshape(4, 1).repeat(1, MAX_GAP)
        self._tensor("fifo", fifo)
        self._tensor("q", q)  # q[:, s mod MAX_GAP] = (q00, q01, q10, q11) of A_{t-1}···A_s

    # ------------------------------------------------------------------ storage
    def _tensor(self, name: str, value: torch.Tensor) -> None:
        """Device storage: a non-persistent buffer (moves with .to(), saved as extra state);
        host/mmap: a plain attribute that stays in CPU memory."""
        if self.storage == "device":
            self.register_buffer(name, value, persistent=False)
        else:
            setattr(self, name, value)

    def _path(self, name: str) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir / f"pic_classifier.rank{dist.get_rank()}.{name}"

    def _allocate(self, init_norm: float | None) -> None:
        """The table: W initialised block by block (for N ≤ block_rows exactly as the dense
        classifier), momentum and update count zero, in the chosen storage."""
        n, d = self.num_instances, self.dim
        starts = range(0, n, self.block_rows)
        if self.storage != "mmap":
            table = huge_page_zeros(n, self.width)
            for a in starts:
                table[a:a + self.block_rows, :d] = initial_rows(
                    min(a + self.block_rows, n) - a, d, init_norm)
            self._tensor("table", table)
            return
        self.storage_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        # Written through the file, not the mapping, so the pages do not count as our RAM, and
        # with every disk block allocated now: a full disk fails here, not later with SIGBUS.
        with open(self._path("table"), "wb") as f:
            for a in starts:
                block = torch.zeros(min(a + self.block_rows, n) - a, self.width)
                block[:, :d] = initial_rows(len(block), d, init_norm)
                f.write(block.numpy().tobytes())
        self._map = np.memmap(self._path("table"), dtype=np.float32, mode="r+",
                              shape=(n, self.width))
        # Rows are read in random order: read-ahead would fetch 32 unused pages per row.
        self._map._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
        self.table = torch.from_numpy(self._map)

    @property
    def weight(self) -> torch.Tensor:
        """N×D view of W (rows current only after :meth:`sync_state`)."""
        return self.table[:, :self.dim]

    @property
    def momentum_buffer(self) -> torch.Tensor:
        """N×D view of the SGD momentum buffers."""
        return self.table[:, self.dim:2 * self.dim]

    @property
    def last(self) -> torch.Tensor:
        """N view of each row's update count modulo CLOCK (float32, exact)."""
        return self.table[:, 2 * self.dim]

    # ------------------------------------------------------------------ the step
    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels: B instance indices → (C×D current rows, leaf with grad; B positions in them).

        The row set is the same on every rank: the positives of the global batch plus the
        negatives. The rows are kept until :meth:`after_step` applies their gradient.
        """
        kind = labels.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
            # fp16 training scales the loss; the scaler unscales only the optimizer's
            # parameters, so these rows would be updated with a scaled gradient.
            raise ValueError("model.num_negatives / model.classifier_storage=host|mmap do not "
                             "support trainer.precision=fp16 (gradient scaling); use bf16")
        home = self.weight.device
        positives = dist.all_gather(labels).to(home)
        if self.num_negatives >= self.num_instances:
            rows = torch.arange(self.num_instances, device=home)
        else:
            rows = torch.unique(torch.cat([positives, self._negatives().to(home)]))
        current = self._current(rows)
        leaf = current[:, :self.dim].to(labels.device).requires_grad_(True)
        self._pending = (rows, current, leaf, positives)
        return leaf, torch.searchsorted(rows, labels.to(home)).to(labels.device)

    def _negatives(self) -> torch.Tensor:
        if self.sampling == "recent":
            return self.fifo
        g = torch.Generator().manual_seed(self.seed + 1 + self.t)
        return uniform_rows(self.num_instances, self.num_negatives, g)

    def _current(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """A copy of the table's ``rows`` brought up to update t; the table is left as it is."""
        current = self.table[rows].clone() if isinstance(rows, slice) else self._gather(rows)
        if not self.weight_correction:
            return current
        d, now = self.dim, self.t % CLOCK
        w, b, last = current[:, :d], current[:, d:2 * d], current[:, 2 * d].long()
        c = self.q.to(current.device)[:, last % MAX_GAP]
        # Rows already current get the identity, exactly.
        c[:, last == now] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=c.dtype,
                                         device=c.device)[:, None]
        c = c.to(current.dtype)[:, :, None]
        w[:], b[:] = c[2] * b + c[3] * w, c[0] * b + c[1] * w
        current[:, 2 * d] = now
        return current

    def _native_rows(self) -> bool:
        """Whether the native library moves the rows (a CPU table)."""
        return native.LIB is not None and self.table.device.type == "cpu"

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of the table's ``rows`` (sorted, distinct). Their range is checked here, once
        per step: the C code trusts it, and :meth:`_scatter` later writes the same rows."""
        if not self._native_rows():  # index_select: ~2.5x faster than table[rows]
            return self.table.index_select(0, rows)
        if len(rows) and not (0 <= int(rows[0]) and int(rows[-1]) < self.num_instances):
            raise IndexError(f"instance index outside [0, {self.num_instances})")
        rows = rows.long().contiguous()  # the C side reads int64
        out = torch.empty(len(rows), self.width)
        native.LIB.pic_gather_rows(self.table.data_ptr(), rows.data_ptr(), len(rows),
                                   self.width, out.data_ptr())
        return out

    def _scatter(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """table[rows] = values (rows sorted, distinct)."""
        if not self._native_rows():
            self.table.index_copy_(0, rows, values)
            return
        rows, values = rows.long().contiguous(), values.contiguous()
        native.LIB.pic_scatter_rows(self.table.data_ptr(), rows.data_ptr(), len(rows),
                                    self.width, values.data_ptr())

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Apply SGD (lr η_t) to the step's rows, advance the correction, sweep one block."""
        if self._pending is None:
            raise RuntimeError("SampledInstanceClassifier.after_step without a forward")
        rows, current, leaf, positives = self._pending
        self._pending = None
        w, b = current[:, :self.dim], current[:, self.dim:2 * self.dim]
        grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        # The mean over ranks, like DDP does for parameters: rows stay identical everywhere.
        grad = dist.all_reduce_mean(grad).to(w.device)
        # Same operations in the same order as torch.optim.SGD (dampening 0, no Nesterov).
        d_p = grad.add(w, alpha=self.weight_decay)
        b.mul_(self.momentum).add_(d_p)
        w.add_(b, alpha=-lr)
        self.t += 1
        current[:, 2 * self.dim] = self.t % CLOCK
        self._scatter(rows, current)
        if self.weight_correction:
            self._advance(lr)
            end = min(self.sweep + self.sweep_rows, self.num_instances)
            block = slice(self.sweep, end)
            self.table[block] = self._current(block)
            self.sweep = 0 if end == self.num_instances else end
        if self.sampling == "recent":
            self._push(positives)

    def _advance(self, lr: float) -> None:
        """q[s] ← A_t·q[s] for every kept s, and q[t] = A_t (t = the update just applied)."""
        m, lam = self.momentum, self.weight_decay
        q00, q01, q10, q11 = self.q.clone()
        self.q[0] = m * q00 + lam * q10
        self.q[1] = m * q01 + lam * q11
        self.q[2] = -lr * m * q00 + (1 - lr * lam) * q10
        self.q[3] = -lr * m * q01 + (1 - lr * lam) * q11
        self.q[:, (self.t - 1) % MAX_GAP] = torch.tensor(
            [m, lam, -lr * m, 1 - lr * lam], dtype=self.q.dtype, device=self.q.device)

    def _push(self, positives: torch.Tensor) -> None:
        """Append the global batch's indices to the FIFO of recent instances."""
        k = len(self.fifo)
        new = positives[-k:].to(self.fifo.device)
        slots = (self.fifo_pos + torch.arange(len(new), device=self.fifo.device)) % k
        self.fifo[slots] = new
        self.fifo_pos = (self.fifo_pos + len(new)) % k

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def sync_state(self) -> None:
        """Bring every row up to date (all ``last`` = t); with mmap, snapshot the file."""
        if self._synced_at == self.t:
            return
        if self.weight_correction:
            for a in range(0, self.num_instances, self.block_rows):
                block = slice(a, min(a + self.block_rows, self.num_instances))
                self.table[block] = self._current(block)
        if self.storage == "mmap":
            self._write_snapshot()
        self._synced_at = self.t

    def _snapshot_path(self, stem: str) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir / f"{stem}.table"

    def _write_snapshot(self) -> None:
        """Copy the (synced) table file to ``pic_classifier.step<t>.table``, atomically.

        The trainer's checkpoint names the snapshot; the previous one is kept because the
        checkpoint that names it stays current until the new checkpoint is in place.
        Only rank 0 writes (all ranks hold the same rows); every rank reads it on resume.
        """
        stem = f"pic_classifier.step{self.t:012d}"
        previous, self._snapshot = self._snapshot, stem
        if not dist.is_main():
            return
        self._map.flush()
        dst = self._snapshot_path(stem)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(self._path("table"), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        keep = {stem, previous}
        for old in self.storage_dir.glob("pic_classifier.step*.*"):  # type: ignore[union-attr]
            if old.name.rsplit(".", 1)[0] not in keep:
                old.unlink(missing_ok=True)

    def get_extra_state(self) -> dict[str, Any]:
        self.sync_state()  # a no-op when the trainer has just called it
        state: dict[str, Any] = {
            "num_instances": self.num_instances, "dim": self.dim, "t": self.t,
            "sweep": self.sweep, "seed": self.seed, "fifo": self.fifo.cpu(),
            "fifo_pos": self.fifo_pos}  # no q: every row is current, none needs the history
        if self.storage == "mmap":
            state["snapshot"] = self._snapshot
        else:
            state.update(weight=self.weight, momentum=self.momentum_buffer)
        return state

    @torch.no_grad()
    def set_extra_state(self, state: dict[str, Any]) -> None:
        shape = (state["num_instances"], state["dim"])
        if shape != (self.num_instances, self.dim):
            raise ValueError(f"checkpoint classifier is {shape[0]}×{shape[1]}, this model's is "
                             f"{self.num_instances}×{self.dim} (different dataset?)")
        self.t, self.sweep, self.seed = state["t"], state["sweep"], state["seed"]
        self.fifo_pos = state["fifo_pos"]
        self.fifo.copy_(state["fifo"])
        if self.storage == "mmap":
            self._snapshot = state["snapshot"]
            path = self._snapshot_path(state["snapshot"])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the classifier snapshot named by the "
                                        "checkpoint is missing (model.storage_dir moved?)")
            saved = np.memmap(path, dtype=np.float32, mode="r", shape=tuple(self.table.shape))
            for a in range(0, self.num_instances, self.block_rows):
                b = min(a + self.block_rows, self.num_instances)
                self.table[a:b] = torch.from_numpy(np.array(saved[a:b]))
        else:
            self.weight.copy_(state["weight"])
            self.momentum_buffer.copy_(state["momentum"])
        self.last.fill_(self.t % CLOCK)  # a checkpoint holds every row current
        self._synced_at = self.t
        self._pending = None

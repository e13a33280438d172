"""PIC's instance classifier: one weight row per training image, used through cosine logits.

Two forms share one interface, ``forward(labels) -> (rows C×D, labels into rows B)``:

- :class:`InstanceClassifier`: dense W, an ``nn.Parameter`` updated by the global optimizer.
- :class:`SampledInstanceClassifier`: each step scores against the batch's positives plus K
  sampled negatives (or all N rows). W and its momentum are not parameters: the classifier
  applies SGD itself to the step's rows in :meth:`~SampledInstanceClassifier.after_step`, and
  brings every other row up to date lazily with the exact zero-gradient SGD update (weight
  update correction, :mod:`pic.networks.correction`). Rows live in a
  :class:`~pic.networks.rowstore.RowTable` (device, host or a sparse file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import dist
from ..data.samplers import LIST_ORDER, list_position
from ..engine.optim import plain_sgd_group
from .correction import Correction, initial_rows, uniform_rows
from .deferred import DeferredUpdate
from .rowstore import STORAGES, RowTable

SAMPLINGS = ("recent", "uniform")


def dense_initial_rows(rows: int, dim: int, init_norm: float | None) -> torch.Tensor:
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
        self.weight = nn.Parameter(dense_initial_rows(num_instances, dim, init_norm))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to score against (C×D) and each label's row in them (B)."""
        return self.weight, labels

    def attach(self, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None) -> None:
        """Nothing to do: the optimizer holds W (and the scaler unscales its gradient)."""

    def after_step(self) -> None:
        """Nothing to do: the global optimizer updates W."""


class StepRows(NamedTuple):
    """What a step of the sampled classifier produces for its update: the C table ``rows``
    scored against (int64, sorted), their stored bytes ``raw``, (w, b) C×D float32 brought to
    the step's update count, the C×D ``leaf`` the loss took its gradient through, and the
    global batch's ``positives`` (table rows, B_global) for the FIFO of recent rows."""

    rows: torch.Tensor
    raw: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    leaf: torch.Tensor
    positives: torch.Tensor


class SampledInstanceClassifier(DeferredUpdate, nn.Module):
    """PIC's classifier with negative sampling and exact weight update correction.

    Each step gathers the rows of the global batch's positives plus K negatives from a
    :class:`~pic.networks.rowstore.RowTable`, scores against them, applies PyTorch's SGD
    (b ← m·b + g + λ·w, w ← w − η_t·b) to them in :meth:`after_step` and writes them back.
    Every other row gets the exact zero-gradient update lazily
    (:class:`~pic.networks.correction.Correction`); a row never visited is computed from
    (seed, row) and needs no storage.

    Row order: with ``order_seed`` the row of image i is its position in the sliding-window
    sampler's list for that seed (:func:`~pic.data.samplers.list_order`), so the rows of window
    t are the contiguous range t·S … t·S+W−1 and a step works inside a W-row region of the
    table that slides S rows per window; ``None`` stores image i at row i. Any order is exact;
    only locality depends on it: with ``sampler.reshuffle=true`` the rows keep the first pass's
    order (later passes read scattered rows), and with the per-rank part cache each rank's list
    is its own, so the global window is not one range.

    Args:
        num_instances: N.
        dim: D.
        init_norm: as :class:`InstanceClassifier`.
        num_negatives: K sampled rows per step besides the positives; None or K >= N: all rows.
        sampling: ``recent`` (the K most recent rows seen, a FIFO over the global batch) or
            ``uniform`` (K distinct rows, seeded by the update count: identical on every rank
            without communication).
        weight_correction: apply the zero-gradient updates to rows outside the step's set.
        storage: ``device`` (moves with the module), ``host`` (CPU memory) or ``mmap`` (one
            sparse file under ``storage_dir``, shared by the ranks of a node).
        storage_dir: directory of the mmap table file and its undo journals.
        order_seed: the sampler's seed (rows in window order), or None (index order).
        dtype: row storage, ``float32``, ``bfloat16`` or ``float16`` (w and b; maths in fp32).
    """

    def __init__(self, num_instances: int, dim: int, init_norm: float | None = None,
                 num_negatives: int | None = None, sampling: str = "recent",
                 weight_correction: bool = True, storage: str = "device",
                 storage_dir: str | None = None, order_seed: int | None = None,
                 dtype: str = "float32") -> None:
        super().__init__()
        check_settings(storage, sampling, num_negatives, storage_dir)
        self.num_instances, self.dim, self.init_norm = num_instances, dim, init_norm
        self.num_negatives = num_instances if num_negatives is None else num_negatives
        self.sampling, self.weight_correction = sampling, weight_correction
        self._optimizer: torch.optim.Optimizer | None = None  # from attach()
        self._scaler: torch.amp.GradScaler | None = None
        self.order_seed = order_seed
        path = None if storage_dir is None else Path(storage_dir) / "pic_classifier.table"
        self.store = RowTable(num_instances, dim, dtype, storage, path)
        self.correction = Correction(num_instances)
        # The seed of the initial rows and of the uniform draws: from the global RNG, which
        # every rank has seeded identically.
        self.seed = int(torch.randint(2**62, ()).item())
        self.t = 0  # successful updates so far
        self.fifo = torch.arange(min(self.num_negatives, num_instances))  # rows, oldest first
        self.fifo_pos = 0
        self._started = False  # False until a fresh start or a restore decides the file
        self._synced_at = -1  # update count of the last checkpoint

    def _apply(self, fn: Any, recurse: bool = True) -> SampledInstanceClassifier:
        """``.to(device)`` moves device storage; the raw rows keep their dtype."""
        super()._apply(fn, recurse)
        self.store.to(fn(torch.empty(0)).device)
        return self

    def _start(self) -> None:
        """A run that restored no checkpoint starts from holes (a stale file is cleared)."""
        if not self._started:
            self.store.reset()
            self._started = True

    def rows_of(self, index: torch.Tensor) -> torch.Tensor:
        """Table rows (int64, CPU) of instance indices: O(len(index)), no N-sized map."""
        index = index.long().cpu()
        if self.order_seed is None:
            return index
        return torch.from_numpy(list_position(self.order_seed, self.num_instances,
                                              index.numpy()))

    def _order(self) -> str | None:
        """The name of the row order (the sampler list's permutation), None: index order."""
        return None if self.order_seed is None else LIST_ORDER

    # ------------------------------------------------------------------ the step
    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels: B instance indices → (C×D current rows, leaf with grad; B positions in them).

        The row set is the same on every rank: the positives of the global batch plus the
        negatives. The step's :class:`StepRows` wait (deferred) for :meth:`after_step`, which
        applies their gradient only if the step is taken.
        """
        self._start()
        positives = self.rows_of(dist.all_gather(labels))
        if self.num_negatives >= self.num_instances:
            rows = torch.arange(self.num_instances)
        else:
            rows = torch.unique(torch.cat([positives, self._negatives()]))
        raw = self.store.gather(rows)
        w, b = self._current(rows, raw)
        leaf = w.to(labels.device).requires_grad_(True)
        self.defer_update(StepRows(rows, raw, w, b, leaf, positives))
        return leaf, torch.searchsorted(rows, self.rows_of(labels)).to(labels.device)

    def _negatives(self) -> torch.Tensor:
        if self.sampling == "recent":
            return self.fifo
        g = torch.Generator().manual_seed(self.seed + 1 + self.t)
        return uniform_rows(self.num_instances, self.num_negatives, g)

    def _current(self, rows: torch.Tensor, raw: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) float32 of raw ``rows`` brought to update t (holes from the seed)."""
        w, b, clock, _ = self.store.fields(raw)
        holes = clock == 0
        if bool(holes.any()):
            w[holes] = initial_rows(self.seed, rows[holes.cpu()], self.dim,
                                    self.init_norm).to(w.device)
        if not self.weight_correction:
            return w, b
        c = self.correction.coefficients(rows, clock, self.t)
        c = c.to(w.device, w.dtype)[:, :, None]
        return c[2] * b + c[3] * w, c[0] * b + c[1] * w

    def attach(self, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None) -> None:
        """Apply ``optimizer``'s SGD to the rows: its m, λ and each step's lr (plain momentum
        SGD only: checked). ``scaler``: the run's fp16 loss scaler, whose scale the rows'
        gradient is divided by (it unscales only the optimizer's parameters)."""
        plain_sgd_group(optimizer, "the sampled PIC classifier (model.num_negatives / "
                        "model.classifier_storage=host|mmap)")
        self._optimizer, self._scaler = optimizer, scaler

    @property
    def group(self) -> dict[str, Any]:
        """The optimizer's param group, looked up at every use: loading an optimizer state
        (a resume, after attach) replaces the group dicts."""
        if self._optimizer is None:
            raise RuntimeError("SampledInstanceClassifier used before attach(optimizer)")
        return self._optimizer.param_groups[0]

    @torch.no_grad()
    def after_step(self) -> None:
        """Apply SGD (the optimizer's current lr η_t) to the step's rows, advance the
        correction, park due blocks."""
        step = self.deferred_update()
        if step is None:
            raise RuntimeError("SampledInstanceClassifier.after_step without a forward")
        lr, m, lam = self.group["lr"], self.group["momentum"], self.group["weight_decay"]
        rows, raw, w, b, leaf, positives = step
        grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        if self._scaler is not None and self._scaler.is_enabled():
            # The rows and the loss are fp32 under fp16 autocast, so the scaled gradient is
            # finite whenever the step is (the trainer checked); dividing by a power of two is
            # exact.
            grad = grad / self._scaler.get_scale()
        # The mean over ranks, like DDP does for parameters: rows stay identical everywhere.
        grad = dist.all_reduce_mean(grad).to(w.device)
        # Same operations in the same order as torch.optim.SGD (dampening 0, no Nesterov).
        d_p = grad.add(w, alpha=lam)
        b.mul_(m).add_(d_p)
        w.add_(b, alpha=-lr)
        self.t += 1
        self._write(rows, raw, w, b)
        if self.weight_correction:
            self.correction.wrote(rows, self.t)
            self.correction.advance(self.t, lr, m, lam)
            for block in self.correction.due(self.t).tolist():
                self._park(block)
        if self.sampling == "recent":
            self._push(positives)

    def _write(self, rows: torch.Tensor, raw: torch.Tensor, w: torch.Tensor,
               b: torch.Tensor) -> None:
        """Store (w, b) current at t for ``rows``, whose stored bytes were ``raw``."""
        self.store.journal(rows, raw)
        self.store.scatter(rows, self.store.pack(w, b, self.t + 1))

    def _park(self, block: int) -> None:
        """Bring every written row of ``block`` to update t (one sequential pass)."""
        first = block * self.correction.block_rows
        rows = torch.arange(first, min(first + self.correction.block_rows, self.num_instances))
        raw = self.store.gather(rows)
        written = (self.store.fields(raw)[2] != 0).cpu()
        rows, raw = rows[written], raw[written.to(raw.device)]
        self._write(rows, raw, *self._current(rows, raw))
        self.correction.parked(block, self.t)
        self.store.release(first, first + self.correction.block_rows)

    def _push(self, positives: torch.Tensor) -> None:
        """Append the global batch's rows to the FIFO of recent rows."""
        k = len(self.fifo)
        new = positives[-k:]
        slots = (self.fifo_pos + torch.arange(len(new))) % k
        self.fifo[slots] = new
        self.fifo_pos = (self.fifo_pos + len(new)) % k

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, momentum buffers), N×D float32 each, in instance-index order, brought to the
        current update. Reads the whole table: for inspection and tests."""
        self._start()
        rows = self.rows_of(torch.arange(self.num_instances))
        order = rows.argsort()
        w, b = self._current(rows[order], self.store.gather(rows[order]))
        out_w, out_b = torch.empty_like(w), torch.empty_like(b)
        out_w[order], out_b[order] = w, b
        return out_w, out_b

    @property
    def weight(self) -> torch.Tensor:
        return self.current()[0]

    @property
    def momentum_buffer(self) -> torch.Tensor:
        return self.current()[1]

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def sync_state(self) -> None:
        """Before a checkpoint: the table file made current on disk, a new journal interval.
        No row is copied or brought up to date: the correction state travels instead."""
        self._start()
        if self._synced_at != self.t:
            self.store.checkpoint()
            self._synced_at = self.t

    def get_extra_state(self) -> dict[str, Any]:
        self.sync_state()  # a no-op when the trainer has just called it
        state: dict[str, Any] = {
            "num_instances": self.num_instances, "dim": self.dim, "t": self.t,
            "seed": self.seed, "fifo": self.fifo.clone(), "fifo_pos": self.fifo_pos,
            "order_seed": self.order_seed, "order": self._order(),
            "dtype": str(self.store.dtype),
            "gen": self.store.gen, "correction": self.correction.state_dict()}
        if self.store.storage != "mmap":  # the live rows (device: a copy), saved at once
            state["table"] = self.store.table.cpu()
        return state

    @torch.no_grad()
    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Before LIST_ORDER, window order was numpy's permutation of the list.
        saved = (state["num_instances"], state["dim"], state["order_seed"],
                 state.get("order", "numpy" if state["order_seed"] is not None else None),
                 state["dtype"])
        ours = (self.num_instances, self.dim, self.order_seed, self._order(),
                str(self.store.dtype))
        if saved != ours:
            raise ValueError(f"checkpoint classifier is (N, D, order seed, order, dtype) = "
                             f"{saved}, this model's is {ours} (different dataset or settings?)")
        self.t, self.seed = state["t"], state["seed"]
        self.fifo, self.fifo_pos = state["fifo"].clone(), state["fifo_pos"]
        self.correction.load_state_dict(state["correction"])
        if self.store.storage == "mmap":
            if not self.store.path.is_file():  # type: ignore[union-attr]
                raise FileNotFoundError(f"{self.store.path}: the classifier table named by the "
                                        "checkpoint is missing (model.storage_dir moved?)")
            self.store.restore(state["gen"])
        else:
            self.store.table.copy_(state["table"])
            self.store.gen = state["gen"]
        self._started, self._synced_at = True, self.t
        self.defer_update(None)  # a restored classifier has no step in flight


def check_settings(storage: str, sampling: str, num_negatives: int | None,
                   storage_dir: str | None) -> None:
    """One clear error per bad setting, naming its config key."""
    if storage not in STORAGES:
        raise ValueError(f"model.classifier_storage={storage!r}: expected one of {STORAGES}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"model.negative_sampling={sampling!r}: expected one of {SAMPLINGS}")
    if num_negatives is not None and num_negatives < 1:
        raise ValueError(f"model.num_negatives={num_negatives}: expected >= 1, or null for "
                         "all N rows")
    if storage == "mmap" and storage_dir is None:
        raise ValueError("model.classifier_storage=mmap needs model.storage_dir (a directory "
                         "for the table file, normally the run directory)")

"""Row storage of the sampled PIC classifier: one table of N rows in device, host or file memory.

A row holds w (D), its SGD momentum buffer b (D), both in the storage dtype (float32, or
bfloat16/float16 to halve disk and bandwidth), then two int32: ``clock`` (1 + the update the
row is current at; 0: never written, a hole whose value is computed from the seed) and ``gen``
(the checkpoint interval the row was last written in). A step's rows cost one gather and one
scatter (in C with prefetching when the native library is built).

``mmap`` storage is one sparse file (disk in use ∝ rows written), shared by every rank of one
node: all ranks read it, rank 0 alone writes. The file is written in place; a checkpoint does
not copy it. Instead, the first time a row is written in a checkpoint interval, its bytes as of
the checkpoint are appended to that interval's undo journal; resuming from the checkpoint
writes them back. A process killed at any point (kill -9) thus resumes exactly: the journal is
appended before the row is changed, and the page cache outlives the process. (A machine crash
may write a changed row back to disk before its journal record: exact resume across power loss
would need an fsync per step.)
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import torch

from .. import dist, native

STORAGES = ("device", "host", "mmap")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Rows moved per block when a whole table is read (RAM bound).
COPY_ROWS = 1 << 16


def huge_page_zeros(nbytes: int) -> mmap.mmap:
    """``nbytes`` of zeros in anonymous memory advised to use transparent huge pages.

    The classifier reads and writes a few thousand rows per step; with 4 KiB pages nearly every
    row costs a TLB miss, with 2 MiB pages few do (bench/pic_head.py).
    """
    # Private: shared anonymous memory is shmem, which has its own (usually off) huge page
    # setting. Anonymous mappings start zeroed.
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only; elsewhere ordinary pages
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


class RowTable:
    """N rows of ``2·dim`` storage-dtype values plus (clock, gen) int32.

    ``path``: the table file (mmap storage). ``gather``/``scatter`` move raw rows (R×E in the
    storage dtype); :meth:`fields` splits raw rows into float32 (w, b) and int32 (clock, gen).
    """

    def __init__(self, num_rows: int, dim: int, dtype: str, storage: str,
                 path: Path | None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"model.classifier_dtype={dtype!r}: expected one of {list(DTYPES)}")
        self.dtype = DTYPES[dtype]
        size = self.dtype.itemsize
        if (2 * dim * size) % 4:
            raise ValueError(f"model.feature_dim={dim}: a {dtype} row needs an even dimension")
        self.num_rows, self.dim, self.storage, self.path = num_rows, dim, storage, path
        self.elements = 2 * dim + 8 // size  # w, b, then clock and gen as two int32
        self.row_bytes = self.elements * size
        self.writer = storage != "mmap" or dist.is_main()
        self.gen = 1  # the current checkpoint interval
        self._journal: object | None = None
        if storage == "mmap":
            self._map_file()
        else:
            buffer = huge_page_zeros(num_rows * self.row_bytes)
            self.table = torch.frombuffer(buffer, dtype=self.dtype).view(num_rows, self.elements)

    # ------------------------------------------------------------------ the file
    def _map_file(self) -> None:
        """Map the table file, creating it sparse (size set, no block allocated) if absent."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        nbytes = self.num_rows * self.row_bytes
        if self.writer:
            with open(self.path, "ab") as f:  # never truncates: a resume reuses the rows
                if os.fstat(f.fileno()).st_size != nbytes:
                    f.truncate(nbytes)
        dist.barrier()
        fd = os.open(self.path, os.O_RDWR)  # every rank maps it shared; only the writer writes
        try:
            self._mmap = mmap.mmap(fd, nbytes, access=mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        # A step's rows are scattered over the window: read-ahead would fetch unused pages.
        self._mmap.madvise(mmap.MADV_RANDOM)
        self.table = torch.frombuffer(self._mmap, dtype=self.dtype).view(self.num_rows,
                                                                         self.elements)

    def reset(self) -> None:
        """A fresh run: every row a hole again (the file's blocks freed), no journals."""
        if self.storage != "mmap":
            self.table.zero_()
            return
        if self.writer:
            self._mmap.madvise(mmap.MADV_DONTNEED)
            with open(self.path, "r+b") as f:  # type: ignore[arg-type]
                f.truncate(0)
                f.truncate(self.num_rows * self.row_bytes)
            for old in self._journals():
                old.unlink()
        self.gen = 1
        dist.barrier()

    def _journal_path(self, gen: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.name}.undo{gen:09d}")

    def _journals(self) -> list[Path]:
        assert self.path is not None
        return sorted(self.path.parent.glob(f"{self.path.name}.undo*"))

    def checkpoint(self) -> int:
        """Make the file current on disk and start a new interval; its number, for the
        checkpoint. The previous interval's journal is kept until the next checkpoint: the
        checkpoint that needs it stays current until the new one is in place."""
        if self.storage == "mmap" and self.writer:
            self._mmap.flush()
            if self._journal is not None:
                self._journal.close()  # type: ignore[attr-defined]
                self._journal = None
            for old in self._journals():
                if int(old.name.rsplit("undo", 1)[1]) < self.gen:
                    old.unlink()
        if self.storage == "mmap":
            dist.barrier()  # the other ranks read the file: rank 0's last rows are in
        self.gen += 1
        return self.gen

    def restore(self, gen: int) -> None:
        """Resume at the checkpoint that started interval ``gen``: undo the rows written since."""
        self.gen = gen
        if self.storage == "mmap" and self.writer:
            path = self._journal_path(gen)
            if path.is_file():
                self._undo(path)
            for old in self._journals():
                if int(old.name.rsplit("undo", 1)[1]) >= gen:
                    old.unlink()
        dist.barrier()

    def _undo(self, path: Path) -> None:
        data = np.fromfile(path, dtype=np.uint8)
        at = 0
        while at + 8 <= len(data):
            n = int(data[at:at + 8].view(np.int64)[0])
            end = at + 8 + n * (8 + self.row_bytes)
            if end > len(data):
                break  # a record cut short by the crash: its rows were not changed yet
            rows = torch.from_numpy(data[at + 8:at + 8 + 8 * n].view(np.int64).copy())
            raw = torch.from_numpy(data[at + 8 + 8 * n:end].copy()).view(self.dtype)
            self.scatter(rows, raw.view(n, self.elements))
            at = end
        self._mmap.flush()

    def journal(self, rows: torch.Tensor, raw: torch.Tensor) -> None:
        """Before ``rows`` are written: record the bytes of those not yet written this interval."""
        if self.storage != "mmap" or not self.writer:
            return
        first = self.fields(raw)[3] != self.gen
        if not bool(first.any()):
            return
        if self._journal is None:
            self._journal = open(self._journal_path(self.gen), "ab")  # noqa: SIM115
        rows, raw = rows[first].long().contiguous(), raw[first].contiguous()
        record = np.concatenate([np.array([len(rows)], np.int64).view(np.uint8),
                                 rows.numpy().view(np.uint8),
                                 raw.view(torch.uint8).numpy().reshape(-1)])
        self._journal.write(record.tobytes())  # type: ignore[attr-defined]
        self._journal.flush()  # type: ignore[attr-defined]

    def journal_bytes(self) -> int:
        """Bytes in the current interval's journal (what the next crash would undo)."""
        path = self._journal_path(self.gen) if self.storage == "mmap" else None
        return path.stat().st_size if path is not None and path.is_file() else 0

    def release(self, first: int, end: int) -> None:
        """Rows [first, end) are not needed soon: drop them from this process's memory (mmap;
        the page cache keeps changed rows until they are written back)."""
        if self.storage != "mmap":
            return
        a = first * self.row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, a, end * self.row_bytes - a)

    # ------------------------------------------------------------------ rows
    def to(self, device: torch.device) -> None:
        """Device storage follows the module."""
        if self.storage == "device" and self.table.device != device:
            self.table = self.table.to(device)

    def fields(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw rows → (w, b) float32 R×D, (clock, gen) int32 R."""
        d = self.dim
        ints = raw.view(torch.int32)
        return raw[:, :d].float(), raw[:, d:2 * d].float(), ints[:, -2], ints[:, -1]

    def pack(self, w: torch.Tensor, b: torch.Tensor, clock: int | torch.Tensor) -> torch.Tensor:
        """Raw rows from float32 (w, b) current at ``clock``, written in this interval."""
        raw = torch.empty(len(w), self.elements, dtype=self.dtype, device=w.device)
        raw[:, :self.dim], raw[:, self.dim:2 * self.dim] = w, b
        ints = raw.view(torch.int32)
        ints[:, -2], ints[:, -1] = clock, self.gen
        return raw

    def _native(self) -> bool:
        return native.LIB is not None and self.table.device.type == "cpu"

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw copies of ``rows`` (sorted, distinct int64; range checked here, once per step:
        the C code trusts it, and :meth:`scatter` later writes the same rows)."""
        if len(rows) and not (0 <= int(rows[0]) and int(rows[-1]) < self.num_rows):
            raise IndexError(f"instance index outside [0, {self.num_rows})")
        if not self._native():  # index_select: ~2.5x faster than table[rows]
            return self.table.index_select(0, rows.to(self.table.device))
        rows = rows.long().contiguous()  # the C side reads int64
        out = torch.empty(len(rows), self.elements, dtype=self.dtype)
        native.LIB.pic_gather_rows(self.table.data_ptr(), rows.data_ptr(), len(rows),
                                   self.row_bytes, out.data_ptr())
        return out

    def scatter(self, rows: torch.Tensor, raw: torch.Tensor) -> None:
        """table[rows] = raw (rows sorted, distinct); only the writer rank writes."""
        if not self.writer:
            return
        if not self._native():
            self.table.index_copy_(0, rows.to(self.table.device), raw.to(self.table.device))
            return
        rows, raw = rows.long().contiguous(), raw.contiguous()
        native.LIB.pic_scatter_rows(self.table.data_ptr(), rows.data_ptr(), len(rows),
                                    self.row_bytes, raw.data_ptr())

    def allocated_bytes(self) -> int:
        """Disk blocks the table file uses (mmap; sparse), else the table's bytes."""
        if self.storage != "mmap":
            return self.num_rows * self.row_bytes
        return os.stat(self.path).st_blocks * 512  # type: ignore[arg-type]

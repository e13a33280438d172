"""One run per run directory: an exclusive lock, and start-up clean-up of what a kill left.

Two runs writing one directory would resume from each other's checkpoints and overwrite each
other's results. The lock is ``fcntl.lockf`` on ``<run dir>/run.lock``: the kernel releases it
when its process ends, however it ends (kill -9 included), so there is never a stale lock to
remove by hand, and a SLURM requeue of the same job (its old process is gone) takes it again.
POSIX locks also work on NFS and are not inherited by forked loader workers. The file holds
the owner's pid, host and start time, read back to tell a second run who is there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import dist
from ..dist.init import local_device
from .checkpoint import PARTIAL

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory."""


@contextlib.contextmanager
def use_run_dir(run_dir: str | Path) -> Iterator[None]:
    """The run's hold on ``run_dir`` for the ``with`` block: rank 0 (one lock per run, however
    many processes) takes the lock and removes orphaned temporaries; every rank learns whether
    it got it, so that all of them stop at once when another run is there."""
    with contextlib.ExitStack() as stack:
        refused: RunDirLocked | None = None
        if dist.is_main():
            try:
                stack.enter_context(lock_run_dir(run_dir))
            except RunDirLocked as err:
                refused = err
            else:
                remove_orphans(run_dir)
        flag = torch.tensor(float(refused is not None), device=local_device())
        if dist.all_reduce_sum(flag) > 0:
            raise refused or RunDirLocked(f"{run_dir} is in use by another run (see rank 0)")
        yield


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the ``with`` block; raise :class:`RunDirLocked` naming the
    holder at once if another process has it. Call in one process per run (rank 0)."""
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                # A file system without locks (an NFS mount without lockd): run, but say so.
                log.warning("cannot lock %s (%s): a second run in this directory would not be "
                            "stopped", path, err)
                yield path
                return
            raise RunDirLocked(f"{path.parent} is in use by another run ({_holder(fd)}); wait for "
                               "it to end or choose another hydra.run.dir") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race a new owner)


def _holder(fd: int) -> str:
    """'pid P on HOST since TIME' from the lock file, or what is known."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on {owner['host']} since {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "its owner has not written its name yet"


def remove_orphans(run_dir: str | Path) -> list[Path]:
    """Delete the temporaries (``.<name>.<random>.partial``) that atomic writes killed mid-way
    left in ``run_dir``. Safe only under the run directory's lock: no live writer owns them."""
    removed = []
    for tmp in Path(run_dir).glob(f".*{PARTIAL}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted write: %s",
                    len(removed), ", ".join(p.name for p in removed))
    return removed

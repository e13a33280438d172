"""``cluster=local``: this machine, one process in place or N spawned DDP processes."""

from __future__ import annotations

import multiprocessing
import os
import socket
from typing import Any

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from ..config import config_dict
from ..dist.init import init_distributed
from . import Run, configure_logging


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago (the rendezvous's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(local_rank: int, nproc: int, port: int, cfg: dict[str, Any], run: Run,
                  results: Any) -> None:
    """One spawned process of :class:`Local`: rank ``local_rank`` of ``nproc``."""
    # A spawned child inherits "spawn" as its default start method, so each DataLoader here
    # would start its workers as fresh interpreters, one after another, each importing torch and
    # unpickling the dataset (~7 s each on 2 CPU cores; most of the first DDP step). Restore the
    # platform's default (fork on Linux), as in a process started by torchrun or SLURM.
    multiprocessing.set_start_method(None, force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc))
    configure_logging(local_rank)
    init_distributed()
    try:
        result = run(OmegaConf.create(cfg))
    finally:
        torch.distributed.destroy_process_group()
    if local_rank == 0:
        results.put(result)


class Local:
    """Run on this machine: one process in place, or ``nproc_per_node`` DDP processes.

    ``nproc_per_node`` defaults to the number of GPUs (1 on a CPU-only machine). Started by
    ``torchrun`` (``RANK`` is set), the processes already exist: each runs in place.
    """

    def __init__(self, nproc_per_node: int | None = None) -> None:
        if nproc_per_node is not None and nproc_per_node < 1:
            raise ValueError(f"cluster.nproc_per_node={nproc_per_node}: need at least 1")
        self.nproc_per_node = nproc_per_node

    def launch(self, cfg: DictConfig, run: Run) -> Any:
        """Run ``run(cfg)`` in every process; returns rank 0's result."""
        nproc = self.nproc_per_node or max(torch.cuda.device_count(), 1)
        if nproc == 1 or "RANK" in os.environ:
            init_distributed()
            return run(cfg)
        if torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise ValueError(f"cluster.nproc_per_node={nproc} but this machine has "
                             f"{torch.cuda.device_count()} GPUs (one process per GPU)")
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        procs = mp.start_processes(_local_worker, nprocs=nproc, join=False, start_method="spawn",
                                   args=(nproc, free_port(), config_dict(cfg), run, results))
        result = None
        # Read while waiting: a result larger than a pipe's buffer would block its writer.
        while not procs.join(timeout=0.5):
            if not results.empty():
                result = results.get()
        if result is None and not results.empty():
            result = results.get()
        return result

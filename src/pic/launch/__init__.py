"""Where a run executes: the ``cluster`` group, one module per option (``local``, ``slurm``).

A launcher receives the composed config and ``run`` (``pic.run.run_task``) and makes every
process of the job call :func:`pic.dist.init.init_distributed` and then ``run(cfg)``. The config
travels resolved: spawned processes and SLURM jobs have no Hydra context to resolve
``${hydra:...}`` in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

Run = Callable[[DictConfig], Any]


def configure_logging(rank: int) -> None:
    """Console logging for a process Hydra did not start; ranks > 0 report only warnings."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s")

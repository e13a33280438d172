"""Where a run executes: the ``cluster`` group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


class Local:
    """Run the task on this machine, in this process."""

    def __init__(self, nproc_per_node: int | None = None) -> None:
        self.nproc_per_node = nproc_per_node

    def launch(self, cfg: DictConfig, run: Callable[[DictConfig], Any]) -> Any:
        return run(cfg)

"""Experiment loggers: W&B (offline unless told otherwise) or nothing.

Only rank 0 creates a logger. The W&B run id is stored in every checkpoint so that a resumed or
requeued run continues the same W&B run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NoLogger:
    run_id: str | None = None

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NoLogger):
    """Logs to W&B. ``mode='offline'`` (default) writes ``<run dir>/wandb`` and never touches
    the network; upload later with ``wandb sync``. ``mode='online'`` needs a login."""

    def __init__(self, project: str = "pic", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list[str] | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}: expected offline, online or disabled")
        self.project, self.entity, self.mode = project, entity, mode
        self.group, self.tags = group, list(tags or [])
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                              dir=str(run_dir), config=config, id=run_id, resume="allow",
                              group=self.group, tags=self.tags,
                              settings=wandb.Settings(console="off"))
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

"""Experiment loggers: W&B (offline unless told otherwise), TensorBoard, or nothing.

Only rank 0 creates a logger. The trainer calls ``start`` (with the run id of its checkpoint),
``log`` at every log point, and the task calls ``summary`` with its final metrics and
``finish``. The W&B run id is stored in every checkpoint so that a resumed or requeued run
continues the same W&B run; :meth:`Logger.continue_run` lets a second phase of one task
(``task.pretrain_first``'s linear evaluation) log into the run of the first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Logger:
    """The interface, and the bookkeeping of a continued run (no output of its own)."""

    run_id: str | None = None
    run_dir: Path | None = None  # set by continue_run: the directory of the run continued
    step_offset: int = 0
    prefix: str = ""

    def continue_run(self, run_id: str | None, run_dir: Path, step_offset: int,
                     prefix: str) -> None:
        """Log the next phase into run ``run_id`` (written in ``run_dir``): its steps follow
        the earlier phase's ``step_offset`` steps and its metric names get ``prefix`` (e.g.
        ``linear/``), so that the phases' ``loss`` curves stay apart."""
        self.run_id, self.run_dir = run_id, Path(run_dir)
        self.step_offset, self.prefix = step_offset, prefix

    def _names(self, metrics: dict[str, Any], summary: bool = False) -> dict[str, Any]:
        """Metric names of this phase; a summary key that already names the phase (the
        linear evaluation's ``linear_top1``) keeps its name."""
        phase = self.prefix.rstrip("/")
        return {k if summary and phase and k.startswith(phase) else self.prefix + k: v
                for k, v in metrics.items()}

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        self.run_id = run_id or self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class NoLogger(Logger):
    """No experiment logging (console and results.json only)."""


def sweep_of(run_dir: Path) -> Path | None:
    """The Hydra sweep directory ``run_dir`` lies in (the nearest one holding Hydra's
    ``multirun.yaml``), or None for a single run."""
    for folder in Path(run_dir).absolute().parents:
        if (folder / "multirun.yaml").is_file():
            return folder
    return None


def run_names(config: dict[str, Any], run_dir: Path) -> dict[str, str | None]:
    """W&B's ``group`` (the sweep: its last three path components, e.g.
    ``multirun/2026-12-02/01-30-00``), ``job_type`` (the task: ``pretrain``, ``linear``, ...,
    from its module) and ``name`` (the point's directory in the sweep, else the run's)."""
    out_dir = Path(config.get("output_dir") or run_dir)
    sweep = sweep_of(out_dir)
    target = (config.get("task") or {}).get("_target_", "")
    return {
        "group": "/".join(sweep.parts[-3:]) if sweep else None,
        "job_type": target.split(".")[-2] if target.count(".") >= 1 else None,
        "name": (f"{config.get('name', 'run')}/{out_dir.absolute().relative_to(sweep)}"
                 if sweep else out_dir.name),
    }


class WandbLogger(Logger):
    """Logs to W&B. ``mode='offline'`` (default) writes ``<run dir>/wandb`` and never touches
    the network; upload later with ``wandb sync``. ``mode='online'`` needs a login.

    ``group`` and ``job_type`` null: the sweep the run belongs to and the task (so W&B groups
    a sweep's points and tells pretraining from evaluation). The run's config is the composed
    config the trainer passes (with whatever provenance it carries); ``summary`` writes the
    final metrics.
    """

    def __init__(self, project: str = "pic", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, job_type: str | None = None,
                 tags: list[str] | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}: expected offline, online or disabled")
        self.project, self.entity, self.mode = project, entity, mode
        self.group, self.job_type, self.tags = group, job_type, list(tags or [])
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        names = run_names(config, run_dir)
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                              dir=str(self.run_dir or run_dir), config=config,
                              id=run_id or self.run_id, resume="allow",
                              group=self.group or names["group"],
                              job_type=self.job_type or names["job_type"], tags=self.tags,
                              name=names["name"], settings=wandb.Settings(console="off"))
        if self.prefix:  # a continued phase's charts also get their own step axis
            self.run.define_metric(f"{self.prefix}step")
            self.run.define_metric(f"{self.prefix}*", step_metric=f"{self.prefix}step")
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        extra = {f"{self.prefix}step": step} if self.prefix else {}
        self.run.log({**self._names(metrics), **extra}, step=self.step_offset + step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(self._names(metrics, summary=True))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardLogger(Logger):
    """Scalars to ``<run dir>/<subdir>`` for TensorBoard (``tensorboard --logdir`` a run or a
    whole sweep). The composed config is a text entry (``config``); ``summary`` writes each
    final scalar as ``final/<name>`` at the last logged step. A resumed run appends a new
    event file to the same folder."""

    def __init__(self, subdir: str = "tensorboard", flush_secs: int = 30) -> None:
        self.subdir, self.flush_secs = subdir, flush_secs
        self.writer = None
        self.last_step = 0

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().start(run_dir, config, run_id)
        self.writer = SummaryWriter(str(Path(self.run_dir or run_dir) / self.subdir),
                                    flush_secs=self.flush_secs)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        # Markdown code block: TensorBoard renders text entries as markdown.
        self.writer.add_text(f"{self.prefix}config", "    " + text.replace("\n", "\n    "))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.last_step = self.step_offset + step
        for key, value in self._names(metrics).items():
            self.writer.add_scalar(key, value, self.last_step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in self._names(metrics, summary=True).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"final/{key}", value, self.last_step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

"""``task=recording`` for SLURM tests: the real pretraining task, plus a record per rank and
attempt of what the launcher gave the process (rank, world size, rendezvous, node), which images
each of its steps trained on, and how many checkpoints it wrote.

The record is written even when the attempt ends by preemption, to
``<run dir>/ranks/attempt-<SLURM_RESTART_COUNT>-rank-<RANK>.json``; ``….steps`` beside it holds
the number of steps the attempt has finished so far.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import pic.engine.checkpoint as checkpoint
from pic.engine.trainer import Trainer
from pic.tasks.pretrain import Pretrain

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID",
       "SLURMD_NODENAME", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")


def write_conf(conf: Path) -> None:
    """The ``task=recording`` option in a folder for ``hydra.searchpath``."""
    (conf / "task").mkdir(parents=True, exist_ok=True)
    (conf / "task" / "recording.yaml").write_text(
        "_target_: tests.slurm.recording.RecordingPretrain\n")


class RecordingPretrain(Pretrain):
    """:class:`Pretrain` with its defaults, recording as it runs (see the module's docstring)."""

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        record: dict[str, Any] = {name: os.environ.get(name) for name in ENV}
        record.update(hostname=socket.gethostname(), steps=[], saves=0)
        train_step, atomic_save = Trainer.train_step, checkpoint.atomic_save

        folder = out_dir / "ranks"
        folder.mkdir(exist_ok=True)
        name = f"attempt-{record['SLURM_RESTART_COUNT'] or 0}-rank-{record['RANK']}"

        def recording_step(trainer, net, model, optimizer, batch, lr):
            out = train_step(trainer, net, model, optimizer, batch, lr)
            record["steps"].append(batch["index"].tolist())  # a step that ran to its end
            # How far this attempt is, for a test waiting to interrupt it mid-training.
            (folder / f"{name}.steps").write_text(str(len(record["steps"])))
            return out

        def counting_save(obj, path):
            record["saves"] += 1
            return atomic_save(obj, path)

        Trainer.train_step, checkpoint.atomic_save = recording_step, counting_save
        try:
            return super().run(cfg, out_dir)
        finally:
            Trainer.train_step, checkpoint.atomic_save = train_step, atomic_save
            (folder / f"{name}.json").write_text(json.dumps(record))

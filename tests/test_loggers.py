"""W&B and TensorBoard as people use them, read back from the files they write: a requeued run
continues its W&B run, ``task.pretrain_first`` keeps one run for pretraining and evaluation,
sweep points share a group, the composed config is the run's config and the final metrics its
summary. W&B is offline throughout (nothing here goes online)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from pic.data.samplers import EpochSampler
from pic.engine.checkpoint import load_checkpoint
from pic.engine.optim import sgd
from pic.engine.schedules import Cosine
from pic.engine.trainer import Trainer
from pic.logging.loggers import WandbLogger
from pic.models.pic import PIC
from pic.networks.resnet import TinyResNet
from pic.run import run_task

from .helpers import ROOT, TinyImages, compose_config

SMALL = ["data=synthetic", "data.num_images=96", "data.num_val_images=32", "data.resolution=16",
         "data.image_size=16", "data.num_classes=4", "backbone.widths=[8,16]",
         "trainer.batch_size=32", "trainer.num_workers=0", "trainer.progress=false",
         "trainer.log_every=1", "trainer.precision=fp32", "trainer.channels_last=false",
         "eval.k=5", "trainer.epochs=2"]
PRETRAIN = ["task.plot=false", "task.knn_random_init=false"]
LINEAR = ["task=linear", "task.pretrain_first=true", "task.epochs=1", "task.batch_size=32",
          "task.warmup_epochs=0", "task.lr=1.0"]

BLOCK = 32 * 1024  # the .wandb file: LevelDB's log format in 32 KiB blocks, after a 7-byte header


def wandb_records(path: Path, timeout_s: float = 60.0) -> list[Any]:
    """Every record of a ``run-<id>.wandb`` file, up to its ``exit`` record (W&B's service
    writes the file in the background, and may do so after ``finish`` has returned)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = parse_records(path.read_bytes())
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s"
        time.sleep(0.2)


def parse_records(data: bytes) -> list[Any]:
    """The records of a ``.wandb`` file's bytes, parsed here from the format (a record: crc32
    (4 bytes), length (2, little-endian), kind (1: whole, 2/3/4: first/middle/last fragment),
    data; a block's last < 7 bytes are padding)."""
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_runs(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per offline W&B run segment under ``run_dir/wandb``, oldest first: id, group,
    job_type, name, config, history rows, summary (user keys)."""
    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"history": [], "summary": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group,
                           job_type=record.run.job_type, name=record.run.display_name,
                           config=_items(record.run.config.update))
            elif kind == "history":
                run["history"].append(_items(record.history.item))
            elif kind == "summary":
                run["summary"].update({k: v for k, v in _items(record.summary.update).items()
                                       if not k.startswith("_") and k})
        runs.append(run)
    return runs


def pretrain(out_dir: Path, *overrides: str) -> dict[str, Any]:
    return run_task(compose_config(*SMALL, *PRETRAIN, f"output_dir={out_dir}", *overrides))


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pretrain(run_dir, "logger=wandb", "trainer.max_steps=2")  # preempted after 2 of 6 steps
    results = pretrain(run_dir, "logger=wandb")
    first, second = wandb_runs(run_dir)
    run_id = load_checkpoint(run_dir / "current.pth")["state"]["run_id"]
    assert first["id"] == second["id"] == run_id == results["run_id"]
    assert [row["_step"] for row in first["history"]] == [1, 2]
    assert [row["_step"] for row in second["history"]] == [3, 4, 5, 6]
    assert first["job_type"] == "pretrain" and first["group"] == ""  # no sweep
    # The composed config is the run's config; the final metrics are its summary.
    config = first["config"]
    assert config["model"]["_target_"] == "pic.models.pic.PIC"
    assert config["trainer"]["batch_size"] == 32 and config["data"]["num_images"] == 96
    # ... with the provenance the checkpoint holds (see the test below).
    assert config["provenance"] == load_checkpoint(run_dir / "current.pth")["provenance"]
    assert second["summary"]["knn_top1"] == results["knn_top1"]
    assert second["summary"]["steps"] == 6

    # task=knn of that checkpoint: a run of its own, job_type knn, the accuracy in its summary.
    knn = run_task(compose_config(*SMALL, "task=knn", f"pretrained={run_dir / 'current.pth'}",
                                  f"output_dir={tmp_path / 'knn'}", "logger=wandb"))
    (run,) = wandb_runs(tmp_path / "knn")
    assert run["job_type"] == "knn" and run["summary"]["knn_top1"] == knn["knn_top1"]


def test_the_wandb_config_carries_the_runs_provenance(tmp_path: Path) -> None:
    """What ``Trainer.fit`` is given as provenance (dataset fingerprint, code version) is in the
    W&B run's config, beside the composed config, as in the checkpoint."""
    torch.manual_seed(0)
    model = PIC(TinyResNet([4, 8]), 16, feature_dim=8)
    origin = {"data_fingerprint": "f00d", "code_commit": "c0ffee", "code_dirty": False}
    trainer = Trainer(epochs=1, batch_size=8, num_workers=0, device="cpu", progress=False)
    trainer.fit(model, TinyImages(16, size=8), EpochSampler(16, seed=0), sgd(model, 8), Cosine(),
                tmp_path, logger := WandbLogger(), seed=0, config={"seed": 0}, provenance=origin)
    logger.finish()
    (run,) = wandb_runs(tmp_path)
    assert run["config"]["provenance"] == origin and run["config"]["seed"] == 0
    assert load_checkpoint(tmp_path / "current.pth")["provenance"] == origin


def test_pretrain_first_is_one_wandb_run_grouped_by_its_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-12-02" / "01-02-03"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")  # what Hydra's sweeper writes
    run_dir = sweep / "4"
    results = run_task(compose_config(*SMALL, *LINEAR, f"output_dir={run_dir}", "logger=wandb"))
    pre, linear = wandb_runs(run_dir)
    assert pre["id"] == linear["id"] == results["run_id"]
    assert load_checkpoint(run_dir / "linear" / "current.pth")["state"]["run_id"] == pre["id"]
    for run in (pre, linear):
        assert run["group"] == "multirun/2026-12-02/01-02-03"
        assert run["job_type"] == "linear" and run["name"] == "test/4"
    # The evaluation's curves follow the pretraining's steps, under linear/ names.
    assert max(row["_step"] for row in pre["history"]) == results["steps"] == 6
    steps = [row["_step"] for row in linear["history"] if "linear/loss" in row]
    assert steps == [7, 8, 9]
    assert [row["linear/step"] for row in linear["history"] if "linear/loss" in row] == [1, 2, 3]
    assert "loss" not in linear["history"][0]
    assert pre["summary"]["knn_top1"] == results["knn_top1"]
    assert linear["summary"]["linear_top1"] == results["linear_top1"]
    assert linear["summary"]["linear/steps"] == 3 and pre["summary"]["steps"] == 6


def test_tensorboard_logs_what_the_checkpoint_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = pretrain(run_dir, "logger=tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    history = load_checkpoint(run_dir / "current.pth")["state"]["history"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (step, pytest.approx(loss)) for step, loss in history]
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3, 4, 5, 6]
    (final,) = events.Scalars("final/knn_top1")
    assert (final.step, final.value) == (6, pytest.approx(results["knn_top1"]))
    (text,) = events.Tensors("config/text_summary")
    assert "pic.models.pic.PIC" in text.tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_a_real_sweep_groups_its_points(tmp_path: Path) -> None:
    """``launch.py -m``: Hydra's own sweep directory is what the points are grouped by."""
    overrides = [o for o in SMALL + PRETRAIN if not o.startswith("trainer.epochs")]
    proc = subprocess.run(
        [sys.executable, "launch.py", "-m", "seed=0,1", "trainer.max_steps=1", "logger=wandb",
         *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, capture_output=True,
        text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [wandb_runs(tmp_path / "sweep" / point)[0] for point in ("0", "1")]
    group = "/".join((tmp_path / "sweep").parts[-3:])
    assert [(r["group"], r["job_type"], r["name"]) for r in runs] == [
        (group, "pretrain", "pic/0"), (group, "pretrain", "pic/1")]
    assert runs[0]["id"] != runs[1]["id"]
    assert [r["config"]["seed"] for r in runs] == [0, 1]

"""Evaluation end to end: a multi-process run with the default task and eval settings finishes
and reports every result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = ["data=synthetic", "data.num_images=96", "data.num_val_images=48",
              "data.resolution=16", "data.image_size=16", "data.num_classes=4"]


@pytest.mark.slow
def test_two_processes_with_default_evaluation_write_results(tmp_path: Path) -> None:
    """task/eval defaults (t-SNE plot, random-init baseline): rank 0 used to wait alone in a
    collective for the plot's features after rank 1 had left, and died without results.json."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "launch.py", *SMALL_DATA, "cluster.nproc_per_node=2",
           "trainer.max_steps=2", "trainer.batch_size=32", "trainer.precision=fp32",
           "trainer.num_workers=0", "logger=none", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["knn_top1_random_init"] <= 100
    assert (run / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

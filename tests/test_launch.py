"""``python launch.py`` end to end (short): every artifact of a run is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pic.engine.checkpoint import load_checkpoint

from .helpers import ROOT

# A bare environment otherwise: the session's baseline cache (tests/conftest.py), and the
# sources under test when PYTHONPATH points at a checkout other than the installed one.
PASSED = ("PIC_CACHE_DIR", "PYTHONPATH")


def test_launch_writes_every_artifact(tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "PATH": "/usr/bin:/bin",
           **{k: os.environ[k] for k in PASSED if k in os.environ}}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={out}", "trainer.max_steps=3",
         "trainer.batch_size=128", "backbone.widths=[8,16]", "trainer.num_workers=0"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.yaml").is_file()
    hydra = out / ".hydra"  # written by the run, not by Hydra (pic.run.hydra_record)
    assert sorted(p.name for p in hydra.iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "- trainer.max_steps=3\n" in (hydra / "overrides.yaml").read_text()
    assert (out / "summary.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "knn_top1_pixels", "probe_top1",
                "precision", "steps", "train_time_s", "bad_steps"):
        assert key in results, key
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["knn_top1_random_init"] <= 100
    assert results["steps"] == 3
    ckpt = load_checkpoint(out / "current.pth")
    assert ckpt["state"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and ckpt["state"]["run_id"] in runs[0].name
    # The closing summary: trained, random init and pixels side by side, kNN and the probe.
    assert all(word in proc.stdout for word in ("trained", "random init", "pixels", "kNN-20",
                                                "probe"))

"""Issue 15's fault probes that are not about one dataset or the config: the run-directory
lock, provenance (data fingerprint, code version), checkpoints that must stay good."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pic.collect import collect
from pic.engine.health import diverged, first_non_finite
from pic.engine.rundir import RunDirLocked, lock_run_dir, remove_orphans
from pic.provenance import DatasetChanged, check_same_dataset, code_version, describe_code

from .helpers import ROOT

HOLD = """
import sys, time
from pic.engine.health import diverged, first_non_finite
from pic.engine.rundir import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---------------------------------------------------------------- the run-directory lock


def test_a_second_run_in_a_locked_directory_stops_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunDirLocked) as err, lock_run_dir(tmp_path):
            pass
        assert time.monotonic() - start < 1.0  # at once, no waiting
        message = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()} since " in message
        assert str(tmp_path) in message
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_leaves_no_stale_lock(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run.lock").is_file()  # the file remains; the lock died with its owner
    with lock_run_dir(tmp_path):
        owner = json.loads((tmp_path / "run.lock").read_text())
    assert owner["pid"] == os.getpid()


def test_the_lock_is_released_after_the_run(tmp_path):
    with lock_run_dir(tmp_path):
        pass
    holder = _holder(tmp_path)  # another process gets it at once
    holder.kill()
    holder.wait()


def test_orphaned_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in (".current.pth.abc123", ".current.pth.x", "current.pth", ".hydra", "other.pth"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_orphans(tmp_path, "current.pth")
    assert sorted(p.name for p in removed) == [".current.pth.abc123", ".current.pth.x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "current.pth", "other.pth"]


# ---------------------------------------------------------------- provenance


def test_code_version_is_this_checkout():
    version = code_version()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert version["code_commit"] == head and isinstance(version["code_dirty"], bool)


def test_code_version_outside_a_checkout_is_unknown(tmp_path):
    shutil.copytree(ROOT / "src" / "pic", tmp_path / "pic",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    code = "import json; from pic.provenance import code_version; print(json.dumps(code_version()))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=tmp_path)
    assert json.loads(out.stdout) == {"code_commit": None, "code_dirty": None}
    assert describe_code(json.loads(out.stdout)) == "unknown"


def test_resume_on_another_dataset_is_refused_unless_allowed(tmp_path, caplog):
    saved, now = {"data_fingerprint": "aaaa"}, {"data_fingerprint": "bbbb"}
    with pytest.raises(DatasetChanged, match=r"current.pth was trained on dataset aaaa, the "
                                             r"configured data is bbbb.*allow_dataset_change"):
        check_same_dataset(saved, now, tmp_path / "current.pth", allow_change=False)
    check_same_dataset(saved, now, tmp_path / "current.pth", allow_change=True)
    assert "continuing on the new data" in caplog.text
    check_same_dataset(saved, saved, tmp_path / "current.pth", allow_change=False)


def test_collect_shows_data_and_code(tmp_path):
    for name, data, dirty in (("a", "f00d", False), ("b", "beef", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"knn_top1": 50.0, "data_fingerprint": data, "code_commit": "0123456789abcdef",
             "code_dirty": dirty}))
    columns, rows = collect(tmp_path)
    assert columns == ["run", "data", "code", "knn_top1"]
    assert [(r["data"], r["code"]) for r in rows] == [("f00d", "0123456789"),
                                                      ("beef", "0123456789+dirty")]


# ---------------------------------------------------------------- divergence


def test_first_non_finite_names_the_tensor():
    ok, bad = torch.zeros(3), torch.tensor([1.0, float("inf")])
    assert first_non_finite([("a", ok), ("steps", torch.tensor(5)), ("b", bad)]) == "b"
    assert first_non_finite([("a", ok), ("n", torch.tensor([float("nan")]))]) == "n"
    assert first_non_finite([("a", ok)]) is None


def _curve(*losses: float) -> list[tuple[int, float]]:
    return [(20 * (i + 1), loss) for i, loss in enumerate(losses)]


def test_a_loss_that_explodes_or_falls_back_to_chance_is_divergence():
    assert "over twice" in diverged(_curve(7.0, 6.0, 15.0, 16.0, 30.0))
    assert "came back to 7" in diverged(_curve(7.0, 6.0, 4.0, 3.0, 6.9, 7.0, 7.0))


def test_a_learning_noisy_or_slow_loss_is_not_divergence():
    rng = np.random.default_rng(0)
    learning = 7.0 * np.exp(-np.arange(50) / 20) + 1 + rng.normal(0, 0.2, 50)
    assert diverged(_curve(*learning)) is None
    assert diverged(_curve(7.0, 7.1, 7.05, 7.2, 7.1, 7.0)) is None  # slow start, at chance
    assert diverged(_curve(7.0, 6.0, 4.0, 3.0, 6.9, 3.0, 7.0)) is None  # one bad window
    assert diverged(_curve(7.0, 30.0, 30.0)) is None  # too short to tell

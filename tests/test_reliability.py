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

import pytest

from pic.collect import collect
from pic.engine.rundir import RunDirLocked, lock_run_dir, remove_orphans
from pic.provenance import DatasetChanged, check_same_dataset, code_version, describe_code

from .helpers import ROOT

HOLD = """
import sys, time
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

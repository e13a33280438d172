"""Issue 15's fault probes that are not about one dataset or the config: the run-directory
lock, provenance (data fingerprint, code version), checkpoints that must stay good."""

from __future__ import annotations

import json
import math
import os
import re
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
from torch import nn

from pic.collect import collect
from pic.engine import checkpoint
from pic.engine.checkpoint import Checkpointer, TrainState, load_checkpoint
from pic.engine.health import diverged, first_non_finite
from pic.engine.rundir import RunDirLocked, lock_run_dir, use_run_dir
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
    names = (".current.pth.abc123.partial", ".results.json.x.partial", "current.pth", ".hydra",
             "other.pth", ".current.pth.unrelated")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    with use_run_dir(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".current.pth.unrelated", ".hydra", "current.pth", "other.pth", "run.lock"]


def test_a_write_killed_midway_leaves_a_temporary_that_start_up_removes(tmp_path):
    code = ("import os, sys; from pic.engine.checkpoint import atomic_write\n"
            "def write(f):\n    f.write(b'x' * 1000); f.flush(); os.kill(os.getpid(), 9)\n"
            "atomic_write(sys.argv[1], write)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "current.pth")], check=False)
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".current.pth.")
    with use_run_dir(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


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


# ---------------------------------------------------------------- checkpoints


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width))


class _Model(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = _net(width)

    def sync_state(self) -> None:
        pass


def _checkpointer(path: Path, width: int, **kw) -> Checkpointer:
    model = _Model(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Checkpointer(path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), **kw)


MOCO = {"model": {"_target_": "pic.models.moco.MoCo", "queue_size": 4096},
        "backbone": {"_target_": "pic.networks.resnet.resnet_tiny", "width": 16}}
PIC = {"model": {"_target_": "pic.models.pic.PIC", "temperature": 0.2},
       "backbone": {"_target_": "pic.networks.resnet.resnet_tiny", "width": 16}}


def test_resuming_another_methods_checkpoint_says_which_and_what_to_do(tmp_path):
    path = tmp_path / "current.pth"
    _checkpointer(path, 4, config=MOCO).save(TrainState(step=7))
    with pytest.raises(ValueError) as err:
        _checkpointer(path, 5, config=PIC).restore()
    message = str(err.value)
    assert f"{path} is a checkpoint of model MoCo(queue_size=4096) on backbone " \
           "resnet_tiny(width=16)" in message
    assert "this run's model PIC(temperature=0.2)" in message
    assert "config.yaml" in message and "hydra.run.dir" in message


def test_resume_across_datasets_stops_unless_allowed(tmp_path):
    path = tmp_path / "current.pth"
    _checkpointer(path, 4, provenance={"data_fingerprint": "aaaa"}).save(TrainState(step=3))
    with pytest.raises(DatasetChanged, match="trained on dataset aaaa, the configured data is "
                                             "bbbb"):
        _checkpointer(path, 4, provenance={"data_fingerprint": "bbbb"}).restore()
    state = _checkpointer(path, 4, provenance={"data_fingerprint": "bbbb"},
                          allow_dataset_change=True).restore()
    assert state.step == 3


def test_a_checkpoint_with_non_finite_tensors_is_refused_naming_file_and_tensor(tmp_path):
    path = tmp_path / "current.pth"
    ckpt = _checkpointer(path, 4)
    ckpt.save(TrainState())
    saved = torch.load(path, weights_only=False)
    saved["model"]["net.1.running_var"][2] = math.inf
    torch.save(saved, path)
    with pytest.raises(ValueError, match=rf"{path}: tensor net.1.running_var holds NaN or inf"):
        load_checkpoint(path)


def test_disk_full_while_checkpointing_is_named_and_the_previous_one_is_intact(tmp_path,
                                                                              monkeypatch):
    path = tmp_path / "current.pth"
    ckpt = _checkpointer(path, 4)
    ckpt.save(TrainState(step=1))
    before = path.read_bytes()
    real_mkstemp = checkpoint.tempfile.mkstemp

    def full_disk(**kw):  # the temporary's name as usual, its writes to /dev/full (ENOSPC)
        fd, name = real_mkstemp(**kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", full_disk)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on device writing {path}; "
                                      r"the previous checkpoint is intact$"):
        ckpt.save(TrainState(step=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.pth"]


def test_file_size_limit_while_checkpointing_is_named(tmp_path):
    """A real kernel refusal through torch's zip writer (RLIMIT_FSIZE: EFBIG)."""
    code = f"""
import resource, signal, torch
from pathlib import Path
from pic.engine.checkpoint import atomic_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    atomic_save({{"w": torch.zeros(100_000)}}, Path({str(tmp_path / "current.pth")!r}))
except OSError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (f"[Errno 27] file too large writing {tmp_path / 'current.pth'};"
                                  " no checkpoint was written")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- end to end (launch.py)


def launch(run_dir: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={run_dir}",
                           "logger=none", *overrides], capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_launch_in_a_busy_run_directory_stops_at_once(tmp_path):
    """...and leaves the first run's records as they were: Hydra's .hydra/ included, which
    Hydra itself would have overwritten before the run could look at the lock."""
    holder = _holder(tmp_path)
    first = "- seed=1\n"  # what the running first run recorded
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(first)
    try:
        out = launch(tmp_path, "seed=2", timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode != 0
    assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}" in out.stderr
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "current.pth").exists()
    assert sorted(p.name for p in (tmp_path / ".hydra").iterdir()) == ["overrides.yaml"]
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == first


@pytest.mark.slow
def test_probe_lr_1e30_keeps_the_last_good_checkpoint_finite(tmp_path):
    out = launch(tmp_path, "optimizer.lr=1e30", "trainer.max_steps=30",
                 "trainer.checkpoint_every=5", "trainer.batch_size=64")  # 64: a cheaper step
    assert out.returncode != 0 and "NonFiniteError" in out.stderr
    ckpt = load_checkpoint(tmp_path / "current.pth")  # refuses any NaN/inf tensor
    steps = ckpt["state"]["step"]
    # The last checkpoint written before the streak of skipped steps began.
    assert steps % 5 == 0 and ckpt["state"]["bad_steps"] == 0
    assert f"current.pth stays at step {steps}" in out.stdout + out.stderr  # the log


@pytest.mark.slow
def test_probe_lr_1e6_divergence_stops_naming_the_step(tmp_path):
    out = launch(tmp_path, "optimizer.lr=1e6", "trainer.max_steps=60", "trainer.batch_size=64")
    assert out.returncode != 0
    assert re.search(r"DivergenceError: training diverged at step \d+: \S+ holds NaN or inf",
                     out.stderr), out.stderr[-2000:]
    load_checkpoint(tmp_path / "current.pth")  # what was saved is finite

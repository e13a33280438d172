"""Resume is exact: k steps + stop + k more steps == 2k steps straight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pic.engine import signals
from pic.engine.checkpoint import load_checkpoint
from pic.run import run_task

from .helpers import ROOT, compose_config

SMALL = ["logger=none", "backbone.widths=[8,16]", "trainer.batch_size=128",
         "trainer.progress=false", "trainer.checkpoint_every=1000", "task.plot=false",
         "task.knn_random_init=false", "trainer.precision=fp32", "trainer.channels_last=false"]


def run(out_dir, steps: int, workers: int) -> dict:
    cfg = compose_config(*SMALL, f"output_dir={out_dir}", f"trainer.max_steps={steps}",
                         f"trainer.num_workers={workers}")
    run_task(cfg)
    return load_checkpoint(out_dir / "current.pth")


def assert_same_state(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][pid][name], value, rtol=0, atol=0)


def test_stop_and_resume_ends_with_identical_weights_and_optimizer_state(tmp_path):
    # 1,257 images / 128 per step = 9 steps per epoch: the stop is mid-epoch, the run crosses
    # an epoch boundary, and the resumed half uses loader workers (augmentations must not care).
    straight = run(tmp_path / "straight", 12, workers=0)
    run(tmp_path / "resumed", 6, workers=0)
    halfway = load_checkpoint(tmp_path / "resumed" / "current.pth")
    assert halfway["state"]["step"] == 6 and halfway["state"]["position"] == 6 * 128
    resumed = run(tmp_path / "resumed", 12, workers=2)
    assert resumed["state"]["step"] == straight["state"]["step"] == 12
    assert resumed["state"]["epoch"] == straight["state"]["epoch"] == 1
    assert_same_state(straight, resumed)
    # Guard against a vacuous pass: training did change the weights.
    fresh = run(tmp_path / "one", 1, workers=0)
    changed = [k for k, v in fresh["model"].items()
               if v.is_floating_point() and not torch.equal(v, straight["model"][k])]
    assert changed


# ---------------------------------------------------------------------- stop on a signal
# Small synthetic images, so that start-up and the final kNN evaluation take little time.
SIGNAL_RUN = [*SMALL, "data=synthetic", "data.num_images=384", "data.num_val_images=64",
              "data.resolution=16", "data.image_size=16", "data.num_classes=4",
              "trainer.batch_size=32", "trainer.log_every=1", "trainer.num_workers=2"]


def launch(out_dir: Path, steps: int) -> subprocess.Popen:
    """launch.py in its own process group (as a shell runs a command), logging every step."""
    args = [sys.executable, str(ROOT / "launch.py"), *SIGNAL_RUN, f"hydra.run.dir={out_dir}",
            f"trainer.max_steps={steps}"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until launch.log shows the progress line of ``step``."""
    log, deadline = out_dir / "launch.log", time.monotonic() + timeout
    while f"step {step}/" not in (log.read_text() if log.is_file() else ""):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.05)


def stop_and_rerun(out_dir: Path, steps: int, signum: int, whole_group: bool) -> int:
    """Stop a run by ``signum`` once it has logged step 2, check what it left, rerun it to
    the end; the step it stopped at."""
    proc = launch(out_dir, steps)
    try:
        wait_for_step(out_dir, 2, proc)
        # kill -TERM reaches the process; Ctrl-C reaches the whole group (loader workers too).
        os.killpg(proc.pid, signum) if whole_group else proc.send_signal(signum)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, output
    stopped = load_checkpoint(out_dir / "current.pth")["state"]["step"]
    assert 2 <= stopped < steps, output  # the step in progress when the signal came
    assert f"step {stopped + 1}/" not in (out_dir / "launch.log").read_text()
    assert not (out_dir / "results.json").exists()  # no evaluation of a partial run
    rerun = launch(out_dir, steps)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    assert f"at step {stopped}" in (out_dir / "launch.log").read_text()
    return stopped


@pytest.mark.slow
def test_a_signal_stops_with_a_checkpoint_and_a_rerun_resumes_exactly(tmp_path):
    steps = 24  # 12 per epoch: the resumed part crosses an epoch boundary
    signals_sent = ((signal.SIGTERM, False), (signal.SIGINT, True))
    # Both signalled runs (subprocesses, each in its own session) run beside the straight one
    # (in this process): their start-ups overlap its training.
    with ThreadPoolExecutor(len(signals_sent)) as pool:
        stopped = [pool.submit(stop_and_rerun, tmp_path / signal.Signals(signum).name, steps,
                               signum, whole_group) for signum, whole_group in signals_sent]
        run_task(compose_config(*SIGNAL_RUN, f"output_dir={tmp_path / 'straight'}",
                                f"trainer.max_steps={steps}"))
        for future in stopped:
            future.result()  # its assertions
    straight = load_checkpoint(tmp_path / "straight" / "current.pth")
    for signum, _ in signals_sent:
        assert_same_state(straight, load_checkpoint(
            tmp_path / signal.Signals(signum).name / "current.pth"))


def test_a_second_ctrl_c_exits_at_once() -> None:
    # The handler found before: a shell's background job starts with SIGINT ignored.
    before = signal.getsignal(signal.SIGINT)
    with signals.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received() == signal.SIGINT and signals.exit_code() == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signals.received() is None
    assert signal.getsignal(signal.SIGINT) is before

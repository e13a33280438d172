"""Pytest fixture: a real single-machine SLURM cluster for the whole test session.

`slurm_cluster` runs install.sh (a no-op when the packages are present) and start.sh once per
session in a private state directory (start.sh picks free ports and runs its own munged), so two
test sessions on one machine never share a daemon. It exports SLURM_CONF into this process's
environment so that submitit's sbatch, sacct and scancel reach the cluster, and runs stop.sh at
the end. Setup failures FAIL the tests (CI has apt and root); they are never skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent
# Every session's cluster lives in a fresh /tmp/pic-slurm-session.*; OWNER in it names the pytest
# process, so a later session can stop the daemons of one that was killed before its teardown.
STATE_PREFIX = "pic-slurm-session."
OWNER = "owner"


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: `env` holds the variables a process needs to reach it (SLURM_CONF)."""

    state_dir: Path
    env: dict[str, str]
    partition: str


def _run_script(name: str, *args: str, timeout_s: float) -> str:
    """Run tests/slurm/<name> and return its stdout; fail the test session on error."""
    cmd = ["bash", str(SCRIPTS / name), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{name} did not finish within {timeout_s} s:\n{err.stderr}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return proc.stdout


def _parse_exports(stdout: str) -> dict[str, str]:
    """Turn start.sh's `export NAME=VALUE` lines into a dict."""
    env = {}
    for line in stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value
    if "SLURM_CONF" not in env:
        pytest.fail(f"start.sh printed no `export SLURM_CONF=...` line:\n{stdout}", pytrace=False)
    return env


def _default_partition(env: dict[str, str]) -> str:
    """The partition sinfo marks as default (`debug*`), asked from the running cluster."""
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%P"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, **env},
    ).stdout
    defaults = [p.rstrip("*") for p in out.split() if p.endswith("*")]
    if len(defaults) != 1:
        pytest.fail(f"expected one default partition in sinfo output, got: {out!r}", pytrace=False)
    return defaults[0]


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _stop_abandoned_clusters() -> None:
    """Stop and remove the clusters of earlier sessions whose pytest process no longer runs
    (killed before teardown); a live session's cluster, or one without an owner file, is left."""
    for state in Path(tempfile.gettempdir()).glob(STATE_PREFIX + "*"):
        try:
            pid, start = (state / OWNER).read_text().split()
        except (OSError, ValueError):
            continue
        if _process_start(int(pid)) != start:
            _run_script("stop.sh", str(state), timeout_s=120)
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start a private cluster once per session (install included) and stop it afterwards."""
    _run_script("install.sh", timeout_s=900)
    _stop_abandoned_clusters()
    state = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
    (state / OWNER).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
    try:
        env = _parse_exports(_run_script("start.sh", str(state), timeout_s=180))
        cluster = SlurmCluster(state, env, _default_partition(env))
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            yield cluster
    finally:
        _run_script("stop.sh", str(state), timeout_s=120)
        shutil.rmtree(state, ignore_errors=True)


def accounting_states(job_id: str, timeout_s: float = 30) -> list[str]:
    """States of every run of the job from sacct (`--duplicates`: one row per requeue), oldest
    first, once the last one is final (accounting lags slurmctld by a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        states = out.split()
        if states and states[-1] in {"COMPLETED", "FAILED", "CANCELLED"}:
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"sacct shows no final state for job {job_id}: {states}")
        time.sleep(0.2)

"""submitit against the real single-machine SLURM cluster of tests/slurm/: multi-task ranks,
preemption with requeue through `Checkpointable`, and failures that are not requeued.

Every wait is bounded so that a broken cluster fails fast instead of hanging the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.slurm.cluster import SCRIPTS, accounting_states

pytestmark = pytest.mark.slurm

# A job unpickles its callable in a fresh interpreter where this module is not importable
# (pytest imports test files by path), so its functions and classes travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 60
# Requeue to restart takes ~6 s with the cluster's cred_expire=5 and sched_interval=1.
REQUEUE_TIMEOUT_S = 120


def make_executor(folder: Path, partition: str, **params: int) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(slurm_partition=partition, timeout_min=5, cpus_per_task=1, **params)
    return executor


def wait_done(job: submitit.Job, timeout_s: float) -> None:
    """Poll until the job is finished (result file or terminal sacct state); fail on timeout."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(
                f"job {job.job_id} not done after {timeout_s} s (state {job.state});\n"
                f"stdout: {job.stdout()}\nstderr: {job.stderr()}"
            )
        time.sleep(0.2)


def wait_for_file(path: Path, job: submitit.Job, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} did not create {path} within {timeout_s} s")
        time.sleep(0.05)


def task_identity() -> dict[str, int | str]:
    """What submitit tells a task about itself."""
    env = submitit.JobEnvironment()
    return {
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "node": env.node,
        "job_id": env.job_id,
    }


class WaitForPreemption(submitit.helpers.Checkpointable):
    """First run: marks itself running and waits to be preempted. After the requeue it returns
    how many checkpoints it went through, a count that only `checkpoint()` increments."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.checkpoints = 0

    def __call__(self) -> dict[str, int]:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        (self.folder / f"attempt-{restart}").touch()
        if self.checkpoints == 0:
            (self.folder / "running").touch()
            deadline = time.monotonic() + REQUEUE_TIMEOUT_S
            while time.monotonic() < deadline:
                time.sleep(0.2)  # the USR2 handler runs between sleeps
            raise TimeoutError("never preempted")
        return {"checkpoints": self.checkpoints, "restart_count": restart}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        self.checkpoints += 1
        (self.folder / f"checkpoint-{self.checkpoints}").touch()
        return super().checkpoint()


class AlwaysFails(submitit.helpers.Checkpointable):
    """Requeue-capable, yet a plain exception must end the job instead of requeueing it."""

    def __call__(self, folder: Path) -> None:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        (folder / f"attempt-{restart}").touch()
        raise ValueError("deliberate failure in AlwaysFails")


@pytest.mark.parametrize(("nodes", "tasks_per_node"), [(1, 2), (2, 1)])
def test_two_task_job_returns_each_rank(slurm_cluster, tmp_path, nodes, tasks_per_node):
    executor = make_executor(
        tmp_path, slurm_cluster.partition, nodes=nodes, tasks_per_node=tasks_per_node
    )
    job = executor.submit(task_identity)
    wait_done(job, JOB_TIMEOUT_S)
    results = sorted(job.results(), key=lambda r: r["global_rank"])

    assert [r["global_rank"] for r in results] == [0, 1]
    assert all(r["num_tasks"] == 2 and r["job_id"] == job.job_id for r in results)
    if nodes == 2:
        assert [(r["node"], r["local_rank"]) for r in results] == [(0, 0), (1, 0)]
    else:
        assert [(r["node"], r["local_rank"]) for r in results] == [(0, 0), (0, 1)]
    assert accounting_states(job.job_id) == ["COMPLETED"]


def test_preempted_checkpointable_is_requeued_and_finishes(slurm_cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    job = make_executor(tmp_path / "job", slurm_cluster.partition).submit(WaitForPreemption(marks))
    wait_for_file(marks / "running", job, JOB_TIMEOUT_S)

    job._interrupt()  # what preemption does: SIGTERM (ignored by submitit), then USR2
    wait_done(job, REQUEUE_TIMEOUT_S)

    assert job.result() == {"checkpoints": 1, "restart_count": 1}
    assert sorted(p.name for p in marks.iterdir()) == [
        "attempt-0",
        "attempt-1",
        "checkpoint-1",
        "running",
    ]
    assert accounting_states(job.job_id) == ["REQUEUED", "COMPLETED"]


def test_failing_job_is_not_requeued_and_raises_its_message(slurm_cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    job = make_executor(tmp_path / "job", slurm_cluster.partition).submit(AlwaysFails(), marks)
    wait_done(job, JOB_TIMEOUT_S)

    with pytest.raises(submitit.core.utils.FailedJobError, match="deliberate failure"):
        job.result()
    assert accounting_states(job.job_id) == ["FAILED"]
    assert [p.name for p in marks.iterdir()] == ["attempt-0"]


def ports(state: Path) -> dict[str, int]:
    """The ports start.sh chose for a cluster: {daemon: port}."""
    return {name: int(port) for name, port in
            (line.split() for line in (state / "ports").read_text().splitlines())}


def run_on(slurm_conf: Path, *cmd: str) -> str:
    env = {**os.environ, "SLURM_CONF": str(slurm_conf)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True,
                          env=env).stdout


def test_a_second_cluster_runs_beside_the_first_and_stops_alone(slurm_cluster):
    """Two test sessions on one machine: private state, ports and munged; stopping one leaves
    the other working."""
    first = slurm_cluster.state_dir
    # No STATE_DIR: start.sh makes a private one, as a second session's fixture does.
    started = subprocess.run(["bash", str(SCRIPTS / "start.sh")], capture_output=True,
                             text=True, timeout=180)
    exports = dict(line.removeprefix("export ").split("=", 1)
                   for line in started.stdout.splitlines() if line.startswith("export "))
    second = Path(exports.get("PIC_SLURM_STATE", "/nonexistent"))
    try:
        assert started.returncode == 0, started.stderr
        assert second != first and exports["SLURM_CONF"] == f"{second}/etc/slurm.conf"
        assert set(ports(first).values()).isdisjoint(ports(second).values())
        for state in (first, second):
            # A real job on each cluster: the whole chain (munge, slurmctld, slurmd) answers.
            out = run_on(state / "etc" / "slurm.conf", "srun", "-N2", "-n2", "--time=1",
                         "bash", "-c", "echo $SLURM_CONF:$SLURM_NODEID")
            assert sorted(out.split()) == [f"{state}/etc/slurm.conf:{n}" for n in (0, 1)]
    finally:
        if second.is_dir():
            subprocess.run(["bash", str(SCRIPTS / "stop.sh"), str(second)], timeout=120,
                           check=True)
    assert not list((second / "pids").iterdir())  # stop.sh stopped all it started
    shutil.rmtree(second)
    out = run_on(first / "etc" / "slurm.conf", "srun", "--time=1", "echo", "still-up")
    assert out.split() == ["still-up"]


def test_a_full_disk_is_named_before_any_daemon_starts(slurm_cluster, tmp_path):
    """start.sh on a filesystem with too little room says how much is free, where, and how much
    it needs, instead of failing inside MariaDB's bootstrap (whose log hides its cause)."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(small)], check=True)
    try:
        started = subprocess.run(["bash", str(SCRIPTS / "start.sh"), str(small / "state")],
                                 capture_output=True, text=True, timeout=60)
        assert started.returncode == 1
        assert f"only 40 MB free on the filesystem of {small}/state" in started.stderr
        assert "needs about 100 MB" in started.stderr
        assert not (small / "state" / "pids").exists()  # nothing was started
    finally:
        subprocess.run(["umount", str(small)], check=True)

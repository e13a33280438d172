"""`launch.py cluster=slurm` against the real single-machine SLURM cluster of tests/slurm/.

Jobs are 2-task DDP runs (gloo, one CPU per task) of PIC on the embedded digits with a narrow
ResNet, a few steps long. Every wait is bounded: a stuck job is cancelled and fails its test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.slurm.cluster import accounting_states
from tests.slurm.recording import write_conf

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240  # start-up, kNN at random init, a few steps: ~1 min on an idle 2-core machine
# Requeue to restart takes ~6 s with the cluster's cred_expire=5 and sched_interval=1, but the
# requeued job may wait for CPUs held by a job beside it, then starts, evaluates and trains
# again: a deadline (waiting stops as soon as the result is there), not a sleep.
REQUEUE_TIMEOUT_S = 360
# The task's defaults stay on (kNN at random init, the summary plot, progress lines): a default
# that crashes a multi-process run must crash these tests.
TRAIN = ["backbone.widths=[8,16,32]", "trainer.batch_size=64", "trainer.num_workers=0",
         "eval.k=5", "logger=none"]


def launch_command(partition: str, *overrides: str, multirun: bool = False) -> dict:
    """``subprocess`` arguments of ``python launch.py cluster=slurm ...`` on the test cluster
    (2 CPU-only tasks)."""
    cmd = [sys.executable, "launch.py", *(["-m"] if multirun else []), "cluster=slurm",
           f"cluster.partition={partition}", "cluster.gpus_per_node=0", "cluster.cpus_per_task=1",
           "cluster.nproc_per_node=2", "cluster.timeout_min=10", *TRAIN, *overrides]
    return {"args": cmd, "cwd": ROOT, "text": True, "env": {**os.environ, "OMP_NUM_THREADS": "1"}}


def launch(partition: str, *overrides: str, multirun: bool = False,
           timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(**launch_command(partition, *overrides, multirun=multirun),
                          capture_output=True, timeout=timeout_s)


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def cancel_and_fail(job_id: str, record: dict, why: str) -> None:
    subprocess.run(["scancel", job_id], timeout=30, check=False)
    logs = {k: Path(record[k]).read_text() if Path(record[k]).is_file() else "(none)"
            for k in ("stdout", "stderr")}
    pytest.fail(f"job {job_id}: {why}\nstdout:\n{logs['stdout']}\nstderr:\n{logs['stderr']}")


def wait_for(predicate, record: dict, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            cancel_and_fail(record["job_id"], record, f"no {what} after {timeout_s} s")
        time.sleep(0.1)


def steps_done(run_dir: Path, attempt: int = 0) -> int:
    """Steps rank 0 has finished in this attempt (tests/slurm/recording.py), -1 before any."""
    try:
        return int((run_dir / "ranks" / f"attempt-{attempt}-rank-0.steps").read_text())
    except (FileNotFoundError, ValueError):
        return -1


def rank_records(run_dir: Path, attempt: int) -> list[dict]:
    """What tests/slurm/recording.py saw in each rank of one attempt, rank order."""
    paths = sorted((run_dir / "ranks").glob(f"attempt-{attempt}-rank-*.json"))
    return [json.loads(p.read_text()) for p in paths]


def test_two_node_job_is_one_group_and_requeues_to_uninterrupted_weights(slurm_cluster,
                                                                           tmp_path):
    """2 nodes × 1 task, preempted (USR2: submitit's pre-timeout signal) and requeued, against
    1 node × 2 tasks left alone: the same two ranks, hence the same weights. No periodic
    checkpoint after step 0: the job must checkpoint the step it was signalled at."""
    conf = tmp_path / "conf"
    write_conf(conf)
    common = [f"hydra.searchpath=[file://{conf}]", "task=recording", "trainer.max_steps=12",
              "trainer.checkpoint_every=1000", "logger=wandb"]
    ref_dir, pre_dir = tmp_path / "reference", tmp_path / "two_nodes"
    # Both jobs run side by side: the reference followed to its end (wait=true streams rank 0's
    # log here), the 2-node one returning once queued.
    follow = subprocess.Popen(**launch_command(slurm_cluster.partition, f"hydra.run.dir={ref_dir}",
                                               "cluster.wait=true", *common),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = launch(slurm_cluster.partition, f"hydra.run.dir={pre_dir}", *common,
                  "cluster.nodes=2", "cluster.nproc_per_node=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (pre,) = manifest(pre_dir)

    wait_for(lambda: steps_done(pre_dir) >= 2, pre, JOB_TIMEOUT_S, "training steps")
    run_id = torch.load(pre_dir / "current.pth", weights_only=False)["state"]["run_id"]
    subprocess.run(["scancel", "--signal=USR2", pre["job_id"]], timeout=30, check=True)

    wait_for((pre_dir / "results.json").is_file, pre, REQUEUE_TIMEOUT_S, "results.json")
    assert accounting_states(pre["job_id"]) == ["REQUEUED", "COMPLETED"], (
        "the job was not preempted while training (it finished first?)")
    try:
        out, err = follow.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        follow.kill()
        pytest.fail("launch.py cluster.wait=true did not return")
    assert follow.returncode == 0, out + err
    (ref,) = manifest(ref_dir)
    assert f"submitted SLURM job {ref['job_id']}" in out and f"log: {ref['stdout']}" in out
    # The task's summary table, streamed from the job's log.
    assert "top-1 (%)" in out and f"artifacts  {ref_dir}" in out
    assert accounting_states(ref["job_id"]) == ["COMPLETED"]
    reference_results = json.loads((ref_dir / "results.json").read_text())
    assert reference_results["world_size"] == 2 and reference_results["completed"]
    # The task's defaults ran in the DDP job: kNN at random init and the summary plot.
    assert "knn_top1_random_init" in reference_results and (ref_dir / "summary.png").is_file()

    for attempt in (0, 1):
        ranks = rank_records(pre_dir, attempt)
        # One process group over both nodes: ranks 0 and 1, one per node, one rendezvous on the
        # first node (its name resolves), the SLURM job's.
        assert [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["SLURM_NODEID"])
                for r in ranks] == [("0", "2", "0", "0"), ("1", "2", "0", "1")]
        assert len({r["SLURMD_NODENAME"] for r in ranks}) == 2
        assert {r["MASTER_ADDR"] for r in ranks} == {ranks[0]["SLURMD_NODENAME"]}
        assert len({r["MASTER_PORT"] for r in ranks}) == 1
        assert {r["SLURM_JOB_ID"] for r in ranks} == {pre["job_id"]}
        # Each step: half the global batch per rank, disjoint halves; both ranks stop together.
        assert len(ranks[0]["steps"]) > 0
        for mine, theirs in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
            assert len(mine) == len(theirs) == 32 and not set(mine) & set(theirs)
        # The checkpoint is written by rank 0 alone.
        assert ranks[0]["saves"] > 0 and ranks[1]["saves"] == 0
    # The requeued attempt resumed at the very step the first one was signalled at: together
    # they ran each of the 12 steps once.
    first, second = (rank_records(pre_dir, a)[0]["steps"] for a in (0, 1))
    results = json.loads((pre_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 12
    assert len(first) >= 2 and results["steps_this_attempt"] == len(second) == 12 - len(first)
    assert run_id is not None and results["run_id"] == run_id  # the same W&B run
    final = torch.load(pre_dir / "current.pth", weights_only=False)["model"]
    reference = torch.load(ref_dir / "current.pth", weights_only=False)["model"]
    assert final.keys() == reference.keys()
    for name, weight in reference.items():
        assert torch.equal(final[name], weight), name


def array_runs(array_id: str) -> list[tuple[str, str]]:
    """(start, end) of every run of a job array's tasks, requeued ones too, from accounting
    (ISO times: they sort as text), in order."""
    out = subprocess.run(["sacct", "-j", array_id, "-X", "-D", "-n", "-P", "-o", "Start,End"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return sorted(tuple(line.split("|")) for line in out.splitlines())


def test_sweep_is_one_job_array_whose_tasks_requeue_on_their_own(slurm_cluster, tmp_path):
    """A 2-point sweep, one point requeued by `scontrol requeue` (SIGTERM to the job, which
    submitit alone ignores): it resumes from the step it was stopped at, not from step 0."""
    conf = tmp_path / "conf"
    write_conf(conf)
    proc = launch(slurm_cluster.partition, "model.temperature=0.1,0.2", "trainer.max_steps=8",
                  "trainer.checkpoint_every=1000", "cluster.nproc_per_node=1",
                  f"hydra.searchpath=[file://{conf}]", "task=recording",
                  "cluster.array_parallelism=1", f"hydra.sweep.dir={tmp_path}",
                  # The default subdir (every override) would pass the 255-byte name limit here.
                  "hydra.sweep.subdir=${hydra.job.num}", multirun=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = manifest(tmp_path)
    # One sbatch: the points are the tasks 0 and 1 of one array.
    array_id = records[0]["job_id"].split("_")[0]
    assert [r["job_id"] for r in records] == [f"{array_id}_0", f"{array_id}_1"]
    assert ["model.temperature=0.1" in records[0]["overrides"],
            "model.temperature=0.2" in records[1]["overrides"]] == [True, True]
    # Requeue the first point alone, once it is training.
    first, second = (Path(r["run_dir"]) for r in records)
    wait_for(lambda: steps_done(first) >= 2, records[0], JOB_TIMEOUT_S, "training steps")
    subprocess.run(["scontrol", "requeue", records[0]["job_id"]], timeout=30, check=True)
    for record in records:
        path = Path(record["run_dir"]) / "results.json"
        wait_for(path.is_file, record, JOB_TIMEOUT_S + REQUEUE_TIMEOUT_S, "results.json")
    assert accounting_states(records[0]["job_id"]) == ["REQUEUED", "COMPLETED"]
    assert accounting_states(records[1]["job_id"]) == ["COMPLETED"]
    resumed, untouched = (json.loads((d / "results.json").read_text()) for d in (first, second))
    stopped_at = len(rank_records(first, 0)[0]["steps"])
    assert stopped_at >= 2 and resumed["steps"] == 8
    assert resumed["steps_this_attempt"] == 8 - stopped_at
    assert untouched["steps"] == untouched["steps_this_attempt"] == 8
    # Each task ran its own point (the config the task saved in its run directory)...
    assert [OmegaConf.load(d / "config.yaml").model.temperature for d in (first, second)] == [
        0.1, 0.2]
    # ...and wrote Hydra's record of its own overrides there (pic.run.hydra_record, carried
    # into the job with the task).
    assert ["model.temperature=0.1" in (first / ".hydra" / "overrides.yaml").read_text(),
            "model.temperature=0.2" in (second / ".hydra" / "overrides.yaml").read_text()] == [
        True, True]
    # ...and array_parallelism=1 let one task run at a time: no two runs overlap.
    runs = array_runs(array_id)
    assert len(runs) == 3  # the preempted task twice
    assert all(end <= start for (_, end), (start, _) in zip(runs, runs[1:], strict=False))


def test_failing_job_is_not_requeued_and_says_why(slurm_cluster, tmp_path):
    proc = launch(slurm_cluster.partition, f"hydra.run.dir={tmp_path}", "trainer.precision=fp8",
                  "cluster.wait=true", timeout_s=JOB_TIMEOUT_S)
    assert proc.returncode != 0
    assert "trainer.precision='fp8'" in proc.stderr  # the job's error, raised by launch.py
    (record,) = manifest(tmp_path)
    assert accounting_states(record["job_id"]) == ["FAILED"]
    log = Path(record["stderr"]).read_text()
    assert "job failed and is not requeued: InstantiationException" in log
    assert "trainer.precision='fp8'" in log

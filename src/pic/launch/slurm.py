"""``cluster=slurm``: submitit jobs, requeued on preemption and at the time limit."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from ..config import config_dict
from ..dist.init import init_distributed
from ..engine import signals
from . import Run, configure_logging

log = logging.getLogger(__name__)


class SlurmJob(submitit.helpers.Checkpointable):
    """What every SLURM task runs; checkpointable, so a preempted or timed-out job requeues.

    While the task runs, SIGUSR2 (submitit's pre-timeout and preemption signal), SIGTERM (what
    ``scontrol requeue``, ``scancel`` and preemption with a grace time send) and SIGINT are stop
    requests (:mod:`pic.engine.signals`): every rank finishes the step, ``current.pth`` is
    written at that step and the task returns. Then, after SIGUSR2, submitit's own handler
    calls :meth:`checkpoint` (rank 0), resubmits this same object and requeues the job; after
    SIGTERM, SLURM itself requeues (``scontrol requeue``) or ends the job. Either way the
    requeued job resumes from the signalled step.
    """

    def __init__(self, cfg: dict[str, Any], run: Run, max_requeue: int) -> None:
        self.cfg, self.run, self.max_requeue = cfg, run, max_requeue

    def __call__(self) -> Any:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        configure_logging(rank)
        init_distributed()
        try:
            with signals.stop_on_signals():
                result = self.run(OmegaConf.create(self.cfg))
                signum = signals.received()
        except Exception as err:
            # Only preemption and time-outs requeue (through checkpoint()); this ends the job.
            log.error("job failed and is not requeued: %s: %s", type(err).__name__, err)
            raise
        if not (isinstance(result, dict) and result.get("stopped_by")):
            return result  # finished (a signal after the training changes nothing)
        if signum == submitit.JobEnvironment._usr_sig():
            # submitit's handler is back: on rank 0 it calls checkpoint(), requeues and exits.
            signal.raise_signal(signum)
        # No result file: to submitit the job is unfinished (requeued, or cancelled).
        log.warning("stopped by %s with current.pth at the step it finished; a requeued job "
                    "resumes there", signal.Signals(signum).name if signum else "another rank")
        raise SystemExit(128 + signum if signum else 1)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeue:
            log.error("interrupted after %d requeues (cluster.max_requeue=%d): not requeued",
                      restarts, self.max_requeue)
            return None
        log.warning("preempted or at the time limit: requeueing (restart %d of at most %d); the "
                    "run resumes from its current.pth", restarts + 1, self.max_requeue)
        return super().checkpoint()


class Slurm:
    """Submit the run to SLURM through submitit: ``nodes`` × ``nproc_per_node`` DDP tasks.

    Each task gets ``cpus_per_task`` CPUs and the node ``gpus_per_node`` GPUs (default: one per
    task; 0 on CPU-only partitions). ``additional_parameters`` passes any other sbatch option
    (``{exclusive: true, mail-type: END}``). Without ``wait`` the command returns once the job
    is queued; the job id, run directory and log paths are appended to ``manifest.jsonl`` in
    the sweep directory (multirun) or the run directory. A sweep (``-m``) is submitted as one
    job array when it ends (:func:`submit_queued`), at most ``array_parallelism`` of its points
    running at once; each point is one array task, requeued and resumed on its own.
    """

    def __init__(self, nodes: int = 1, nproc_per_node: int = 1, gpus_per_node: int | None = None,
                 partition: str | None = None, timeout_min: int = 1440, cpus_per_task: int = 8,
                 mem_gb: int | None = None, account: str | None = None, qos: str | None = None,
                 constraint: str | None = None, max_requeue: int = 10,
                 additional_parameters: dict[str, Any] | None = None, wait: bool = False,
                 array_parallelism: int = 256) -> None:
        for key, value in (("nodes", nodes), ("nproc_per_node", nproc_per_node),
                           ("timeout_min", timeout_min), ("cpus_per_task", cpus_per_task),
                           ("array_parallelism", array_parallelism)):
            if value < 1:
                raise ValueError(f"cluster.{key}={value}: need at least 1")
        self.nodes, self.nproc_per_node = nodes, nproc_per_node
        self.gpus_per_node = nproc_per_node if gpus_per_node is None else gpus_per_node
        self.partition, self.timeout_min, self.cpus_per_task = partition, timeout_min, cpus_per_task
        self.mem_gb, self.account, self.qos, self.constraint = mem_gb, account, qos, constraint
        self.max_requeue = max_requeue
        self.additional_parameters = dict(additional_parameters or {})
        self.wait, self.array_parallelism = wait, array_parallelism

    def sbatch_parameters(self, job_name: str) -> dict[str, Any]:
        """``SlurmExecutor.update_parameters`` keywords (unset options left to the cluster)."""
        params: dict[str, Any] = {
            "job_name": job_name, "nodes": self.nodes, "ntasks_per_node": self.nproc_per_node,
            "cpus_per_task": self.cpus_per_task, "time": self.timeout_min,
            "partition": self.partition, "account": self.account, "qos": self.qos,
            "constraint": self.constraint,
            "mem": None if self.mem_gb is None else f"{self.mem_gb}GB",
            "gpus_per_node": self.gpus_per_node or None,
            "additional_parameters": self.additional_parameters or None,
        }
        return {k: v for k, v in params.items() if v is not None}

    def launch(self, cfg: DictConfig, run: Run) -> Any:
        """Submit (in a sweep: queue for the sweep's array); returns the manifest record, or
        rank 0's result when ``wait``."""
        run_dir = Path(cfg.get("output_dir") or Path.cwd()).absolute()
        manifest_dir, overrides, sweep = _hydra_context(run_dir)
        point = _Point(self, config_dict(cfg), run, run_dir, manifest_dir, overrides,
                       str(cfg.get("name", "pic")))
        if sweep:
            _QUEUED.append(point)
            return {"run_dir": str(run_dir), "overrides": overrides}
        (job,) = _submit([point], run_dir / "slurm")
        record = _record(job, point)
        return _follow(job) if self.wait else record


@dataclasses.dataclass
class _Point:
    """One run to submit: its launcher (the allocation), resolved config and where it goes."""

    launcher: Slurm
    cfg: dict[str, Any]
    run: Run
    run_dir: Path
    manifest_dir: Path
    overrides: list[str]
    name: str


# Sweep points queued by Slurm.launch while Hydra runs the sweep's jobs, for submit_queued.
_QUEUED: list[_Point] = []


def submit_queued() -> list[dict[str, Any]]:
    """Submit the queued sweep points: one job array per distinct allocation (usually one).

    Called once the sweep's every point is composed (launch.py, after Hydra returns), so that a
    sweep costs one ``sbatch``. Returns the manifest records; with ``wait``, follows each job to
    its end and raises the first failure.
    """
    groups: dict[str, list[_Point]] = {}
    for point in _QUEUED:
        key = json.dumps([point.launcher.sbatch_parameters(""), point.launcher.max_requeue,
                          point.launcher.array_parallelism, str(point.manifest_dir)], default=str)
        groups.setdefault(key, []).append(point)
    _QUEUED.clear()
    submitted = [(job, point) for points in groups.values()
                 for job, point in zip(_submit(points, points[0].manifest_dir / "slurm"), points,
                                       strict=True)]
    records = [_record(job, point) for job, point in submitted]
    for job, point in submitted:
        if point.launcher.wait:
            _follow(job)
    return records


def _submit(points: list[_Point], folder: Path) -> list[submitit.Job]:
    """Submit ``points`` (one allocation) with one sbatch: a job, or an array of them."""
    launcher = points[0].launcher
    names = {p.name for p in points}
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher.max_requeue)
    executor.update_parameters(**launcher.sbatch_parameters(names.pop() if len(names) == 1
                                                            else "sweep"),
                               array_parallelism=launcher.array_parallelism)
    with executor.batch():
        jobs = [executor.submit(SlurmJob(p.cfg, p.run, launcher.max_requeue)) for p in points]
    return jobs


def _record(job: submitit.Job, point: _Point) -> dict[str, Any]:
    """Append the job to the manifest, say where its logs are; the manifest record."""
    record = {"job_id": job.job_id, "run_dir": str(point.run_dir), "overrides": point.overrides,
              "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    with open(point.manifest_dir / "manifest.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"submitted SLURM job {job.job_id}: {point.run_dir}\n  log: {job.paths.stdout}\n"
          f"  err: {job.paths.stderr}", flush=True)
    return record


def _hydra_context(run_dir: Path) -> tuple[Path, list[str], bool]:
    """(where the manifest goes, this run's command-line overrides, whether in a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return run_dir, [], False
    hydra = HydraConfig.get()
    sweep = hydra.mode == RunMode.MULTIRUN
    folder = Path(hydra.sweep.dir).absolute() if sweep else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder, list(hydra.overrides.task), sweep


def _follow(job: submitit.Job, poll_s: float = 2.0) -> Any:
    """Stream rank 0's log to stdout until the job ends; its result, or its error, raised."""
    printed = 0
    while True:
        done = job.done()
        path = Path(job.paths.stdout)
        if path.is_file():
            text = path.read_text(errors="replace")
            # A requeued job starts a fresh log.
            printed = 0 if len(text) < printed else printed
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        if done:
            return job.results()[0]  # rank 0's
        time.sleep(poll_s)

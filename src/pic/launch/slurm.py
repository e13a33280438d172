"""``cluster=slurm``: submitit jobs, requeued on preemption and at the time limit."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from ..config import config_dict
from ..dist.init import init_distributed
from . import Run, configure_logging

log = logging.getLogger(__name__)


class SlurmJob(submitit.helpers.Checkpointable):
    """What every SLURM task runs; checkpointable, so a preempted or timed-out job requeues.

    submitit calls :meth:`checkpoint` on its USR2 signal (rank 0 only), resubmits this same
    object and exits; the requeued job resumes from ``current.pth`` in its run directory (the
    trainer saves every ``trainer.checkpoint_every`` steps; work since then is redone, exactly).
    """

    def __init__(self, cfg: dict[str, Any], run: Run, max_requeue: int) -> None:
        self.cfg, self.run, self.max_requeue = cfg, run, max_requeue

    def __call__(self) -> Any:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        configure_logging(rank)
        init_distributed()
        try:
            return self.run(OmegaConf.create(self.cfg))
        except Exception as err:
            # Only preemption and time-outs requeue (through checkpoint()); this ends the job.
            log.error("job failed and is not requeued: %s: %s", type(err).__name__, err)
            raise

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeue:
            log.error("interrupted after %d requeues (cluster.max_requeue=%d): not requeued",
                      restarts, self.max_requeue)
            return None
        log.warning("preempted or at the time limit: requeueing (restart %d of at most %d); the "
                    "run resumes from its last current.pth", restarts + 1, self.max_requeue)
        return super().checkpoint()


class Slurm:
    """Submit the run to SLURM through submitit: ``nodes`` × ``nproc_per_node`` DDP tasks.

    Each task gets ``cpus_per_task`` CPUs and the node ``gpus_per_node`` GPUs (default: one per
    task; 0 on CPU-only partitions). ``additional_parameters`` passes any other sbatch option
    (``{exclusive: true, mail-type: END}``). Without ``wait`` the command returns once the job
    is queued; the job id, run directory and log paths are appended to ``manifest.jsonl`` in
    the sweep directory (multirun) or the run directory.
    """

    def __init__(self, nodes: int = 1, nproc_per_node: int = 1, gpus_per_node: int | None = None,
                 partition: str | None = None, timeout_min: int = 1440, cpus_per_task: int = 8,
                 mem_gb: int | None = None, account: str | None = None, qos: str | None = None,
                 constraint: str | None = None, max_requeue: int = 10,
                 additional_parameters: dict[str, Any] | None = None, wait: bool = False) -> None:
        for key, value in (("nodes", nodes), ("nproc_per_node", nproc_per_node),
                           ("timeout_min", timeout_min), ("cpus_per_task", cpus_per_task)):
            if value < 1:
                raise ValueError(f"cluster.{key}={value}: need at least 1")
        self.nodes, self.nproc_per_node = nodes, nproc_per_node
        self.gpus_per_node = nproc_per_node if gpus_per_node is None else gpus_per_node
        self.partition, self.timeout_min, self.cpus_per_task = partition, timeout_min, cpus_per_task
        self.mem_gb, self.account, self.qos, self.constraint = mem_gb, account, qos, constraint
        self.max_requeue = max_requeue
        self.additional_parameters = dict(additional_parameters or {})
        self.wait = wait

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
        """Submit; returns the manifest record, or rank 0's result when ``wait``."""
        run_dir = Path(cfg.get("output_dir") or Path.cwd()).absolute()
        executor = submitit.SlurmExecutor(folder=run_dir / "slurm",
                                          max_num_timeout=self.max_requeue)
        executor.update_parameters(**self.sbatch_parameters(str(cfg.get("name", "pic"))))
        job = executor.submit(SlurmJob(config_dict(cfg), run, self.max_requeue))
        manifest_dir, overrides = _hydra_context(run_dir)
        record = {"job_id": job.job_id, "run_dir": str(run_dir), "overrides": overrides,
                  "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        with open(manifest_dir / "manifest.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"submitted SLURM job {job.job_id}: {run_dir}\n  log: {job.paths.stdout}\n"
              f"  err: {job.paths.stderr}", flush=True)
        if not self.wait:
            return record
        return _follow(job)


def _hydra_context(run_dir: Path) -> tuple[Path, list[str]]:
    """(where the manifest goes, this run's command-line overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return run_dir, []
    hydra = HydraConfig.get()
    folder = Path(hydra.sweep.dir).absolute() if hydra.mode == RunMode.MULTIRUN else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder, list(hydra.overrides.task)


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

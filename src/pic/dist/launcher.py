"""Where a run executes: the ``cluster`` group.

A launcher receives the composed config and ``run`` (``pic.run.run_task``) and makes every
process of the job call :func:`pic.dist.init.init_distributed` and then ``run(cfg)``. The config
travels resolved: spawned processes and SLURM jobs have no Hydra context to resolve
``${hydra:...}`` in.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from ..config import config_dict
from .init import init_distributed

log = logging.getLogger(__name__)

Run = Callable[[DictConfig], Any]


def _configure_logging(rank: int) -> None:
    """Console logging for a process Hydra did not start; ranks > 0 report only warnings."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(local_rank: int, nproc: int, port: int, cfg: dict[str, Any], run: Run,
                  results: Any) -> None:
    """One spawned process of :class:`Local`: rank ``local_rank`` of ``nproc``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc))
    _configure_logging(local_rank)
    init_distributed()
    try:
        result = run(OmegaConf.create(cfg))
    finally:
        torch.distributed.destroy_process_group()
    if local_rank == 0:
        results.put(result)


class Local:
    """Run on this machine: one process in place, or ``nproc_per_node`` DDP processes.

    ``nproc_per_node`` defaults to the number of GPUs (1 on a CPU-only machine). Started by
    ``torchrun`` (``RANK`` is set), the processes already exist: each runs in place.
    """

    def __init__(self, nproc_per_node: int | None = None) -> None:
        if nproc_per_node is not None and nproc_per_node < 1:
            raise ValueError(f"cluster.nproc_per_node={nproc_per_node}: need at least 1")
        self.nproc_per_node = nproc_per_node

    def launch(self, cfg: DictConfig, run: Run) -> Any:
        """Run ``run(cfg)`` in every process; returns rank 0's result."""
        nproc = self.nproc_per_node or max(torch.cuda.device_count(), 1)
        if nproc == 1 or "RANK" in os.environ:
            init_distributed()
            return run(cfg)
        if torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise ValueError(f"cluster.nproc_per_node={nproc} but this machine has "
                             f"{torch.cuda.device_count()} GPUs (one process per GPU)")
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        procs = mp.start_processes(_local_worker, nprocs=nproc, join=False, start_method="spawn",
                                   args=(nproc, _free_port(), config_dict(cfg), run, results))
        result = None
        # Read while waiting: a result larger than a pipe's buffer would block its writer.
        while not procs.join(timeout=0.5):
            if not results.empty():
                result = results.get()
        if result is None and not results.empty():
            result = results.get()
        return result


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
        _configure_logging(rank)
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

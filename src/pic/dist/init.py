"""Join the process group of whatever started this process: one function for every launcher."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

# What torch's env:// initialisation reads; `Local` and torchrun set them, submitit's
# TorchDistributedEnvironment exports them from SLURM's variables.
_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def local_device() -> torch.device:
    """This process's device: the GPU of its local rank (``LOCAL_RANK``), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} has no GPU: this node has "
                           f"{torch.cuda.device_count()}; start at most that many processes "
                           "per node (cluster.nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed() -> torch.device:
    """Initialise ``torch.distributed`` for this process and return its device.

    Works under :class:`pic.launch.local.Local` (spawned processes) and ``torchrun`` (both set
    ``RANK``/``WORLD_SIZE``/...), under a submitit SLURM job (the variables come from
    ``submitit.helpers.TorchDistributedEnvironment``) and otherwise falls back to one process
    without a process group. The backend is NCCL with GPUs (each local rank pinned to its own
    GPU) and gloo on CPU. Calling it again in an initialised process changes nothing.
    """
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit

        # Not CUDA_VISIBLE_DEVICES: every launcher pins the GPU the same way, below.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not tdist.is_initialized():
        missing = [name for name in _ENV if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start "
                               "the processes with launch.py, torchrun or submitit")
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, init_method="env://",
                                device_id=device if device.type == "cuda" else None)
        log.info("rank %d of %d (%s, %s)", tdist.get_rank(), world_size, backend, device)
    return device

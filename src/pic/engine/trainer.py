"""The one training loop. It knows nothing of methods: a method is a module returning a loss."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import dist
from ..data.base import RunSampler, SeededItems
from .checkpoint import FORMAT, atomic_save, load_checkpoint

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # sampler epoch (a window, with the sliding-window sampler)
    position: int = 0  # samples of this rank's current epoch already consumed
    bad_steps: int = 0  # steps skipped because the loss or a gradient was not finite
    replaced_images: int = 0  # unreadable images replaced by others
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at log points
    run_id: str | None = None  # the W&B run that continues on resume
    train_time: float = 0.0  # seconds spent in the loop, over all attempts


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """Runs any method over a dataset with a sampler, an optimizer and a per-step lr schedule.

    ``batch_size`` is global (all processes together). ``epochs`` counts passes over the N
    training images; a sampler whose epoch covers a fraction of them (sliding window) gets
    proportionally more sampler-epochs. ``max_steps`` stops early without changing the
    schedule. Rerunning in the same directory resumes from ``current.pth``.

    Speed options. The constructor's defaults are the reference computation (fp32, default
    layout); the platform's config (``conf/config.yaml``, ``trainer:``) turns on the options
    that help on CPUs and GPUs alike (bf16, channels_last, cudnn_benchmark). All of them keep
    resume exact (``cudnn_benchmark`` aside, see below).

    - ``precision``: ``bf16`` runs forward and backward under bf16 autocast; losses
      are computed in fp32 by the methods. About 2× faster on a CPU with AVX512-BF16/AMX and
      on GPUs from Ampere on; on hardware without bf16 units use ``fp32``. ``fp16`` adds
      dynamic loss scaling (GradScaler) for GPUs without bf16; ``fp32`` is the reference.
    - ``channels_last``: the model's 4-d weights and every input batch use the NHWC layout,
      which the CPU (oneDNN) and GPU (cuDNN tensor-core) convolutions run natively, saving a
      layout conversion around every convolution.
    - ``compile``: ``torch.compile`` of the backbone in place (``nn.Module.compile``: the
      state_dict and checkpoints keep their keys). Pays a compilation of tens of seconds to
      minutes at the first step and after a new input shape; worth it for long GPU runs, so
      off by default.
    - ``cudnn_benchmark``: on CUDA, let cuDNN time its convolution algorithms for each new
      input shape and keep the fastest (the shapes of a run are fixed). The choice can differ
      between processes, so set it false when a resumed GPU run must match bit for bit.
    - Data: one DataLoader iterator serves the whole run (its sampler spans every epoch), so
      the ``num_workers`` loader processes start once per run and keep ``prefetch_factor`` (4)
      batches each in flight; on CUDA batches are pinned and copied with ``non_blocking``.
    """

    def __init__(self, epochs: float = 100.0, batch_size: int = 256, max_steps: int | None = None,
                 checkpoint_every: int = 1000, log_every: int = 20, precision: str = "fp32",
                 num_workers: int = 2, device: str = "auto", channels_last: bool = False,
                 compile: bool = False, cudnn_benchmark: bool = True, max_bad_steps: int = 20,
                 progress: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r}: expected one of {list(PRECISIONS)}")
        self.epochs, self.batch_size, self.max_steps = epochs, batch_size, max_steps
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.precision, self.num_workers = precision, num_workers
        self.device = resolve_device(device)
        self.channels_last, self.compile = channels_last, compile
        self.cudnn_benchmark, self.progress = cudnn_benchmark, progress
        self.max_bad_steps = max_bad_steps
        self.stop_requested = False  # set (e.g. by a preemption signal) to checkpoint and return
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    # ------------------------------------------------------------------ set-up
    def per_rank_batch(self) -> int:
        world = dist.get_world_size()
        if self.batch_size % world:
            raise ValueError(f"trainer.batch_size={self.batch_size} is global and must divide "
                             f"evenly over {world} processes")
        return self.batch_size // world

    def plan(self, sampler: Any) -> tuple[int, int, float]:
        """(sampler-epochs, steps per sampler-epoch, steps per pass over the data)."""
        per_rank = self.per_rank_batch()
        steps_per_epoch = len(sampler) // per_rank
        if steps_per_epoch == 0:
            raise ValueError(f"trainer.batch_size={self.batch_size} is larger than one epoch of "
                             f"the sampler ({len(sampler)} samples per process)")
        num_epochs = math.ceil(self.epochs / sampler.passes_per_epoch - 1e-9)
        return num_epochs, steps_per_epoch, steps_per_epoch / sampler.passes_per_epoch

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply the speed options to ``model`` (on ``self.device``) in place and return it:
        channels_last weights, a compiled backbone (``model.backbone``), cudnn.benchmark.

        Parameters keep their identity, so an optimizer built before stays valid.
        """
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.backbone.compile()
        return model

    # ------------------------------------------------------------------ the loop
    def train_step(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                   batch: dict[str, Any], lr: float
                   ) -> tuple[bool, torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step, exactly as :meth:`fit` runs it for every batch.

        ``batch``: ``crops`` (list of B×3×H×W tensors) and ``index`` (B), on any device;
        ``net``: ``model`` or its DDP wrapper. Returns (whether the step was applied, the
        gradient norm as a 0-d tensor on the device, the method's metrics, detached 0-d).

        A step whose loss or gradient is not finite changes nothing: no optimizer step and no
        ``after_step``. Deciding that costs the step's one host sync (``bool`` of a device
        flag); the optimizer step and ``after_step`` (which may update host-side state such
        as a sampled classifier's counters) cannot be issued before it is known.
        """
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        crops = [c.to(self.device, non_blocking=True, memory_format=layout)
                 for c in batch["crops"]]
        index = batch["index"].to(self.device, non_blocking=True)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            loss, metrics = net(crops, index)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None], foreach=True)
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
        if finite:
            self.scaler.step(optimizer)
            model.after_step(lr)
        self.scaler.update()
        return finite, grad_norm, {k: v.detach() for k, v in metrics.items()}

    def fit(self, model: nn.Module, dataset: torch.utils.data.Dataset, sampler: Any,
            optimizer: torch.optim.Optimizer, schedule: Callable[..., Callable[[int], float]],
            out_dir: Path, logger: Any, seed: int, resume: bool = True,
            epoch_end: Callable[[int, float], dict[str, float]] | None = None) -> dict[str, Any]:
        """Train ``model`` (already on ``self.device``) and return the run's summary.

        ``schedule(base_lr, total_steps, steps_per_epoch)`` gives the per-step lr; the base lr
        is the optimizer's (already scaled to the global batch). ``epoch_end(epoch, passes)``
        runs after every sampler-epoch and may return metrics to log.
        """
        out_dir = Path(out_dir)
        num_epochs, steps_per_epoch, steps_per_pass = self.plan(sampler)
        total_steps = num_epochs * steps_per_epoch
        lr_at = schedule(optimizer.defaults["lr"], total_steps, steps_per_pass)
        last_step = total_steps if self.max_steps is None else min(total_steps, self.max_steps)
        per_rank = self.per_rank_batch()

        self.prepare(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        state = TrainState()
        ckpt_path = out_dir / "current.pth"
        saved_step = None  # the step current.pth holds, so that no state is written twice
        if resume and ckpt_path.is_file():
            state = self._restore(ckpt_path, model, optimizer)
            saved_step = state.step
            log.info("resumed from %s at step %d", ckpt_path, state.step)
        else:
            self._seed(seed)

        net = model
        if dist.is_dist():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (banks, queues) are kept identical by the methods themselves; broadcasting
            # them from rank 0 every step would cost an N×D copy.
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                      broadcast_buffers=False)
        if dist.is_main():
            logger.start(out_dir, getattr(self, "config", {}), run_id=state.run_id)
            state.run_id = logger.run_id
        if saved_step is None:
            # A checkpoint before the first step: a job preempted early keeps its W&B run id.
            self._save(ckpt_path, model, optimizer, state)
            saved_step = state.step

        # One iterator for the whole run (RunSampler spans every epoch): workers start once.
        loader = torch.utils.data.DataLoader(
            SeededItems(dataset, seed, dist.get_rank(), dist.get_world_size()),
            sampler=RunSampler(sampler, per_rank, state.epoch, state.position, num_epochs),
            batch_size=per_rank, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None)
        bar = None
        if self.progress and dist.is_main():
            from tqdm import tqdm

            bar = tqdm(total=last_step, initial=state.step, unit="step", dynamic_ncols=True)
        model.train()
        # Metrics stay on the device between log points: summing them costs no host sync.
        metrics_sum: dict[str, torch.Tensor] = {}
        metrics_count, consecutive_bad, images = 0, 0, 0
        window_start = time.perf_counter()
        start_time, start_step = time.perf_counter(), state.step
        lr = lr_at(state.step)

        for batch in loader if state.step < last_step else []:
            lr = lr_at(state.step)
            finite, grad_norm, metrics = self.train_step(net, model, optimizer, batch, lr)
            if finite:
                consecutive_bad = 0
            else:
                state.bad_steps += 1
                consecutive_bad += 1
                log.warning("step %d: non-finite loss or gradient, step skipped", state.step)
                if consecutive_bad > self.max_bad_steps:
                    raise NonFiniteError(
                        f"{consecutive_bad} consecutive steps up to step {state.step} had a "
                        f"non-finite loss or gradient (lr {lr:.3g}, precision {self.precision}). "
                        "Likely causes: a learning rate too high for this batch size, fp16 "
                        "overflow (try trainer.precision=bf16), or corrupt input data. "
                        f"The last good checkpoint {ckpt_path} is intact.")
            state.step += 1
            state.position += per_rank
            state.replaced_images += int(batch["replaced"].sum())
            images += per_rank * dist.get_world_size()
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum[k] + v.float() if k in metrics_sum else v.float()
            metrics_count += 1
            epoch_done = state.position >= steps_per_epoch * per_rank

            if state.step % self.log_every == 0 or state.step == last_step or epoch_done:
                now = time.perf_counter()
                out = self._reduce(metrics_sum, metrics_count, grad_norm)
                out.update(lr=lr, images_per_s=images / max(now - window_start, 1e-9),
                           epoch=state.step / steps_per_pass)
                metrics_sum, metrics_count, images, window_start = {}, 0, 0, now
                if dist.is_main():
                    if "loss" in out:
                        state.history.append((state.step, out["loss"]))
                    logger.log(out, state.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}",
                                        lr=f"{lr:.3g}", img_s=f"{out['images_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if epoch_done:
                state.epoch += 1
                state.position = 0
                if epoch_end is not None:
                    extra = epoch_end(state.epoch, state.step / steps_per_pass)
                    if extra and dist.is_main():
                        logger.log(extra, state.step)
            # A stop request counts once every rank has seen it (checked at log points, where
            # the ranks synchronise anyway), so all of them save and leave at the same step.
            stop = state.step % self.log_every == 0 and self._any_rank(self.stop_requested)
            if state.step % self.checkpoint_every == 0 or stop:
                state.train_time += time.perf_counter() - start_time
                start_time = time.perf_counter()
                self._save(ckpt_path, model, optimizer, state)
                saved_step = state.step
            if state.step >= last_step or stop:
                break
        if bar is not None:
            bar.close()
        state.train_time += time.perf_counter() - start_time
        if saved_step != state.step:
            self._save(ckpt_path, model, optimizer, state)
        steps_run = state.step - start_step
        return {
            "steps": state.step, "total_steps": total_steps, "epochs": state.step / steps_per_pass,
            "images_seen": state.step * self.batch_size, "train_time_s": state.train_time,
            "bad_steps": state.bad_steps, "replaced_images": state.replaced_images,
            "final_lr": lr, "loss_history": state.history, "steps_this_attempt": steps_run,
            "completed": state.step >= last_step, "run_id": state.run_id,
        }

    def _any_rank(self, flag: bool) -> bool:
        return bool(dist.all_reduce_sum(torch.tensor(float(flag), device=self.device)) > 0)

    @staticmethod
    def _reduce(metrics_sum: dict[str, torch.Tensor], count: int,
                grad_norm: torch.Tensor) -> dict[str, float]:
        """Window means of the metrics over all ranks, and this step's gradient norm: one
        all-reduce and one host sync for all of them."""
        names = list(metrics_sum)
        values = torch.stack([metrics_sum[k] / count for k in names]
                             + [grad_norm.detach().float()])
        # Gradients are identical on every rank after DDP's all-reduce: so is their mean norm.
        return dict(zip([*names, "grad_norm"], dist.all_reduce_mean(values).tolist(), strict=True))

    # ------------------------------------------------------------------ state
    def _seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _save(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
              state: TrainState) -> None:
        """Everything a resume needs; rank 0 writes, atomically."""
        if hasattr(model, "sync_state"):
            model.sync_state()
        if dist.is_main():
            atomic_save({"format": FORMAT, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "state": asdict(state), "rng": rng_state(),
                         "config": getattr(self, "config", {})}, path)
        dist.barrier()

    def _restore(self, path: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> TrainState:
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        state = TrainState(**ckpt["state"])
        state.history = [tuple(h) for h in state.history]
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        return state

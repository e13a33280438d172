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
    """

    def __init__(self, epochs: float = 100.0, batch_size: int = 256, max_steps: int | None = None,
                 checkpoint_every: int = 1000, log_every: int = 20, precision: str = "fp32",
                 num_workers: int = 2, device: str = "auto", channels_last: bool = False,
                 max_bad_steps: int = 20, progress: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r}: expected one of {list(PRECISIONS)}")
        self.epochs, self.batch_size, self.max_steps = epochs, batch_size, max_steps
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.precision, self.num_workers = precision, num_workers
        self.device = resolve_device(device)
        self.channels_last, self.progress = channels_last, progress
        self.max_bad_steps = max_bad_steps
        self.stop_requested = False  # set (e.g. by a preemption signal) to checkpoint and return

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

    # ------------------------------------------------------------------ the loop
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

        state = TrainState()
        self._scaler_state = None
        ckpt_path = out_dir / "current.pth"
        if resume and ckpt_path.is_file():
            state = self._restore(ckpt_path, model, optimizer)
            log.info("resumed from %s at step %d", ckpt_path, state.step)
        else:
            self._seed(seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self._scaler_state:
            self.scaler.load_state_dict(self._scaler_state)

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

        loader = torch.utils.data.DataLoader(
            SeededItems(dataset, seed),
            sampler=RunSampler(sampler, per_rank, state.epoch, state.position, num_epochs),
            batch_size=per_rank, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None)
        bar = None
        if self.progress and dist.is_main():
            from tqdm import tqdm

            bar = tqdm(total=last_step, initial=state.step, unit="step", dynamic_ncols=True)
        model.train()
        metrics_sum: dict[str, torch.Tensor] = {}
        metrics_count, consecutive_bad, images = 0, 0, 0
        window_start = time.perf_counter()
        start_time, start_step = time.perf_counter(), state.step
        lr = lr_at(state.step)
        autocast_dtype = PRECISIONS[self.precision]
        params = [p for p in model.parameters() if p.requires_grad]

        for batch in loader if state.step < last_step else []:
            lr = lr_at(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
            if self.channels_last:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            index = batch["index"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                loss, metrics = net(crops, index)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None], foreach=True)
            # One host sync per step: the price of never letting a NaN reach the weights.
            finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
            if finite:
                self.scaler.step(optimizer)
                model.after_step(lr)
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
            self.scaler.update()
            state.step += 1
            state.position += per_rank
            state.replaced_images += int(batch["replaced"].sum())
            images += per_rank * dist.get_world_size()
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0) + v.detach().float()
            metrics_count += 1
            epoch_done = state.position >= steps_per_epoch * per_rank

            if state.step % self.log_every == 0 or state.step == last_step or epoch_done:
                now = time.perf_counter()
                out = {k: dist.all_reduce_mean(v / metrics_count).item()
                       for k, v in metrics_sum.items()}
                out.update(lr=lr, images_per_s=images / max(now - window_start, 1e-9),
                           grad_norm=float(grad_norm), epoch=state.step / steps_per_pass)
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
            if state.step % self.checkpoint_every == 0 or self.stop_requested:
                state.train_time += time.perf_counter() - start_time
                start_time = time.perf_counter()
                self._save(ckpt_path, model, optimizer, state)
            if state.step >= last_step or self.stop_requested:
                break
        if bar is not None:
            bar.close()
        state.train_time += time.perf_counter() - start_time
        self._save(ckpt_path, model, optimizer, state)
        steps_run = state.step - start_step
        return {
            "steps": state.step, "total_steps": total_steps, "epochs": state.step / steps_per_pass,
            "images_seen": state.step * self.batch_size, "train_time_s": state.train_time,
            "bad_steps": state.bad_steps, "replaced_images": state.replaced_images,
            "final_lr": lr, "loss_history": state.history, "steps_this_attempt": steps_run,
            "completed": state.step >= last_step, "run_id": state.run_id,
        }

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
        self._scaler_state = ckpt.get("scaler")
        return state

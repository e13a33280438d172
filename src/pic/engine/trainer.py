"""The one training loop. It knows nothing of methods: a method is a module returning a loss."""

from __future__ import annotations

import datetime
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from .. import dist
from ..bounds import NonNegative, Positive
from ..dist.init import local_device
from . import signals
from .checkpoint import Checkpointer, TrainState
from .health import (
    DivergenceError,
    Snapshot,
    diverged,
    first_non_finite,
    likely_causes,
    watched,
)
from .loader import Plan, run_loader
from .precision import PRECISIONS, Hardware, choose_precision, emulated_bf16_warning

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def resolve_device(device: str) -> torch.device:
    """``auto``: this process's GPU (its local rank's) if there is one, else the CPU."""
    return local_device() if device == "auto" else torch.device(device)


def progress_line(out: dict[str, float], step: int, last_step: int, batch_size: int) -> str:
    """One plain line for the log at a log point: step/total, epoch, loss, lr, images/s, ETA
    (the remaining steps at this window's speed; ``batch_size`` is global)."""
    speed = out["images_per_s"]
    eta = (last_step - step) * batch_size / speed if speed > 0 else math.inf
    eta_text = "?" if not math.isfinite(eta) else str(datetime.timedelta(seconds=round(eta)))
    return (f"step {step}/{last_step}  epoch {out['epoch']:.2f}  "
            f"loss {out.get('loss', math.nan):.4f}  lr {out['lr']:.4g}  "
            f"{speed:.1f} img/s  ETA {eta_text}")


def _stop_reason() -> str:
    signum = signals.received()
    return "stop request" if signum is None else signal.Signals(signum).name


class Window:
    """The metrics of the steps since the last log point, kept on the device: summing them
    costs no host sync; :meth:`reduce` syncs once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.images, self.start = 0, 0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], images: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.count += 1
        self.images += images

    def reduce(self, grad_norm: torch.Tensor) -> dict[str, float]:
        """Window means of the metrics over all ranks, this step's gradient norm and the
        images/s since the last call: one all-reduce and one host sync; then start afresh."""
        names = list(self.sums)
        values = torch.stack([self.sums[k] / self.count for k in names]
                             + [grad_norm.detach().float()])
        # Gradients are identical on every rank after DDP's all-reduce: so is their mean norm.
        out = dict(zip([*names, "grad_norm"], dist.all_reduce_mean(values).tolist(), strict=True))
        now = time.perf_counter()
        out["images_per_s"] = self.images / max(now - self.start, 1e-9)
        self.sums, self.count, self.images, self.start = {}, 0, 0, now
        return out


class Trainer:
    """Runs any method over a dataset with a sampler, an optimizer and a per-step lr schedule.

    ``batch_size`` is global (all processes together). ``epochs`` counts passes over the N
    training images; a sampler whose epoch covers a fraction of them (sliding window) gets
    proportionally more sampler-epochs. ``max_steps`` stops early without changing the
    schedule. Rerunning in the same directory resumes from ``current.pth``.

    Speed options. The constructor's defaults are the reference computation (fp32, default
    layout); the platform's config (``conf/config.yaml``, ``trainer:``) turns on the options
    that help on CPUs and GPUs alike (precision auto, channels_last, cudnn_benchmark). All of
    them keep resume exact (``cudnn_benchmark`` aside, see below).

    - ``precision``: ``auto`` chooses what the hardware runs natively (:mod:`.precision`) and
      logs why; the choice and reason are in the summary (``precision``,
      ``precision_reason``). ``bf16`` runs forward and backward under bf16 autocast; losses
      are computed in fp32 by the methods. About 2× faster on a CPU with AVX512-BF16/AMX and
      on GPUs from Ampere on, ~10× slower where emulated (one warning says so). ``fp16`` adds
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

    def __init__(self, epochs: Annotated[float, Positive] = 100.0,
                 batch_size: Annotated[int, Positive] = 256,
                 max_steps: Annotated[int | None, Positive] = None,
                 checkpoint_every: Annotated[int, Positive] = 1000,
                 log_every: Annotated[int, Positive] = 20, precision: str = "fp32",
                 num_workers: Annotated[int, NonNegative] = 2, device: str = "auto",
                 channels_last: bool = False, compile: bool = False, cudnn_benchmark: bool = True,
                 max_bad_steps: Annotated[int, NonNegative] = 20, progress: bool = True) -> None:
        self.device = resolve_device(device)
        hardware = Hardware.probe(self.device)
        self.precision, self.precision_reason = choose_precision(precision, hardware)
        log.info("precision %s: %s", self.precision, self.precision_reason)
        warning = emulated_bf16_warning(self.precision, hardware)
        if warning:
            log.warning(warning)
        self.epochs, self.batch_size, self.max_steps = epochs, batch_size, max_steps
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.num_workers = num_workers
        self.channels_last, self.compile = channels_last, compile
        self.cudnn_benchmark, self.progress = cudnn_benchmark, progress
        self.max_bad_steps = max_bad_steps
        self.stop_requested = False  # set (e.g. by a preemption signal) to checkpoint and return
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._consecutive_bad = 0
        self._snapshot: Snapshot | None = None
        self._watched: list[tuple[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ set-up
    def per_rank_batch(self) -> int:
        world = dist.get_world_size()
        if self.batch_size % world:
            raise ValueError(f"trainer.batch_size={self.batch_size} is global and must divide "
                             f"evenly over {world} processes")
        return self.batch_size // world

    def plan(self, sampler: Any) -> Plan:
        """The run's length with ``sampler`` (its per-rank epoch) and this batch size."""
        return Plan.of(sampler, self.per_rank_batch(), self.epochs)

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

    def _wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself in one process, its DDP wrapper in a process group."""
        if not dist.is_dist():
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (banks, queues) are kept identical by the methods themselves; broadcasting
        # them from rank 0 every step would cost an N×D copy. They are synced once here, at the
        # wrap (what forward_sync_buffers=False keeps): every rank has just built or restored
        # the same ones, so that copy changes nothing. (broadcast_buffers is deprecated.)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   forward_sync_buffers=False)

    # ------------------------------------------------------------------ the loop
    def train_step(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                   batch: dict[str, Any], lr: float
                   ) -> tuple[bool, torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step at learning rate ``lr``, exactly as :meth:`fit` runs it.

        ``batch``: ``crops`` (list of B×3×H×W tensors) and ``index`` (B), on any device;
        ``net``: ``model`` or its DDP wrapper. Returns (whether the step was applied, the
        gradient norm as a 0-d tensor on the device, the method's metrics, detached 0-d).

        The optimizer's param groups carry ``lr`` (a method reads the step's settings from the
        optimizer it was attached to). A step whose loss or gradient is not finite changes
        nothing: no optimizer step, no ``after_step``, and what ``forward`` changed in place
        (``model.forward_state()``: BatchNorm statistics, ...) is put back. Deciding that
        costs the step's one host sync (``bool`` of a device flag); the optimizer step and
        ``after_step`` (which may update host-side state such as a sampled classifier's
        counters) cannot be issued before it is known.
        """
        for group in optimizer.param_groups:
            group["lr"] = lr
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        crops = [c.to(self.device, non_blocking=True, memory_format=layout)
                 for c in batch["crops"]]
        index = batch["index"].to(self.device, non_blocking=True)
        dtype = PRECISIONS[self.precision]
        if self._snapshot is None or self._snapshot.model is not model:
            self._snapshot = Snapshot(model)
        self._snapshot.take()
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
            model.after_step()
        else:
            self._snapshot.restore()  # BN statistics (and the like) as before the step
        self.scaler.update()
        return finite, grad_norm, {k: v.detach() for k, v in metrics.items()}

    def fit(self, model: nn.Module, dataset: torch.utils.data.Dataset, sampler: Any,
            optimizer: torch.optim.Optimizer, schedule: Callable[..., Callable[[int], float]],
            out_dir: Path, logger: Any, seed: int, resume: bool = True,
            epoch_end: Callable[[float], dict[str, float]] | None = None,
            config: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None,
            allow_dataset_change: bool = False) -> dict[str, Any]:
        """Train ``model`` (already on ``self.device``) and return the run's summary.

        ``schedule(base_lr, total_steps, steps_per_pass)`` gives the per-step lr; the base lr
        is the optimizer's (already scaled to the global batch). ``epoch_end(passes)`` runs
        after every sampler-epoch and may return metrics to log. ``config`` (the run's
        composed config) goes to the logger and into every checkpoint; so does ``provenance``
        (:func:`pic.provenance.provenance`): a resume on another dataset stops unless
        ``allow_dataset_change``.
        """
        plan = self.plan(sampler)
        lr_at = schedule(optimizer.defaults["lr"], plan.total_steps, plan.steps_per_pass)
        last_step = plan.total_steps
        if self.max_steps is not None:
            last_step = min(last_step, self.max_steps)
        self.prepare(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        model.attach(optimizer, self.scaler)
        ckpt = Checkpointer(Path(out_dir) / "current.pth", model, optimizer, self.scaler, config,
                            provenance, allow_dataset_change, self.precision)
        self._watched = watched(model)
        state = ckpt.restore_or_start(resume, seed)
        if ckpt.saved_step is not None:
            log.info("resumed from %s at step %d", ckpt.path, state.step)
        net = self._wrap(model)
        if dist.is_main():
            # The logger's run config: the composed config and what the run was made from.
            logger.start(Path(out_dir), {**ckpt.config, "provenance": ckpt.provenance},
                         run_id=state.run_id)
            state.run_id = logger.run_id
        if ckpt.saved_step is None:
            # A checkpoint before the first step: a job preempted early keeps its W&B run id.
            ckpt.save(state)
        loader = run_loader(dataset, sampler, plan, state.epoch, state.position, seed,
                            self.num_workers, self.device)
        start_step = state.step
        lr, stopped = self._loop(net, model, optimizer, loader if state.step < last_step else [],
                                 lr_at, plan, last_step, state, ckpt, logger, epoch_end)
        if ckpt.saved_step != state.step:
            self._checkpoint(ckpt, state, time.perf_counter())
        return self._summary(state, plan, last_step, lr, start_step) | {
            "stopped_by": _stop_reason() if stopped else None}

    def _loop(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
              loader: Any, lr_at: Callable[[int], float], plan: Plan, last_step: int,
              state: TrainState, ckpt: Checkpointer, logger: Any,
              epoch_end: Callable[[float], dict[str, float]] | None) -> tuple[float, bool]:
        """Per batch: step, account, log, end the epoch, checkpoint, stop. Returns the last lr
        and whether a stop request ended the loop."""
        bar = self._progress_bar(state.step, last_step)
        model.train()
        window, clock, lr, stop = Window(), time.perf_counter(), lr_at(state.step), False
        self._consecutive_bad = 0
        for batch in loader:
            lr = lr_at(state.step)
            stop_vote = self._start_stop_vote()
            finite, grad_norm, metrics = self.train_step(net, model, optimizer, batch, lr)
            self._count_step(state, finite, lr, ckpt)
            state.position += plan.batch_size
            state.replaced_images += int(batch["replaced"].sum())
            window.add(metrics, plan.batch_size * dist.get_world_size())
            epoch_done = plan.epoch_done(state.position)
            if state.step % self.log_every == 0 or state.step == last_step or epoch_done:
                epoch = state.step / plan.steps_per_pass
                out = window.reduce(grad_norm) | {"lr": lr, "epoch": epoch}
                self._log(out, state, last_step, logger, bar)
                self._check_health(state, lr, ckpt)
            if bar is not None:
                bar.update(1)
            if epoch_done:
                self._end_epoch(state, plan, logger, epoch_end)
            stop = stop_vote()
            if state.step % self.checkpoint_every == 0 or stop:
                clock = self._checkpoint(ckpt, state, clock)
            if state.step >= last_step or stop:
                break
        if bar is not None:
            bar.close()
        state.train_time += time.perf_counter() - clock
        return lr, stop

    def _count_step(self, state: TrainState, finite: bool, lr: float, ckpt: Checkpointer) -> None:
        """Account a step taken or skipped; too many skipped in a row end the run."""
        state.step += 1
        if finite:
            self._consecutive_bad = 0
            return
        state.bad_steps += 1
        self._consecutive_bad += 1
        log.warning("step %d: non-finite loss or gradient, step skipped", state.step - 1)
        if self._consecutive_bad > self.max_bad_steps:
            raise NonFiniteError(
                f"{self._consecutive_bad} consecutive steps up to step {state.step - 1} had a "
                f"non-finite loss or gradient (lr {lr:.3g}, precision {self.precision}). "
                f"Likely causes: {likely_causes(self.precision, ckpt.model)}, or corrupt input "
                f"data. The last good checkpoint {ckpt.path} is intact.")

    def _progress_bar(self, step: int, last_step: int) -> Any:
        """A tqdm bar on rank 0 when its stream (stderr) is a terminal: in a batch job its
        carriage returns would make the log unreadable, and the plain lines say it all."""
        if not (self.progress and dist.is_main() and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True)

    def _log(self, out: dict[str, float], state: TrainState, last_step: int, logger: Any,
             bar: Any) -> None:
        if not dist.is_main():
            return
        if "loss" in out:
            state.history.append((state.step, out["loss"]))
        logger.log(out, state.step)
        log.info("%s", progress_line(out, state.step, last_step, self.batch_size))
        if bar is not None:
            bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}", lr=f"{out['lr']:.3g}",
                            img_s=f"{out['images_per_s']:.0f}")

    def _end_epoch(self, state: TrainState, plan: Plan, logger: Any,
                   epoch_end: Callable[[float], dict[str, float]] | None) -> None:
        state.epoch += 1
        state.position = 0
        if epoch_end is not None:
            extra = epoch_end(state.step / plan.steps_per_pass)
            if extra and dist.is_main():
                logger.log(extra, state.step)

    def _checkpoint(self, ckpt: Checkpointer, state: TrainState, clock: float) -> float:
        """Save with the training time up to now; returns the new start of the clock.

        Never while steps are being skipped: ``current.pth`` then keeps the state after the last
        good step, and a resume replays the data since (a run that recovers saves later).
        """
        state.train_time += time.perf_counter() - clock
        if self._consecutive_bad:
            log.warning("step %d: not checkpointing after %d skipped step(s) in a row; %s stays "
                        "at step %s", state.step, self._consecutive_bad, ckpt.path,
                        ckpt.saved_step)
        else:
            ckpt.save(state)
        return time.perf_counter()

    def _check_health(self, state: TrainState, lr: float, ckpt: Checkpointer) -> None:
        """At a log point: stop a run whose parameters or forward state stopped being finite,
        or whose loss diverged (:func:`~.health.diverged`). Every rank takes the decision."""
        bad = first_non_finite(self._watched)
        reason = f"{bad} holds NaN or inf" if bad else diverged(state.history)
        if self._any_rank(reason is not None):
            raise DivergenceError(
                f"training diverged at step {state.step}: {reason or 'seen by another rank'} "
                f"(lr {lr:.3g}, precision {self.precision}). Likely causes: "
                f"{likely_causes(self.precision, ckpt.model)}. {ckpt.path} holds step "
                f"{ckpt.saved_step}, saved before this was detected.")

    def _any_rank(self, flag: bool) -> bool:
        return bool(dist.all_reduce_sum(torch.tensor(float(flag), device=self.device)) > 0)

    def _stop_wanted(self) -> bool:
        return self.stop_requested or signals.received() is not None

    def _start_stop_vote(self) -> Callable[[], bool]:
        """Whether any rank was asked to stop (``stop_requested``, or a stop signal), so that
        every rank saves and leaves after the same step: the vote starts before the step and
        its result is read after it (the call returned).

        In one process the call reads the flag after the step. In a process group the vote is
        one all-reduce of a scalar, overlapping the step; a request that comes during the step
        counts from the next one. Cost: bench/stop_check.py.
        """
        if not dist.is_dist():
            return self._stop_wanted
        votes = torch.tensor([float(self._stop_wanted())], device=self.device)
        result = dist.all_reduce_sum_async(votes)
        return lambda: bool(result().item() > 0)

    def _summary(self, state: TrainState, plan: Plan, last_step: int, lr: float,
                 start_step: int) -> dict[str, Any]:
        return {
            "steps": state.step, "total_steps": plan.total_steps,
            "epochs": state.step / plan.steps_per_pass,
            "images_seen": state.step * self.batch_size, "train_time_s": state.train_time,
            "bad_steps": state.bad_steps, "replaced_images": state.replaced_images,
            "final_lr": lr, "loss_history": state.history,
            "steps_this_attempt": state.step - start_step,
            "completed": state.step >= last_step, "run_id": state.run_id,
            "precision": self.precision, "precision_reason": self.precision_reason,
        }

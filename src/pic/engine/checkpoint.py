"""Checkpoints: the run's state (:class:`TrainState`, RNG streams), atomic files, and the
save/restore of everything a bit-identical resume needs."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from .. import dist

FORMAT = "pic-checkpoint/1"


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


# ---------------------------------------------------------------------- random generators
def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and Python generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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


# ---------------------------------------------------------------------- atomic files
def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a reader (or a resume after a crash) sees the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our checkpoints; anything else is a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this platform (no '{FORMAT}' marker); "
                         "pass a current.pth written by `launch.py task=pretrain`")
    return ckpt


def backbone_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's weights from a checkpoint of any method (method-specific parts dropped)."""
    prefix = "encoder.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError("checkpoint has no encoder.backbone.* weights")
    return state


# ---------------------------------------------------------------------- the run's checkpoint
class Checkpointer:
    """``current.pth`` of a run: model, optimizer, loss scaler, :class:`TrainState`, RNG streams
    and the run's config. ``saved_step`` is the step the file holds (None: not written by this
    attempt and not resumed), so that no state is written twice."""

    def __init__(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, config: dict[str, Any] | None = None) -> None:
        self.path, self.model, self.optimizer, self.scaler = path, model, optimizer, scaler
        self.config = config or {}
        self.saved_step: int | None = None

    def restore_or_start(self, resume: bool, seed: int) -> TrainState:
        """The state of ``path`` when resuming from an existing file; else a fresh state, with
        the global generators seeded by ``seed``."""
        if resume and self.path.is_file():
            return self.restore()
        seed_everything(seed)
        return TrainState()

    def save(self, state: TrainState) -> None:
        """Everything a resume needs; rank 0 writes, atomically; every rank waits for it."""
        self.model.sync_state()
        if dist.is_main():
            atomic_save({"format": FORMAT, "model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "state": asdict(state),
                         "rng": rng_state(), "config": self.config}, self.path)
        dist.barrier()
        self.saved_step = state.step

    def restore(self) -> TrainState:
        ckpt = load_checkpoint(self.path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        state = TrainState(**ckpt["state"])
        state.history = [tuple(h) for h in state.history]
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.saved_step = state.step
        return state

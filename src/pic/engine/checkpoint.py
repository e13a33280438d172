"""Checkpoints: the run's state (:class:`TrainState`, RNG streams), atomic files, and the
save/restore of everything a bit-identical resume needs."""

from __future__ import annotations

import errno
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
from ..provenance import check_same_dataset
from .health import DivergenceError, first_non_finite, likely_causes

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
class WriteFailed(OSError):
    """A file could not be written for lack of space (or quota, or file-size limit)."""


#: What a full disk looks like: no space, over quota, over the process's file-size limit.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
PARTIAL = ".partial"  # the suffix of atomic writes' temporaries (removed at start-up)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> None:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a reader (or a resume after a crash) sees the old file or the new one, whole.

    A full disk is one error naming ``path``; torch's writer reports it as an ``enforce fail``
    with the OSError only in the chain, so the chain is searched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = _no_room(err)
        if full is None:
            raise
        kept = f"the previous {what} is intact" if path.exists() else f"no {what} was written"
        raise WriteFailed(full.errno, f"{os.strerror(full.errno).lower()} writing {path}; "
                                      f"{kept}") from err


def _no_room(err: BaseException | None) -> OSError | None:
    """The OSError of a full disk in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_ROOM:
            return err
        err = err.__cause__ or err.__context__
    return None


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


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
    bad = first_non_finite(ckpt["model"].items())
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad} holds NaN or inf (the run that wrote it "
                         "diverged); it can be neither evaluated nor resumed: use a checkpoint "
                         "from before the divergence, or train again")
    return ckpt


def backbone_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's weights from a checkpoint of any method (method-specific parts dropped)."""
    prefix = "encoder.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError("checkpoint has no encoder.backbone.* weights")
    return state


def load_backbone(backbone: nn.Module, path: str | Path) -> nn.Module:
    """Load the backbone weights of checkpoint ``path`` (any method) into ``backbone``."""
    ckpt = load_checkpoint(path)
    try:
        backbone.load_state_dict(backbone_state(ckpt))
    except (RuntimeError, ValueError) as err:
        trained = ckpt.get("config", {}).get("backbone")
        raise ValueError(f"pretrained={path}: its backbone does not match backbone="
                         f"{type(backbone).__name__} of this run (the checkpoint was trained with "
                         f"{trained}); select the same backbone option. {err}") from err
    return backbone


def load_encoder(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the ``encoder.*`` weights (backbone and projection head) of checkpoint ``path``
    into a method built like the checkpoint's (``model``); its other parts stay as built."""
    ckpt = load_checkpoint(path)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"pretrained={path}: its encoder (backbone + head) does not match "
                         f"model={type(model).__name__} with this backbone; select the model and "
                         f"backbone options it was trained with. {err}") from err
    return model


# ---------------------------------------------------------------------- the run's checkpoint
class Checkpointer:
    """``current.pth`` of a run: model, optimizer, loss scaler, :class:`TrainState`, RNG streams
    and the run's config. ``saved_step`` is the step the file holds (None: not written by this
    attempt and not resumed), so that no state is written twice."""

    def __init__(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, config: dict[str, Any] | None = None,
                 provenance: dict[str, Any] | None = None,
                 allow_dataset_change: bool = False, precision: str = "fp32") -> None:
        self.path, self.model, self.optimizer, self.scaler = path, model, optimizer, scaler
        self.precision = precision  # for the likely causes of a non-finite state
        self.config = config or {}
        self.provenance, self.allow_dataset_change = provenance or {}, allow_dataset_change
        self.saved_step: int | None = None

    def restore_or_start(self, resume: bool, seed: int) -> TrainState:
        """The state of ``path`` when resuming from an existing file; else a fresh state, with
        the global generators seeded by ``seed``."""
        if resume and self.path.is_file():
            return self.restore()
        seed_everything(seed)
        return TrainState()

    def save(self, state: TrainState) -> None:
        """Everything a resume needs; rank 0 writes, atomically; every rank waits for it.

        A state with a NaN or an infinity is never written over the previous checkpoint.
        """
        self.model.sync_state()
        model_state = self.model.state_dict()
        bad = first_non_finite(model_state.items())
        device = next(self.model.parameters()).device
        if dist.all_reduce_sum(torch.tensor(float(bad is not None), device=device)) > 0:
            raise DivergenceError(f"step {state.step}: not checkpointing, tensor "
                                  f"{bad or '(on another rank)'} holds NaN or inf; {self.path} "
                                  f"(step {self.saved_step}) is intact. Likely causes: "
                                  f"{likely_causes(self.precision, self.model)}.")
        if dist.is_main():
            atomic_save({"format": FORMAT, "model": model_state,
                         "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "state": asdict(state),
                         "rng": rng_state(), "config": self.config,
                         "provenance": self.provenance}, self.path)
        dist.barrier()
        self.saved_step = state.step

    def restore(self) -> TrainState:
        ckpt = load_checkpoint(self.path)
        check_same_dataset(ckpt.get("provenance") or {}, self.provenance, self.path,
                           self.allow_dataset_change)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise ValueError(_not_this_model(self.path, ckpt.get("config") or {},
                                             self.config)) from err
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        state = TrainState(**ckpt["state"])
        state.history = [tuple(h) for h in state.history]
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.saved_step = state.step
        return state


def _not_this_model(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Which method and backbone a checkpoint is from, against this run's, and what to do."""
    def describe(config: dict[str, Any]) -> str:
        def part(node: Any) -> str:
            if not isinstance(node, dict) or "_target_" not in node:
                return "unknown"
            args = ", ".join(f"{k}={v}" for k, v in node.items()
                             if k != "_target_" and not isinstance(v, dict | list))
            return f"{node['_target_'].rsplit('.', 1)[-1]}({args})"
        return f"model {part(config.get('model'))} on backbone {part(config.get('backbone'))}"

    return (f"{path} is a checkpoint of {describe(saved)}, and its weights do not fit this run's "
            f"{describe(current)}. To resume it, run with the model= and backbone= options of "
            f"{path.parent / 'config.yaml'}; to train this model instead, use another run "
            "directory (hydra.run.dir=...), or auto_resume=false to overwrite this one")

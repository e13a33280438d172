"""What every task does the same way: output directory, seeding, results file."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .. import dist
from ..data.transforms import eval_transform
from ..engine.checkpoint import atomic_write_text

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


Dataset = torch.utils.data.Dataset


def eval_splits(cfg: DictConfig, data: Any) -> tuple[Dataset, Dataset]:
    """Train and val splits with the deterministic evaluation transform (kNN bank, linear val)."""
    transform = eval_transform(data.image_size, data.mean, data.std)
    rank, world = dist.get_rank(), dist.get_world_size()
    return (data.build("train", transform, rank, world), data.build("val", transform, rank, world))


def make_logger(cfg: DictConfig) -> Any:
    from ..logging.loggers import NoLogger

    return instantiate(cfg.logger) if dist.is_main() else NoLogger()


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """``results.json`` (rank 0, atomic): the run's final metrics, machine-readable."""
    path = Path(out_dir) / "results.json"
    if dist.is_main():
        atomic_write_text(json.dumps(results, indent=2, sort_keys=True, default=float) + "\n", path)
    return path


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]

"""What every task does the same way: evaluation splits, training sampler, logger, results."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .. import dist
from ..data.base import InstanceDataset
from ..data.transforms import eval_transform
from ..engine.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

Dataset = torch.utils.data.Dataset


def eval_splits(data: Any) -> tuple[Dataset, Dataset]:
    """Train and val splits with the deterministic evaluation transform (kNN bank, linear val)."""
    transform = eval_transform(data.image_size, data.mean, data.std)
    rank, world = dist.get_rank(), dist.get_world_size()
    return (data.build("train", transform, rank, world), data.build("val", transform, rank, world))


def train_sampler(make: Callable[..., Any], dataset: InstanceDataset, seed: int) -> Any:
    """``make(dataset_size, seed, rank, world_size, indices)`` for this rank: with a per-rank
    cache the dataset holds only some images (``rank_indices``), and the sampler draws those."""
    return make(dataset_size=len(dataset), seed=seed, rank=dist.get_rank(),
                world_size=dist.get_world_size(), indices=dataset.rank_indices)


def make_logger(cfg: DictConfig) -> Any:
    from ..logging.loggers import NoLogger

    return instantiate(cfg.logger) if dist.is_main() else NoLogger()


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """``results.json`` (rank 0, atomic): the run's final metrics, machine-readable."""
    path = Path(out_dir) / "results.json"
    if dist.is_main():
        atomic_write_text(json.dumps(results, indent=2, sort_keys=True, default=float) + "\n", path)
    return path

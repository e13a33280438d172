"""What every task does the same way: evaluation splits, training sampler, logger, results,
and the evaluation of a checkpoint given or pretrained first (``task.pretrain_first``)."""

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
#: (W&B run id, run dir, steps) of the pretraining whose logger run an evaluation continues.
Continued = tuple[str | None, Path, int]


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


def evaluate_pretrained(cfg: DictConfig, out_dir: Path, task: str, pretrain_first: bool,
                        evaluate: Callable[[Path, Path, Continued | None], dict[str, Any]]
                        ) -> dict[str, Any]:
    """``evaluate(checkpoint, results dir, continued)`` of ``pretrained=PATH``, or with
    ``pretrain_first`` of a ``task=pretrain`` with the same config run in ``out_dir`` first:
    then the evaluation runs in ``out_dir/<task>``, continues the pretraining's logger run
    under ``<task>/`` names (one experiment, one W&B run), and its ``<task>_*`` results join
    the pretraining's ``results.json``. ``task``: ``linear``, ``finetune``."""
    if not pretrain_first:
        if not cfg.pretrained:
            raise ValueError(f"task={task} needs pretrained=PATH (a current.pth of a pretraining"
                             f" run), or task.pretrain_first=true to pretrain in this run")
        return evaluate(Path(cfg.pretrained), out_dir, None)
    if cfg.pretrained:
        raise ValueError(f"task.pretrain_first=true pretrains in this run; pretrained="
                         f"{cfg.pretrained} would be ignored: drop one of the two")
    results = _pretrain_once(cfg, out_dir)
    if results.get("stopped_by"):
        return results
    scores = evaluate(out_dir / "current.pth", out_dir / task,
                      (results.get("run_id"), out_dir, results["steps"]))
    if scores.get("stopped_by"):
        return scores
    results.update({k: v for k, v in scores.items() if k.startswith(f"{task}_")})
    write_results(out_dir, results)
    return results


def _pretrain_once(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """``task=pretrain`` in ``out_dir``, skipped when a run of the whole schedule is there."""
    from .pretrain import Pretrain

    done = out_dir / "results.json"
    if cfg.auto_resume and done.is_file():
        results = json.loads(done.read_text())
        if results["steps"] >= results["total_steps"]:
            log.info("pretraining in %s already completed: evaluating it", out_dir)
            return results
    return Pretrain().run(cfg, out_dir)

"""``task=linear pretrained=PATH``: linear evaluation of a frozen backbone (authors' main_linear).

One linear layer is trained on the pooled features of a backbone taken from any method's
checkpoint; top-1/top-5 on the validation split are measured after every epoch. The loop is the
platform's one :class:`~pic.engine.trainer.Trainer` (checkpoint, resume, DDP, autocast, logging):
:class:`LinearProbe` has the method interface ``(crops, index) -> (loss, metrics)`` and looks the
class label up from the instance index.

``task.pretrain_first=true`` runs ``task=pretrain`` with the same config in the run directory
first and then evaluates its ``current.pth`` in ``<run dir>/linear`` — one command for a row of
the paper's table (the ``experiment`` configs do this).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .. import dist
from ..config import config_dict
from ..data import transforms
from ..data.samplers import EpochSampler
from ..engine.checkpoint import load_backbone, seed_everything
from ..engine.features import eval_mode, extract_features, rank_loader
from ..engine.optim import sgd
from ..engine.probe import FeatureProbe
from ..engine.schedules import Cosine
from ..engine.trainer import Trainer, resolve_device
from ..logging.history import MetricHistory
from ..models.linear_probe import LinearProbe
from ..provenance import provenance
from .common import (
    Continued,
    eval_splits,
    evaluate_pretrained,
    make_logger,
    train_sampler,
    write_results,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(probe: LinearProbe, dataset: torch.utils.data.Dataset, batch_size: int,
             device: torch.device, num_workers: int = 0) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``probe`` on ``dataset``, over all ranks (each
    classifies its share; the counts are summed)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, total
    with eval_mode(probe):
        for batch in rank_loader(dataset, batch_size, num_workers):
            logits = probe.logits(batch["crops"][0].to(device, non_blocking=True))
            target = batch["label"].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (top[:, 0] == target).sum()
            counts[1] += (top == target[:, None]).any(dim=1).sum()
            counts[2] += len(target)
    hits1, hits5, total = dist.all_reduce_sum(counts).tolist()
    return {"top1": 100 * hits1 / total, "top5": 100 * hits5 / total}


AUGMENTATIONS = {"padded_crop": transforms.linear_eval_padded_crop,
                 "resized_crop": transforms.linear_eval_resized_crop}


class LinearEval:
    """Linear evaluation of a frozen backbone, by one of two protocols.

    ``protocol=augmented`` (the papers'): SGD (``lr`` per 256 images, scaled to ``batch_size``),
    cosine schedule with ``warmup_epochs`` of linear warmup, ``epochs`` passes over training
    images augmented by ``augmentation`` (``padded_crop``: pad + random crop + flip, the
    small-image protocol; ``resized_crop``: RandomResizedCrop 0.08–1 + flip, ImageNet's), the
    backbone rerun every step; ``batch_norm`` puts a parameter-free BatchNorm before the linear
    layer. Other loop settings (precision, workers, checkpointing, ``max_steps``) come from
    ``trainer``. ``protocol=cached``: ``probe`` (a :class:`FeatureProbe`) on features extracted
    once, lr and weight decay chosen on a held-out part of the training split: seconds.
    """

    def __init__(self, epochs: float = 100.0, batch_size: int = 256, lr: float = 30.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, warmup_epochs: float = 5.0,
                 bn_train_mode: bool = False, pretrain_first: bool = False,
                 augmentation: str = "padded_crop", batch_norm: bool = False,
                 protocol: str = "augmented", probe: FeatureProbe | None = None) -> None:
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"task.augmentation={augmentation!r}: choose one of "
                             f"{', '.join(AUGMENTATIONS)}")
        if protocol not in ("augmented", "cached") or (protocol == "cached" and probe is None):
            raise ValueError(f"task.protocol={protocol!r}: choose augmented, or cached with "
                             f"task.probe set")
        self.epochs, self.batch_size = epochs, batch_size
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.warmup_epochs = warmup_epochs
        self.bn_train_mode, self.pretrain_first = bn_train_mode, pretrain_first
        self.augmentation, self.batch_norm = augmentation, batch_norm
        self.protocol, self.probe = protocol, probe

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        return evaluate_pretrained(cfg, out_dir, "linear", self.pretrain_first,
                                   partial(self.evaluate_checkpoint, cfg))

    def evaluate_checkpoint(self, cfg: DictConfig, pretrained: Path, out_dir: Path,
                            continued: Continued | None = None) -> dict[str, Any]:
        """Train and evaluate a probe on ``pretrained``'s backbone; results in ``out_dir``.
        ``continued``: (run id, run dir, steps) of the pretraining whose logger run the
        evaluation continues, under ``linear/`` names."""
        out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        backbone = load_backbone(instantiate(cfg.backbone), pretrained)
        results = (self._cached(cfg, backbone) if self.protocol == "cached"
                   else self._augmented(cfg, backbone, out_dir, continued))
        if results.get("stopped_by"):
            return results
        results.update(pretrained=str(pretrained), protocol=self.protocol)
        write_results(out_dir, results)
        if dist.is_main():
            print(f"linear top-1 {results['linear_top1']:.2f}%  top-5 "
                  f"{results['linear_top5']:.2f}%  ({self.protocol}; {pretrained})", flush=True)
        return results

    def _cached(self, cfg: DictConfig, backbone: torch.nn.Module) -> dict[str, Any]:
        device = resolve_device(cfg.trainer.device)
        data = instantiate(cfg.data)
        bank_set, val_set = eval_splits(data)
        batch = cfg.eval.batch_size
        train = extract_features(backbone.to(device), bank_set, batch, device,
                                 cfg.trainer.num_workers)
        val = extract_features(backbone, val_set, batch, device, cfg.trainer.num_workers)
        scores = self.probe.fit(*train, *val, data.num_classes)  # type: ignore[union-attr]
        return {f"linear_{k}": v for k, v in scores.items()}

    def _augmented(self, cfg: DictConfig, backbone: torch.nn.Module, out_dir: Path,
                   continued: Continued | None) -> dict[str, Any]:
        trainer = instantiate(cfg.trainer, epochs=self.epochs, batch_size=self.batch_size)
        data = instantiate(cfg.data)
        augment = AUGMENTATIONS[self.augmentation](data.image_size, data.mean, data.std)
        train_set = data.build("train", augment, dist.get_rank(), dist.get_world_size())
        _, val_set = eval_splits(data)
        labels = torch.tensor([train_set.label(i) for i in range(len(train_set))])
        probe = LinearProbe(backbone, data.num_classes, labels, self.bn_train_mode,
                            self.batch_norm).to(trainer.device)
        optimizer = sgd(probe, self.batch_size, self.lr, self.momentum, self.weight_decay)
        return fit_probe(cfg, trainer, probe, train_set, val_set, optimizer,
                         Cosine(warmup_epochs=self.warmup_epochs), out_dir, "linear",
                         provenance(train_set), continued, self._scores)

    def _scores(self, rows: list[dict[str, float]]) -> dict[str, Any]:
        """The final and the best epoch's scores of the history ``rows``, and the protocol."""
        best = max(rows, key=lambda r: r["top1"])
        return {"linear_top1": rows[-1]["top1"], "linear_top5": rows[-1]["top5"],
                "linear_best_top1": best["top1"], "linear_best_top5": best["top5"],
                "linear_best_epoch": best["epoch"], "bn_train_mode": self.bn_train_mode,
                "augmentation": self.augmentation, "batch_norm": self.batch_norm}


Dataset = torch.utils.data.Dataset


def fit_probe(cfg: DictConfig, trainer: Trainer, net: LinearProbe, train_set: Dataset,
              val_set: Dataset, optimizer: torch.optim.Optimizer, schedule: Any, out_dir: Path,
              phase: str, origin: dict[str, Any], continued: Continued | None,
              scores_of: Callable[[list[dict[str, float]]], dict[str, Any]]) -> dict[str, Any]:
    """Train ``net`` (a probe, or a network fine-tuned whole) on ``train_set`` by ``trainer``,
    scored on ``val_set`` after every epoch and at the end; the scores' curve is
    ``<out_dir>/<phase>_history.json`` (resumable). Returns the trainer's summary (which says
    whether a stop request ended the run) with ``<phase>_history``, ``origin`` (the data's
    provenance) and ``scores_of(history rows)``, all but the history in the logger run's
    summary. ``continued``: the pretraining whose logger run this continues, under
    ``<phase>/`` names."""
    history = MetricHistory(out_dir / f"{phase}_history.json", cfg.auto_resume)

    def record(passes: float) -> dict[str, float]:
        scores = evaluate(net, val_set, trainer.per_rank_batch(), trainer.device,
                          trainer.num_workers)
        history.record(passes, scores)
        log.info("%s epoch %.2f: top-1 %.2f%%, top-5 %.2f%%", phase, passes, scores["top1"],
                 scores["top5"])
        return {f"val_{k}": v for k, v in scores.items()}

    logger = make_logger(cfg)
    if continued is not None:
        logger.continue_run(*continued, prefix=f"{phase}/")
    summary = trainer.fit(net, train_set, train_sampler(EpochSampler, train_set, cfg.seed),
                          optimizer, schedule, out_dir, logger, cfg.seed, resume=cfg.auto_resume,
                          epoch_end=record, config=config_dict(cfg), provenance=origin,
                          allow_dataset_change=cfg.allow_dataset_change)
    if summary["stopped_by"]:  # leave now: a scheduler's grace period is short
        logger.finish()  # the requeued attempt resumes this W&B run: release it now
        return summary
    if summary["epochs"] not in history:  # stopped between epochs (max_steps, preemption)
        logger.log(record(summary["epochs"]), summary["steps"])
    rows = history.rows(until=summary["epochs"])
    results = {**scores_of(rows), f"{phase}_history": rows, **origin,
               **{k: v for k, v in summary.items() if k != "loss_history"}}
    logger.summary({k: v for k, v in results.items() if k != f"{phase}_history"})
    logger.finish()
    return results

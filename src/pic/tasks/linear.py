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

import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..config import config_dict
from ..data.samplers import EpochSampler
from ..data.transforms import linear as linear_augmentation
from ..engine.checkpoint import atomic_write_text, backbone_state, load_checkpoint, seed_everything
from ..engine.optim import sgd
from ..engine.schedules import Cosine
from ..models.base import Trainable
from .common import eval_splits, make_logger, train_sampler, write_results

log = logging.getLogger(__name__)


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


class LinearProbe(Trainable):
    """A frozen backbone and one trainable linear layer on its pooled features.

    ``labels`` (N, int64) maps a training instance index to its class, since the trainer hands
    methods ``(crops, index)`` only. With ``bn_train_mode=False`` the backbone stays in eval mode
    even while the probe trains (BN running statistics frozen); ``True`` lets them drift, as the
    released code does.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, labels: torch.Tensor,
                 bn_train_mode: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.fc = nn.Linear(backbone.out_dim, num_classes)
        # MoCo's linear-classification init; the probe's lr (30) is tuned for it.
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.bn_train_mode = bn_train_mode
        # Derived from the dataset at start-up, so not part of the checkpoint.
        self.register_buffer("labels", labels.long(), persistent=False)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if not self.bn_train_mode:
            self.backbone.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images B×3×H×W → class logits B×C (no gradient into the backbone)."""
        with torch.no_grad():
            features = self.backbone(images)
        return self.fc(features)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """crops: one B×3×H×W view; index: B instance indices → cross-entropy, train top-1."""
        logits = self.logits(crops[0])
        target = self.labels[index]
        loss = F.cross_entropy(logits.float(), target)
        top1 = (logits.argmax(dim=1) == target).float().mean() * 100
        return loss, {"loss": loss.detach(), "train_top1": top1.detach()}


@torch.no_grad()
def evaluate(probe: LinearProbe, dataset: torch.utils.data.Dataset, batch_size: int,
             device: torch.device, num_workers: int = 0) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``probe`` on ``dataset``, over all ranks.

    Rank r classifies the items r, r + world, ... (the images a per-rank cache holds); the
    counts are summed over ranks.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, num_workers=num_workers)
    was_training = probe.training
    probe.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, total
    for batch in loader:
        logits = probe.logits(batch["crops"][0].to(device, non_blocking=True))
        target = batch["label"].to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == target).sum()
        counts[1] += (top == target[:, None]).any(dim=1).sum()
        counts[2] += len(target)
    probe.train(was_training)
    hits1, hits5, total = dist.all_reduce_sum(counts).tolist()
    return {"top1": 100 * hits1 / total, "top5": 100 * hits5 / total}


class LinearEval:
    """Linear evaluation: SGD (``lr`` per 256 images, scaled to ``batch_size``), cosine schedule
    with ``warmup_epochs`` of linear warmup, ``epochs`` passes, train augmentation ``linear``,
    validation with the evaluation transform. Other loop settings (precision, workers,
    checkpointing, ``max_steps``) come from ``trainer``.
    """

    def __init__(self, epochs: float = 100.0, batch_size: int = 256, lr: float = 30.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, warmup_epochs: float = 5.0,
                 bn_train_mode: bool = False, pretrain_first: bool = False) -> None:
        self.epochs, self.batch_size = epochs, batch_size
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.warmup_epochs = warmup_epochs
        self.bn_train_mode = bn_train_mode
        self.pretrain_first = pretrain_first

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        if not self.pretrain_first:
            if not cfg.pretrained:
                raise ValueError("task=linear needs pretrained=PATH (a current.pth of a pretraining"
                                 " run), or task.pretrain_first=true to pretrain in this run")
            return self.evaluate_checkpoint(cfg, Path(cfg.pretrained), out_dir)
        if cfg.pretrained:
            raise ValueError(f"task.pretrain_first=true pretrains in this run; pretrained="
                             f"{cfg.pretrained} would be ignored: drop one of the two")
        results = _pretrain(cfg, out_dir)
        if results.get("stopped_by"):
            return results
        # One experiment, one W&B run: the evaluation continues the pretraining's run.
        linear = self.evaluate_checkpoint(cfg, out_dir / "current.pth", out_dir / "linear",
                                          (results.get("run_id"), out_dir, results["steps"]))
        results.update({k: v for k, v in linear.items() if k.startswith("linear_")})
        write_results(out_dir, results)
        return results

    def evaluate_checkpoint(self, cfg: DictConfig, pretrained: Path, out_dir: Path,
                            continued: tuple[str | None, Path, int] | None = None
                            ) -> dict[str, Any]:
        """Train and evaluate a probe on ``pretrained``'s backbone; results in ``out_dir``.
        ``continued``: (run id, run dir, steps) of the pretraining whose logger run the
        evaluation continues, under ``linear/`` names."""
        out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        trainer = instantiate(cfg.trainer, epochs=self.epochs, batch_size=self.batch_size)
        rank, world = dist.get_rank(), dist.get_world_size()
        data = instantiate(cfg.data)
        train_set = data.build("train", linear_augmentation(data.image_size, data.mean, data.std),
                               rank, world)
        _, val_set = eval_splits(data)
        labels = torch.tensor([train_set.label(i) for i in range(len(train_set))])
        backbone = load_backbone(instantiate(cfg.backbone), pretrained)
        probe = LinearProbe(backbone, data.num_classes, labels,
                            self.bn_train_mode).to(trainer.device)
        sampler = train_sampler(EpochSampler, train_set, cfg.seed)
        optimizer = sgd(probe, self.batch_size, self.lr, self.momentum, self.weight_decay)
        eval_batch = trainer.per_rank_batch()

        # Per-epoch accuracies live beside the checkpoint so that a resumed run reports them
        # all; an epoch evaluated again after a resume replaces its earlier entry.
        history_path = out_dir / "linear_history.json"
        history: dict[float, dict[str, float]] = {}
        if cfg.auto_resume and history_path.is_file():
            history = {row["epoch"]: row for row in json.loads(history_path.read_text())}

        def record(passes: float) -> dict[str, float]:
            scores = evaluate(probe, val_set, eval_batch, trainer.device, trainer.num_workers)
            history[passes] = {"epoch": passes, **scores}
            if dist.is_main():
                rows = [history[e] for e in sorted(history)]
                atomic_write_text(json.dumps(rows, indent=1) + "\n", history_path)
            log.info("linear epoch %.2f: top-1 %.2f%%, top-5 %.2f%%", passes, scores["top1"],
                     scores["top5"])
            return {f"val_{k}": v for k, v in scores.items()}

        logger = make_logger(cfg)
        if continued is not None:
            logger.continue_run(*continued, prefix="linear/")
        summary = trainer.fit(probe, train_set, sampler, optimizer,
                              Cosine(warmup_epochs=self.warmup_epochs), out_dir, logger, cfg.seed,
                              resume=cfg.auto_resume, epoch_end=record, config=config_dict(cfg))
        if summary["stopped_by"]:  # leave now: a scheduler's grace period is short
            return summary
        if summary["epochs"] not in history:  # stopped between epochs (max_steps, preemption)
            logger.log(record(summary["epochs"]), summary["steps"])
        rows = [history[e] for e in sorted(history) if e <= summary["epochs"]]
        best = max(rows, key=lambda r: r["top1"])
        results = {
            "linear_top1": rows[-1]["top1"], "linear_top5": rows[-1]["top5"],
            "linear_best_top1": best["top1"], "linear_best_top5": best["top5"],
            "linear_best_epoch": best["epoch"], "linear_history": rows,
            "pretrained": str(pretrained), "bn_train_mode": self.bn_train_mode,
            **{k: v for k, v in summary.items() if k != "loss_history"},
        }
        logger.summary({k: v for k, v in results.items() if k != "linear_history"})
        logger.finish()
        write_results(out_dir, results)
        if dist.is_main():
            print(f"linear top-1 {results['linear_top1']:.2f}%  top-5 "
                  f"{results['linear_top5']:.2f}%  (best top-1 {best['top1']:.2f}% at epoch "
                  f"{best['epoch']:g}; {pretrained})", flush=True)
        return results


def _pretrain(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """``task=pretrain`` in ``out_dir``, skipped when a run of the whole schedule is there."""
    from .pretrain import Pretrain

    done = out_dir / "results.json"
    if cfg.auto_resume and done.is_file():
        results = json.loads(done.read_text())
        if results["steps"] >= results["total_steps"]:
            log.info("pretraining in %s already completed: evaluating it", out_dir)
            return results
    return Pretrain().run(cfg, out_dir)

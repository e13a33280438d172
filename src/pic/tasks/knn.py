"""``task=knn pretrained=PATH``: weighted kNN accuracy of a checkpoint's backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from ..config import config_dict
from ..engine.trainer import resolve_device
from .common import eval_splits, make_logger, write_results
from .linear import load_backbone


class KNNTask:
    def __init__(self, device: str = "auto", num_workers: int = 2) -> None:
        self.device = resolve_device(device)
        self.num_workers = num_workers

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        if not cfg.pretrained:
            raise ValueError("task=knn needs pretrained=PATH (a current.pth of a pretraining run)")
        backbone = load_backbone(instantiate(cfg.backbone), cfg.pretrained)
        data = instantiate(cfg.data)
        bank_set, val_set = eval_splits(data)
        knn = instantiate(cfg.eval)
        scores = knn.evaluate(backbone.to(self.device), bank_set, val_set, data.num_classes,
                              self.device, self.num_workers)
        results = {"knn_top1": scores["top1"], "knn_top5": scores["top5"],
                   "pretrained": str(cfg.pretrained), "k": knn.k, "temperature": knn.temperature}
        write_results(out_dir, results)
        logger = make_logger(cfg)  # a run with the config and these metrics (job_type knn)
        logger.start(out_dir, config_dict(cfg))
        logger.summary(results)
        logger.finish()
        print(f"kNN top-1 {scores['top1']:.2f}%  top-5 {scores['top5']:.2f}%  ({cfg.pretrained})")
        return results

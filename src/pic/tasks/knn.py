"""``task=knn pretrained=PATH``: weighted kNN accuracy of a checkpoint, beside the same network
at random init and the raw pixels."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..config import config_dict
from ..engine.checkpoint import load_backbone, load_encoder, seed_everything
from ..engine.features import encoder_of, eval_results, evaluate, headline, pixels
from ..engine.trainer import resolve_device
from ..provenance import provenance
from .common import eval_splits, make_logger, write_results


class KNNTask:
    """kNN (``cfg.eval``: every k × T, on backbone or head features) of ``pretrained``; with
    ``baselines`` also of the same network at random init (seeded by ``cfg.seed``) and of the
    raw pixels."""

    def __init__(self, device: str = "auto", num_workers: int = 2, baselines: bool = True) -> None:
        self.device = resolve_device(device)
        self.num_workers = num_workers
        self.baselines = baselines

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        if not cfg.pretrained:
            raise ValueError("task=knn needs pretrained=PATH (a current.pth of a pretraining run)")
        data = instantiate(cfg.data)
        bank_set, val_set = eval_splits(data)
        knn = instantiate(cfg.eval)
        scored = partial(evaluate, bank_set=bank_set, val_set=val_set, knn=knn, probe=None,
                         num_classes=data.num_classes, device=self.device,
                         num_workers=self.num_workers)
        networks = {"trained": self._encoder(cfg, knn.features, len(bank_set), cfg.pretrained)}
        if self.baselines:
            networks.update(random_init=self._encoder(cfg, knn.features, len(bank_set)),
                            pixels=pixels())
        results = {"pretrained": str(cfg.pretrained), **provenance(bank_set),
                   **eval_results(knn, {name: scored(net)[0] for name, net in networks.items()})}
        write_results(out_dir, results)
        logger = make_logger(cfg)  # a run with the config and these metrics (job_type knn)
        logger.start(out_dir, config_dict(cfg))
        logger.summary(results)
        logger.finish()
        print(f"kNN top-1, {headline(results)}; {cfg.pretrained}", flush=True)
        return results

    def _encoder(self, cfg: DictConfig, features: str, num_instances: int,
                 pretrained: str | None = None) -> torch.nn.Module:
        """The evaluated network built by this config: random init (seeded), or ``pretrained``'s
        weights. Head features need the method (its head), backbone features the backbone only."""
        seed_everything(cfg.seed)
        backbone = instantiate(cfg.backbone)
        if features == "backbone":
            net = load_backbone(backbone, pretrained) if pretrained else backbone
            return net.to(self.device)
        model = instantiate(cfg.model, backbone=backbone, num_instances=num_instances)
        model = load_encoder(model, pretrained) if pretrained else model
        return encoder_of(model.to(self.device), features)

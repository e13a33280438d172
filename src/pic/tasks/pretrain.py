"""``task=pretrain``: self-supervised training of any method, then kNN evaluation."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .. import dist
from ..config import config_dict
from ..engine.checkpoint import atomic_write_text, seed_everything
from ..engine.knn import extract_features
from .common import eval_splits, make_logger, train_sampler, write_results

log = logging.getLogger(__name__)


class Pretrain:
    """Pretrain ``cfg.model`` on ``cfg.data``; compare kNN accuracy with the random init.

    ``plot`` writes ``summary.png`` (loss curve + t-SNE of held-out features).
    """

    def __init__(self, knn_random_init: bool = True, plot: bool = True) -> None:
        self.knn_random_init = knn_random_init
        self.plot = plot

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        seed_everything(cfg.seed)
        trainer = instantiate(cfg.trainer)
        rank, world = dist.get_rank(), dist.get_world_size()
        data = instantiate(cfg.data)
        train_set = data.build("train", instantiate(cfg.augmentation), rank, world)
        model = instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                            num_instances=len(train_set)).to(trainer.device)
        sampler = train_sampler(partial(instantiate, cfg.sampler), train_set, cfg.seed)
        optimizer = instantiate(cfg.optimizer, model=model, batch_size=trainer.batch_size)
        knn = instantiate(cfg.eval)
        bank_set, val_set = eval_splits(data)

        def knn_eval() -> dict[str, float]:
            return knn.evaluate(model.backbone, bank_set, val_set, data.num_classes,
                                trainer.device, trainer.num_workers)

        # The same network at its random initialisation: the baseline a method must beat.
        # Computed once, before the first step, and kept beside the checkpoint for resumes.
        random_path = out_dir / "knn_random_init.json"
        if self.knn_random_init and not random_path.is_file():
            baseline = knn_eval()
            if dist.is_main():
                random_path.write_text(json.dumps(baseline))
            dist.barrier()

        # The kNN monitor's curve survives resumes beside the checkpoint (the report plots it).
        history_path = out_dir / "knn_history.json"
        knn_history = (json.loads(history_path.read_text())
                       if cfg.auto_resume and history_path.is_file() else [])

        def epoch_end(passes: float) -> dict[str, float]:
            if not (knn.every and int(passes) % knn.every == 0 and passes - int(passes) < 1e-9):
                return {}
            scores = knn_eval()
            knn_history[:] = [h for h in knn_history if h["epoch"] != passes]
            knn_history.append({"epoch": passes, **scores})
            if dist.is_main():
                atomic_write_text(json.dumps(knn_history), history_path)
            return {f"knn_{k}": v for k, v in scores.items()}

        logger = make_logger(cfg)
        summary = trainer.fit(model, train_set, sampler, optimizer, instantiate(cfg.schedule),
                              out_dir, logger, cfg.seed, resume=cfg.auto_resume,
                              epoch_end=epoch_end, config=config_dict(cfg))
        if summary["stopped_by"]:  # leave now: a scheduler's grace period is short
            return summary
        results: dict[str, Any] = {k: v for k, v in summary.items() if k != "loss_history"}
        final = knn_eval()
        results.update(knn_top1=final["top1"], knn_top5=final["top5"], method=cfg.model._target_,
                       num_instances=len(train_set), world_size=world,
                       knn_history=sorted(knn_history, key=lambda h: h["epoch"]))
        if random_path.is_file():
            baseline = json.loads(random_path.read_text())
            results.update(knn_top1_random_init=baseline["top1"],
                           knn_top5_random_init=baseline["top5"])
        logger.summary({k: v for k, v in results.items() if not isinstance(v, list)})
        logger.finish()
        if self.plot:
            from ..logging.plots import plot_run

            # t-SNE is quadratic-ish: a fixed random subset of at most 5,000 held-out images.
            # The extraction all-gathers, so every rank takes part (only rank 0 keeps a loss
            # history); rank 0 draws.
            subset = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(0))
            subset = torch.utils.data.Subset(val_set, subset[:5000].sort().values.tolist())
            feats, labels = extract_features(model.backbone, subset, knn.batch_size,
                                             trainer.device)
        if self.plot and summary["loss_history"] and dist.is_main():
            steps, losses = zip(*summary["loss_history"], strict=True)
            plot_run(out_dir / "summary.png", list(steps), list(losses), feats.numpy(),
                     labels.numpy(), f"{cfg.name}: kNN top-1 {final['top1']:.1f}% "
                     f"(random init {results.get('knn_top1_random_init', float('nan')):.1f}%)")
        write_results(out_dir, results)
        if dist.is_main():
            _print_summary(cfg, out_dir, results)
        return results


def _print_summary(cfg: DictConfig, out_dir: Path, r: dict[str, Any]) -> None:
    rows = [
        ("trained", f"{cfg.name}: {cfg.model._target_.rsplit('.', 1)[-1]} on "
                    f"{cfg.data._target_.rsplit('.', 1)[-1]} ({r['num_instances']} images)"),
        ("length", f"{r['steps']} steps, {r['epochs']:.1f} epochs, {r['train_time_s']:.0f} s"),
        ("kNN top-1", f"{r['knn_top1']:.2f}%  (same network at random init: "
                      f"{r.get('knn_top1_random_init', float('nan')):.2f}%)"),
        ("skipped", f"{r['bad_steps']} non-finite steps, {r['replaced_images']} bad images"),
        ("artifacts", str(out_dir)),
    ]
    print("\n".join(f"{k:>10}  {v}" for k, v in rows), flush=True)

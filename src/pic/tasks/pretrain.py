"""``task=pretrain``: self-supervised training of any method, then its evaluation beside two
baselines: the same network at random initialisation, and the raw pixels."""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .. import dist
from ..config import config_dict
from ..engine.baseline_cache import baseline_context, cached_scores
from ..engine.checkpoint import atomic_write_text, seed_everything
from ..engine.features import (
    BASELINES,
    encoder_of,
    eval_results,
    evaluate,
    evaluate_many,
    headline,
    pixels,
)
from ..engine.online_probe import OnlineProbe
from ..engine.optim import scaled_lr
from ..engine.probe import FeatureProbe
from ..logging.history import MetricHistory
from ..provenance import provenance
from .common import eval_splits, make_logger, train_sampler, write_results

log = logging.getLogger(__name__)
# The t-SNE map's cost grows faster than its points; a fixed subset draws the same picture.
TSNE_POINTS = 1000


class Pretrain:
    """Pretrain ``cfg.model`` on ``cfg.data``, then score it with kNN (``cfg.eval``) and the
    ``probe`` on cached features (None: no probe).

    ``knn_random_init`` scores the same network at its random initialisation and ``pixels`` the
    flattened images, the same way (kNN and probe): computed once, before the first step, and
    kept beside the checkpoint for resumes. ``plot`` writes ``summary.png`` (loss curve + t-SNE
    of held-out features, the three results in its title). ``online_probe``: train a linear
    classifier on the detached backbone features of the training batches (SGD,
    ``online_probe_lr`` per 256 images, momentum 0.9) and report its validation top-1 beside
    every kNN evaluation (:mod:`pic.engine.online_probe`).
    """

    def __init__(self, knn_random_init: bool = True, pixels: bool = True,
                 probe: FeatureProbe | None = None, plot: bool = True,
                 online_probe: bool = False, online_probe_lr: float = 0.1) -> None:
        self.knn_random_init, self.pixels = knn_random_init, pixels
        self.probe, self.plot = probe, plot
        self.online_probe, self.online_probe_lr = online_probe, online_probe_lr

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        seed_everything(cfg.seed)
        trainer = instantiate(cfg.trainer)
        data = instantiate(cfg.data)
        train_set = data.build("train", instantiate(cfg.augmentation), dist.get_rank(),
                               dist.get_world_size())
        model = instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                            num_instances=len(train_set)).to(trainer.device)
        sampler = train_sampler(partial(instantiate, cfg.sampler), train_set, cfg.seed)
        optimizer = instantiate(cfg.optimizer, model=model, batch_size=trainer.batch_size)
        scoring = Scoring(cfg, data, model, trainer, out_dir)
        clock = time.perf_counter()
        baselines = self._baselines(cfg, out_dir, scoring)
        timing = {"baselines_time_s": time.perf_counter() - clock}
        scoring.online = self._online_probe(model, train_set, data.num_classes, trainer)
        logger = make_logger(cfg)
        origin = provenance(train_set)
        summary = trainer.fit(model, train_set, sampler, optimizer, instantiate(cfg.schedule),
                              out_dir, logger, cfg.seed, resume=cfg.auto_resume,
                              epoch_end=scoring.epoch_end, config=config_dict(cfg),
                              provenance=origin, allow_dataset_change=cfg.allow_dataset_change)
        if summary["stopped_by"]:  # leave now: a scheduler's grace period is short
            logger.finish()  # the requeued attempt resumes this W&B run: release it now
            return summary
        clock = time.perf_counter()
        final, val_f, val_y = scoring.score(scoring.encoder, probe=self.probe)
        timing["eval_time_s"] = time.perf_counter() - clock
        results = {k: v for k, v in summary.items() if k != "loss_history"}
        results.update(**timing, method=cfg.model._target_, num_instances=len(train_set),
                       world_size=dist.get_world_size(), **origin, **scoring.online_scores(),
                       knn_history=scoring.monitor.rows(),
                       **eval_results(scoring.knn, {"trained": final, **baselines}))
        logger.summary({k: v for k, v in results.items() if not isinstance(v, list | dict)})
        logger.finish()
        if self.plot and dist.is_main():
            clock = time.perf_counter()
            _plot(out_dir / "summary.png", summary["loss_history"], val_f, val_y,
                  f"{cfg.name}: {headline(results)}")
            results["plot_time_s"] = time.perf_counter() - clock
        write_results(out_dir, results)
        if dist.is_main():
            _print_summary(cfg, out_dir, results)
        return results

    def _online_probe(self, model: torch.nn.Module, train_set: Any, num_classes: int,
                      trainer: Any) -> OnlineProbe | None:
        """The online probe attached to ``model`` (None when ``online_probe`` is off)."""
        if not self.online_probe:
            return None
        labels = torch.tensor([train_set.label(i) for i in range(len(train_set))])
        probe = OnlineProbe(model.backbone.out_dim, num_classes, labels,
                            scaled_lr(self.online_probe_lr, trainer.batch_size))
        return probe.to(trainer.device).attach(model)

    def _baselines(self, cfg: DictConfig, out_dir: Path, scoring: Scoring
                   ) -> dict[str, dict[str, Any]]:
        """``{"random_init": scores, "pixels": scores}`` (those asked for), from
        ``baselines.json`` when a start of this run wrote it with the same evaluation
        settings."""
        path = out_dir / "baselines.json"
        settings = {"eval": config_dict(cfg.eval), "probe": config_dict(cfg.task).get("probe")}
        wanted = [name for name, on in zip(BASELINES, (self.knn_random_init, self.pixels),
                                           strict=True) if on]
        done = json.loads(path.read_text()) if path.is_file() else {}
        if done.get("settings") != settings:  # a resume with other eval settings: score again
            done = {"settings": settings}
        missing = {name: scoring.encoder if name == "random_init" else pixels()
                   for name in wanted if name not in done}
        if missing:  # the user's cache, else one pass over the images for all of them
            done.update(cached_scores(missing, scoring.context, lambda networks: (
                scoring.score_many(networks, probe=self.probe)[0])))
        if dist.is_main():
            atomic_write_text(json.dumps(done), path)
        return {name: done[name] for name in wanted}


class Scoring:
    """How a pretraining run is scored on held-out features: kNN (``cfg.eval``) and a probe
    through :meth:`score`; every ``eval.every`` epochs the kNN monitor and the online probe
    (:meth:`epoch_end`), whose curve survives resumes beside the checkpoint (the report plots
    it)."""

    def __init__(self, cfg: DictConfig, data: Any, model: torch.nn.Module, trainer: Any,
                 out_dir: Path) -> None:
        self.knn = instantiate(cfg.eval)
        bank_set, self.val_set = eval_splits(data)
        common = {"bank_set": bank_set, "val_set": self.val_set, "knn": self.knn,
                  "num_classes": data.num_classes, "device": trainer.device,
                  "num_workers": trainer.num_workers}
        self.score = partial(evaluate, **common)
        self.score_many = partial(evaluate_many, **common)  # several networks, one pass
        self.context = baseline_context(cfg, bank_set, self.val_set, trainer.device)
        self.encoder = encoder_of(model, self.knn.features)
        self.model, self.trainer = model, trainer
        self.online: OnlineProbe | None = None
        self.monitor = MetricHistory(out_dir / "knn_history.json", cfg.auto_resume)

    def online_scores(self) -> dict[str, float]:
        """``online_probe_top1``/``_top5`` on the validation split ({} without the probe)."""
        if self.online is None:
            return {}
        probed = self.online.evaluate(self.model.backbone, self.val_set, self.knn.batch_size,
                                      self.trainer.device, self.trainer.num_workers)
        return {f"online_probe_{k}": v for k, v in probed.items()}

    def epoch_end(self, passes: float) -> dict[str, float]:
        """After a sampler-epoch, at ``passes`` over the data: the monitor's scores when a
        whole number of passes divisible by ``eval.every`` is reached, else {}."""
        every = self.knn.every
        if not (every and int(passes) % every == 0 and passes - int(passes) < 1e-9):
            return {}
        knn = self.score(self.encoder, probe=None)[0]["knn"][self.knn.headline]
        scores = {**knn, **self.online_scores()}
        self.monitor.record(passes, scores)
        return {k if k.startswith("online") else f"knn_{k}": v for k, v in scores.items()}

def _plot(path: Path, loss_history: list[tuple[int, float]], val_f: torch.Tensor,
          val_y: torch.Tensor, title: str) -> None:
    from ..logging.plots import plot_run

    keep = torch.randperm(len(val_y), generator=torch.Generator().manual_seed(0))
    keep = keep[:TSNE_POINTS].sort().values
    steps, losses = zip(*loss_history, strict=True) if loss_history else ((), ())
    plot_run(path, list(steps), list(losses), val_f[keep].numpy(), val_y[keep].numpy(), title)


def _print_summary(cfg: DictConfig, out_dir: Path, r: dict[str, Any]) -> None:
    ev = r["eval"]
    names = [n for n in ("trained", *BASELINES) if n in ev]

    def row(get: Any) -> str:
        return "".join(f"{get(ev[n]):>13.2f}" if get(ev[n]) is not None else f"{'–':>13}"
                       for n in names)

    rows = [
        ("trained", f"{cfg.name}: {cfg.model._target_.rsplit('.', 1)[-1]} on "
                    f"{cfg.data._target_.rsplit('.', 1)[-1]} ({r['num_instances']} images)"),
        ("length", f"{r['steps']} steps, {r['epochs']:.1f} epochs, {r['train_time_s']:.0f} s "
                   f"(evaluation {r['baselines_time_s'] + r['eval_time_s']:.0f} s)"),
        ("top-1 (%)", "".join(f"{n.replace('_', ' '):>13}" for n in names)
         + f"   ({r['eval_features']} features)"),
        *((f"kNN-{key[1:].replace('_t', ' T ')}", row(lambda e, key=key: e["knn"][key]["top1"]))
          for key in ev["trained"]["knn"]),
    ]
    if "probe" in ev["trained"]:
        rows.append(("probe", row(lambda e: e.get("probe", {}).get("top1"))))
    rows += [("skipped", f"{r['bad_steps']} non-finite steps, {r['replaced_images']} bad images"),
             ("artifacts", str(out_dir))]
    print("\n".join(f"{k:>14}  {v}" for k, v in rows), flush=True)

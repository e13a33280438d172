"""The one evaluation pass: each rank encodes its share of a dataset in eval mode.

kNN, the probe on cached features, the t-SNE plot and the linear task's validation all read a
dataset the same way: rank r takes the items ``r, r + world, ...`` (the images a per-rank cache
holds), the network runs in eval mode (BN running statistics) and gets its mode back after.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .. import dist
from .knn import KNN
from .probe import FeatureProbe

log = logging.getLogger(__name__)
Dataset = torch.utils.data.Dataset
BASELINES = ("random_init", "pixels")


def rank_loader(dataset: Dataset, batch_size: int,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The items ``rank::world`` of ``dataset``, in order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    return torch.utils.data.DataLoader(mine, batch_size=batch_size, num_workers=num_workers)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, in the mode it had after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def gather_rows(local: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """The rows of all ranks in dataset order: rank r holds the rows ``r::world`` of ``n``.

    local: ⌈n/world⌉ or ⌊n/world⌋ rows of any trailing shape → n rows, on CPU, on every rank.
    """
    world = dist.get_world_size()
    if world == 1:
        return local
    rows = -(-n // world)  # ranks hold ceil or floor of n / world rows: pad, gather, interleave
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = dist.all_gather(padded.to(device)).cpu().view(world, rows, *local.shape[1:])
    out = local.new_empty((n, *local.shape[1:]))
    for r in range(world):
        out[r::world] = gathered[r, :len(range(r, n, world))]
    return out


@torch.no_grad()
def extract_many(encoders: dict[str, nn.Module], dataset: Dataset, batch_size: int,
                 device: torch.device, num_workers: int = 0
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each encoder's outputs (N×D float32, on CPU, not normalised) and the labels (N) of a
    whole dataset, identical on every rank, from ONE pass over its images (each is decoded once
    for all encoders). Items carry one view (``crops[0]``)."""
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    labels = []
    with ExitStack() as modes:
        for encoder in encoders.values():
            modes.enter_context(eval_mode(encoder))
        for batch in rank_loader(dataset, batch_size, num_workers):
            x = batch["crops"][0].to(device, non_blocking=True)
            for name, encoder in encoders.items():
                feats[name].append(encoder(x).float().flatten(1).cpu())
            labels.append(batch["label"])
    n = len(dataset)  # type: ignore[arg-type]
    return ({name: gather_rows(torch.cat(f), n, device) for name, f in feats.items()},
            gather_rows(torch.cat(labels), n, device))


def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int,
                     device: torch.device, num_workers: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder``'s outputs (N×D) and the labels (N) of a whole dataset (see ``extract_many``)."""
    feats, labels = extract_many({"encoder": encoder}, dataset, batch_size, device, num_workers)
    return feats["encoder"], labels


def encoder_of(model: nn.Module, features: str) -> nn.Module:
    """The network evaluated: a method's pooled ``backbone`` output, or its ``head`` output
    (backbone then projection head, as Wu et al. evaluate kNN)."""
    if features == "backbone":
        return model.backbone
    if features == "head":
        return nn.Sequential(model.encoder.backbone, model.encoder.head)
    raise ValueError(f"eval.features={features!r}: choose backbone or head")


def pixels() -> nn.Module:
    """The raw-pixel baseline's "encoder": the normalised image at eval size, flattened."""
    return nn.Flatten()


def evaluate(encoder: nn.Module, bank_set: Dataset, val_set: Dataset, knn: KNN,
             probe: FeatureProbe | None, num_classes: int, device: torch.device,
             num_workers: int = 0) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """kNN for every ``k`` × ``T`` of ``knn`` and, unless ``probe`` is None, the probe on the
    same cached features: ``({"knn": {key: {top1, top5}}, "probe": {...}}, val features M×D,
    val labels M)``. Every rank gets the same result. The bank is ``knn.bank(bank_set)``."""
    scores, val_f, val_y = evaluate_many({"encoder": encoder}, bank_set, val_set, knn, probe,
                                         num_classes, device, num_workers)
    return scores["encoder"], val_f["encoder"], val_y


def evaluate_many(encoders: dict[str, nn.Module], bank_set: Dataset, val_set: Dataset,
                  knn: KNN, probe: FeatureProbe | None, num_classes: int, device: torch.device,
                  num_workers: int = 0
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor], torch.Tensor]:
    """``evaluate`` for several encoders from one pass over each split: per name its scores
    and val features (M×D), and the val labels (M). Logs each phase's time."""
    clock = time.perf_counter()
    train_f, train_y = extract_many(encoders, knn.bank(bank_set), knn.batch_size, device,
                                    num_workers)
    val_f, val_y = extract_many(encoders, val_set, knn.batch_size, device, num_workers)
    log.info("evaluation of %s: features of %d + %d images, %.1f s", ", ".join(encoders),
             len(train_y), len(val_y), time.perf_counter() - clock)
    scores: dict[str, dict[str, Any]] = {}
    for name in encoders:
        clock = time.perf_counter()
        scores[name] = {"knn": knn.score(train_f[name], train_y, val_f[name], val_y,
                                         num_classes)}
        line = (f"evaluation of {name}: kNN ({len(knn.k) * len(knn.temperature)} k × T) "
                f"{time.perf_counter() - clock:.1f} s")
        if probe is not None:
            clock = time.perf_counter()
            scores[name]["probe"] = probe.fit(train_f[name], train_y, val_f[name], val_y,
                                              num_classes)
            line += (f", probe ({train_f[name].shape[1]}-d, {len(probe.lr)} lr × "
                     f"{len(probe.weight_decay)} wd) {time.perf_counter() - clock:.1f} s")
        log.info("%s", line)
    return scores, val_f, val_y


def eval_results(knn: KNN, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``results.json``'s evaluation keys. Flat, for tables: ``knn_top1`` / ``knn_top5`` (the
    first k × T) and ``probe_top1`` / ``probe_top5`` of the trained network, the same with
    ``_random_init`` and ``_pixels`` for the baselines. Nested: ``eval`` with every k × T of
    each and the probe's chosen lr and weight decay. ``eval_features``: backbone or head."""
    flat: dict[str, Any] = {}
    for name, s in scores.items():
        suffix = "" if name == "trained" else f"_{name}"
        flat.update({f"knn_{m}{suffix}": s["knn"][knn.headline][m] for m in ("top1", "top5")})
        if "probe" in s:
            flat.update({f"probe_{m}{suffix}": s["probe"][m] for m in ("top1", "top5")})
    return {**flat, "eval_features": knn.features,
            "eval": {"k": knn.k, "temperature": knn.temperature, "headline": knn.headline,
                     **scores}}


def headline(r: dict[str, Any]) -> str:
    """``kNN-20 top-1 a / b / c, probe d / e / f`` for trained / random init / pixels."""
    def three(metric: str) -> str:
        return " / ".join(f"{r[metric + s]:.1f}" if metric + s in r else "–"
                          for s in ("", "_random_init", "_pixels"))

    text = f"kNN-{r['eval']['k'][0]} {three('knn_top1')}"
    if "probe_top1" in r:
        text += f", probe {three('probe_top1')}"
    return text + " (trained / random init / pixels)"

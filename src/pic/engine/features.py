"""The one evaluation pass: each rank encodes its share of a dataset in eval mode.

kNN, the probe on cached features, the t-SNE plot and the linear task's validation all read a
dataset the same way: rank r takes the items ``r, r + world, ...`` (the images a per-rank cache
holds), the network runs in eval mode (BN running statistics) and gets its mode back after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import dist
from .knn import KNN
from .probe import FeatureProbe

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
def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int,
                     device: torch.device, num_workers: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder``'s outputs (N×D float32, on CPU, not normalised) and the labels (N) of a
    whole dataset, identical on every rank. Items carry one view (``crops[0]``)."""
    feats, labels = [], []
    with eval_mode(encoder):
        for batch in rank_loader(dataset, batch_size, num_workers):
            x = batch["crops"][0].to(device, non_blocking=True)
            feats.append(encoder(x).float().flatten(1).cpu())
            labels.append(batch["label"])
    n = len(dataset)  # type: ignore[arg-type]
    return gather_rows(torch.cat(feats), n, device), gather_rows(torch.cat(labels), n, device)


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
    train_f, train_y = extract_features(encoder, knn.bank(bank_set), knn.batch_size, device,
                                        num_workers)
    val_f, val_y = extract_features(encoder, val_set, knn.batch_size, device, num_workers)
    scores: dict[str, Any] = {"knn": knn.score(train_f, train_y, val_f, val_y, num_classes)}
    if probe is not None:
        scores["probe"] = probe.fit(train_f, train_y, val_f, val_y, num_classes)
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

"""Weighted k-nearest-neighbour evaluation of backbone features (Wu et al. 2018)."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..bounds import Positive


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
                     device: torch.device, num_workers: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features (N×D, float32, on CPU) and labels (N) of a whole dataset.

    Each rank encodes the indices ``rank::world``; the result is gathered and identical on every
    rank. Items must carry one view (``crops[0]``).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(dataset)  # type: ignore[arg-type]
    mine = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine),
                                         batch_size=batch_size, num_workers=num_workers)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for batch in loader:
        x = batch["crops"][0].to(device, non_blocking=True)
        feats.append(F.normalize(backbone(x).float(), dim=1).cpu())
        labels.append(batch["label"])
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return f, y
    # Ranks hold ceil or floor of n / world rows: pad to the same length, gather, interleave.
    rows = -(-n // world)
    pad_f = torch.zeros(rows, f.shape[1]).index_copy_(0, torch.arange(len(f)), f)
    pad_y = torch.full((rows,), -1, dtype=y.dtype).index_copy_(0, torch.arange(len(y)), y)
    gf = dist.all_gather(pad_f.to(device)).cpu().view(world, rows, -1)
    gy = dist.all_gather(pad_y.to(device)).cpu().view(world, rows)
    out_f, out_y = torch.empty(n, f.shape[1]), torch.empty(n, dtype=y.dtype)
    for r in range(world):
        count = len(range(r, n, world))
        out_f[r::world], out_y[r::world] = gf[r, :count], gy[r, :count]
    return out_f, out_y


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                query_features: torch.Tensor, num_classes: int, k: int, temperature: float,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q×C): sum over the k most similar training rows of exp(cos/T) per class.

    Features must be L2-normalised: train N×D, query Q×D; labels N.
    """
    k = min(k, len(train_features))
    scores = []
    for q in query_features.split(chunk):
        sim, idx = (q @ train_features.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, dtype=weight.dtype)
        votes.scatter_add_(1, train_labels[idx], weight)
        scores.append(votes)
    return torch.cat(scores)


class KNN:
    """kNN evaluation settings; ``every`` (epochs) enables a monitor during pretraining."""

    def __init__(self, k: Annotated[int, Positive] = 200,
                 temperature: Annotated[float, Positive] = 0.07,
                 every: Annotated[int | None, Positive] = None,
                 batch_size: Annotated[int, Positive] = 256) -> None:
        self.k, self.temperature, self.every, self.batch_size = k, temperature, every, batch_size

    def evaluate(self, backbone: nn.Module, train_set: torch.utils.data.Dataset,
                 val_set: torch.utils.data.Dataset, num_classes: int, device: torch.device,
                 num_workers: int = 0) -> dict[str, float]:
        """Top-1 and top-5 accuracy (percent) of ``val_set`` against ``train_set`` features."""
        train_f, train_y = extract_features(backbone, train_set, self.batch_size, device,
                                            num_workers)
        val_f, val_y = extract_features(backbone, val_set, self.batch_size, device, num_workers)
        scores = knn_predict(train_f, train_y, val_f, num_classes, self.k, self.temperature)
        top = scores.topk(min(5, num_classes), dim=1).indices
        top1 = (top[:, 0] == val_y).float().mean().item() * 100
        top5 = (top == val_y[:, None]).any(dim=1).float().mean().item() * 100
        return {"top1": top1, "top5": top5}

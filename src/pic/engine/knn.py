"""Weighted k-nearest-neighbour evaluation of backbone features (Wu et al. 2018)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from torch.nn import functional as F

from ..bounds import Positive


def neighbours(train_features: torch.Tensor, query_features: torch.Tensor, k: int,
               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices (Q×k each, most similar first) of each query's k nearest
    training rows; features L2-normalised, train N×D, query Q×D."""
    k = min(k, len(train_features))
    pairs = [(q @ train_features.T).topk(k, dim=1) for q in query_features.split(chunk)]
    return torch.cat([p.values for p in pairs]), torch.cat([p.indices for p in pairs])


def vote(sim: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
         k: int, temperature: float) -> torch.Tensor:
    """Class scores (Q×C): over the first k neighbours (``neighbours``' output), the sum of
    exp(cos/T) per class."""
    weight = (sim[:, :k] / temperature).exp()
    votes = torch.zeros(len(sim), num_classes, dtype=weight.dtype)
    return votes.scatter_add_(1, train_labels[idx[:, :k]], weight)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                query_features: torch.Tensor, num_classes: int, k: int, temperature: float,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q×C): sum over the k most similar training rows of exp(cos/T) per class.

    Features must be L2-normalised: train N×D, query Q×D; labels N.
    """
    sim, idx = neighbours(train_features, query_features, k, chunk)
    return vote(sim, idx, train_labels, num_classes, k, temperature)


class KNN:
    """kNN settings: every ``k`` × ``temperature`` is scored (the first pair is the headline);
    ``features`` (``backbone`` | ``head``) says which output of a method is evaluated; ``every``
    (epochs) enables a monitor during pretraining. ``bank_size``: None, the whole training
    split is the kNN bank and the probe's training set; a number, that many of its images drawn
    without replacement regardless of label, seeded by ``bank_seed`` (:meth:`bank`)."""

    def __init__(self, k: Annotated[int | list[int], Positive] = (20, 200),
                 temperature: Annotated[float | list[float], Positive] = (0.07, 0.1),
                 features: str = "backbone", every: Annotated[int | None, Positive] = None,
                 batch_size: Annotated[int, Positive] = 256,
                 bank_size: Annotated[int | None, Positive] = None, bank_seed: int = 0) -> None:
        self.k = [k] if isinstance(k, int) else list(k)
        self.temperature = ([temperature] if isinstance(temperature, int | float)
                            else list(temperature))
        if not self.k or not self.temperature:
            raise ValueError(f"eval.k={k}, eval.temperature={temperature}: give at least one "
                             f"value each")
        if features not in ("backbone", "head"):
            raise ValueError(f"eval.features={features!r}: choose backbone or head")
        self.features, self.every, self.batch_size = features, every, batch_size
        self.bank_size, self.bank_seed = bank_size, bank_seed

    def bank(self, train_set: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """The training images evaluation reads: all, or ``bank_size`` of them in index order,
        the same for a given ``bank_seed`` (O(bank_size) work: Floyd's sampling, no
        permutation of N)."""
        n = len(train_set)  # type: ignore[arg-type]
        if self.bank_size is None or self.bank_size >= n:
            return train_set
        chosen = np.random.default_rng([self.bank_seed]).choice(n, self.bank_size, replace=False)
        return torch.utils.data.Subset(train_set, np.sort(chosen).tolist())

    def score(self, train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
              val_y: torch.Tensor, num_classes: int) -> dict[str, dict[str, float]]:
        """Top-1/top-5 (percent) of the val rows (M×D) against the train rows (N×D), for every
        ``k`` × ``temperature``, keyed ``k{k}_t{T}``; features are L2-normalised here."""
        train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
        # The neighbours of the largest k serve every smaller k (topk is sorted).
        sim, idx = neighbours(train_f, val_f, max(self.k))
        out = {}
        for k in self.k:
            for t in self.temperature:
                scores = vote(sim, idx, train_y, num_classes, k, t)
                top = scores.topk(min(5, num_classes), dim=1).indices
                out[knn_key(k, t)] = {
                    "top1": (top[:, 0] == val_y).float().mean().item() * 100,
                    "top5": (top == val_y[:, None]).any(dim=1).float().mean().item() * 100}
        return out

    @property
    def headline(self) -> str:
        return knn_key(self.k[0], self.temperature[0])


def knn_key(k: int, temperature: float) -> str:
    return f"k{k}_t{temperature:g}"

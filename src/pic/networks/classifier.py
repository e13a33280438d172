"""PIC's instance classifier: one weight row per training image, used through cosine logits."""

from __future__ import annotations

import torch
from torch import nn


class InstanceClassifier(nn.Module):
    """N×D weight ``W``; logits of a feature f are normalize(f)·normalize(W)ᵀ / τ.

    ``init_norm=None`` draws W element-wise from normal(0, 0.01) as in the paper (row norm
    ≈ 0.01·√D); a number rescales every row to that norm. The gradient through normalize(W)
    scales as 1/‖w‖, so pick the norm together with the learning rate.
    """

    def __init__(self, num_instances: int, dim: int, init_norm: float | None = None) -> None:
        super().__init__()
        weight = torch.randn(num_instances, dim) * 0.01
        if init_norm is not None:
            weight = nn.functional.normalize(weight, dim=1) * init_norm
        self.weight = nn.Parameter(weight)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to score against (C×D) and each label's row in them (B)."""
        return self.weight, labels

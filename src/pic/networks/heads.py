"""Projection heads and the multi-crop encoder."""

from __future__ import annotations

import torch
from torch import nn


def projection_head(in_dim: int, out_dim: int, mlp: bool = True) -> nn.Module:
    """``in → in → ReLU → out`` with biases, no BN (PIC, MoCo v2, SimCLR); or one linear layer."""
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                         nn.Linear(in_dim, out_dim))


class MultiCropEncoder(nn.Module):
    """Backbone + head over a list of crops, one pass per run of equal-resolution crops.

    Crops of the same size are concatenated along the batch so that BN statistics are computed
    per resolution group (as PIC and SwAV do) and the backbone runs once per group; methods never
    branch on the number or size of crops.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """crops: list of B×3×H_i×W_i → list of B×D outputs, in the same order."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = torch.cat(crops[start:end])
            outputs.extend(self.head(self.backbone(group)).chunk(end - start))
            start = end
        return outputs

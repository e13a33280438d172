"""Projection heads and the multi-crop encoder."""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import statistics_per_chunk


def projection_head(in_dim: int, out_dim: int, mlp: bool = True, batch_norm: bool = False
                    ) -> nn.Module:
    """``in → in → ReLU → out`` with biases, no BN (PIC, MoCo v2, the PIC authors' SimCLR); or
    one linear layer (``mlp=False``: InstDisc, MoCo v1).

    ``batch_norm``: Google's SimCLR head, BN after every linear layer and no bias anywhere
    (BN's shift replaces it), the last BN without shift either: ``in → BN → ReLU → out → BN``;
    a linear head becomes ``in → out → BN``.
    """
    if not batch_norm:
        if not mlp:
            return nn.Linear(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                             nn.Linear(in_dim, out_dim))
    last = nn.BatchNorm1d(out_dim)
    last.register_parameter("bias", None)
    if not mlp:
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), last)
    return nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim),
                         nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim, bias=False), last)


class MultiCropEncoder(nn.Module):
    """Backbone + head over a list of crops, one pass per run of equal-resolution crops.

    Crops of the same size are concatenated along the batch and the backbone runs once per
    resolution group; methods never branch on the number or size of crops. BN statistics
    cover the whole group (SwAV, Google's SimCLR) or, with ``bn_per_crop``, each crop's B rows
    on their own (the PIC authors' code, which runs the encoder once per crop): ghost-batch
    statistics of :class:`~pic.networks.batchnorm.BatchNorm`, which the encoder's BN layers
    must be (see :func:`~pic.networks.batchnorm.convert_batchnorm`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, bn_per_crop: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.bn_per_crop = bn_per_crop

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """crops: list of B×3×H_i×W_i → list of B×D outputs, in the same order."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = torch.cat(crops[start:end])
            with statistics_per_chunk(self, end - start if self.bn_per_crop else 1):
                outputs.extend(self.head(self.backbone(group)).chunk(end - start))
            start = end
        return outputs

"""SimCLR (Chen et al. 2020): NT-Xent between two views over the global batch.

The projections of every rank are gathered **with** gradient, so each view is contrasted with
the 2·B_global − 2 other views of the whole batch and the gradient of every negative reaches
the rank that computed it. With ``sync_bn`` (the paper's setting) BN statistics also cover the
global batch when the run is distributed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..losses import nt_xent
from ..networks.batchnorm import convert_batchnorm
from .base import Method


class SimCLR(Method):
    def __init__(self, backbone: nn.Module, num_instances: int | None = None,
                 feature_dim: int = 128, mlp_head: bool = True, temperature: float = 0.1,
                 sync_bn: bool = True, bn_per_crop: bool = False,
                 head_batch_norm: bool = False) -> None:
        """``num_instances`` is accepted because the pretrain task passes it to every method;
        SimCLR keeps no per-instance state. ``head_batch_norm``: Google's head (BN in every
        layer, no bias in the last); ``bn_per_crop``: each view's own BN statistics (the PIC
        authors' code) rather than both views' together (Google's)."""
        super().__init__(backbone, feature_dim, mlp_head, bn_per_crop, head_batch_norm)
        self.temperature = temperature
        if sync_bn and dist.is_dist():
            convert_batchnorm(self.encoder, sync=True)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """crops: two views, B×3×H×W each; index: unused by SimCLR."""
        if len(crops) != 2:
            raise ValueError(f"SimCLR takes 2 views per image, got {len(crops)}: set "
                             "augmentation.num_views=2")
        z1, z2 = (dist.all_gather_with_grad(z) for z in self.encoder(crops))
        loss = nt_xent(z1, z2, self.temperature)
        positive_sim = F.cosine_similarity(z1.detach(), z2.detach()).mean()
        return loss, {"loss": loss.detach(), "positive_sim": positive_sim}

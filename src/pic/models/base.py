"""The one interface every method implements."""

from __future__ import annotations

import torch
from torch import nn

from ..networks.batchnorm import convert_batchnorm
from ..networks.heads import MultiCropEncoder, projection_head


class Method(nn.Module):
    """A self-supervised method: an encoder (backbone + head) and a loss over crop groups.

    ``forward(crops, index)`` takes the list of crop batches (B×3×H×W each, grouped by
    resolution, largest first) and the instance indices (B) and returns the scalar loss and a
    dict of scalar metric tensors (not yet synchronised; the trainer reduces them when it logs).
    State the method keeps between steps (bank, queue, key encoder) lives in buffers or
    submodules, so it is part of ``state_dict`` and of every checkpoint.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int = 128, mlp_head: bool = True,
                 bn_per_crop: bool = False, head_batch_norm: bool = False) -> None:
        """``bn_per_crop``: BN statistics per crop of B images rather than per resolution group
        (:class:`~pic.networks.heads.MultiCropEncoder`); ``head_batch_norm``: BN in the head
        (:func:`~pic.networks.heads.projection_head`)."""
        super().__init__()
        head = projection_head(backbone.out_dim, feature_dim, mlp_head, head_batch_norm)
        self.encoder = MultiCropEncoder(backbone, head, bn_per_crop)
        if bn_per_crop:
            convert_batchnorm(self.encoder, sync=False)

    @property
    def backbone(self) -> nn.Module:
        """The network whose pooled features are evaluated (kNN, linear)."""
        return self.encoder.backbone

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, lr: float) -> None:
        """Called after every optimizer step (EMA updates, lazy classifier updates); ``lr`` is
        the learning rate the step used."""

"""The linear probe as a trainable of the platform's loop: a frozen backbone, one linear layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Trainable


class LinearProbe(Trainable):
    """A frozen backbone and one trainable linear layer on its pooled features.

    ``labels`` (N, int64) maps a training instance index to its class, since the trainer hands
    methods ``(crops, index)`` only. With ``bn_train_mode=False`` the backbone stays in eval mode
    even while the probe trains (BN running statistics frozen); ``True`` lets them drift, as the
    released code does. ``batch_norm`` puts a BatchNorm without affine parameters on the features
    before the linear layer (MAE's probe): the features' scale no longer sets the usable lr.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, labels: torch.Tensor,
                 bn_train_mode: bool = False, batch_norm: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.norm = (nn.BatchNorm1d(backbone.out_dim, affine=False) if batch_norm
                     else nn.Identity())
        self.fc = nn.Linear(backbone.out_dim, num_classes)
        # MoCo's linear-classification init; the probe's lr (30) is tuned for it.
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.bn_train_mode = bn_train_mode
        # Derived from the dataset at start-up, so not part of the checkpoint.
        self.register_buffer("labels", labels.long(), persistent=False)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if not self.bn_train_mode:
            self.backbone.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images B×3×H×W → class logits B×C (no gradient into the backbone)."""
        with torch.no_grad():
            features = self.backbone(images)
        return self.fc(self.norm(features))

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """crops: one B×3×H×W view; index: B instance indices → cross-entropy, train top-1."""
        logits = self.logits(crops[0])
        target = self.labels[index]
        loss = F.cross_entropy(logits.float(), target)
        top1 = (logits.argmax(dim=1) == target).float().mean() * 100
        return loss, {"loss": loss.detach(), "train_top1": top1.detach()}

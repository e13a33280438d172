"""PIC: parametric instance classification (Cao et al., NeurIPS 2020).

Every training image is its own class. Features (L2-normalised) are scored against one
classifier row per image with a cosine softmax at temperature τ; the label of an image is its
index. With multi-crop, only the large crops (the first resolution group) update the
classifier; the small crops are scored against the detached weight and train the encoder alone.

With ``num_negatives`` (or host/mmap storage) the classifier scores against the positives plus
K sampled rows and updates its rows itself, with exact weight update correction for the rest
(:class:`~pic.networks.classifier.SampledInstanceClassifier`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import instance_classification_loss
from ..networks.classifier import InstanceClassifier, SampledInstanceClassifier
from .base import Method


class PIC(Method):
    """PIC. The sampled classifier applies the run optimizer's SGD (m, λ, each step's lr) to
    its own rows, read from the optimizer :meth:`attach` gives it. ``storage_dir`` is where
    ``classifier_storage=mmap`` keeps its files (the run directory); ``classifier_order_seed``
    (the sliding-window sampler's seed) stores the rows in the sampler's order,
    ``classifier_dtype`` their precision."""

    def __init__(self, backbone: nn.Module, num_instances: int, feature_dim: int = 128,
                 mlp_head: bool = True, temperature: float = 0.2,
                 classifier_init_norm: float | None = None, num_negatives: int | None = None,
                 negative_sampling: str = "recent", weight_correction: bool = True,
                 classifier_storage: str = "device", storage_dir: str | None = None,
                 classifier_order_seed: int | None = None, classifier_dtype: str = "float32",
                 bn_per_crop: bool = False, head_batch_norm: bool = False) -> None:
        super().__init__(backbone, feature_dim, mlp_head, bn_per_crop, head_batch_norm)
        self.temperature = temperature
        self.classifier: InstanceClassifier | SampledInstanceClassifier
        if num_negatives is None and classifier_storage == "device":
            self.classifier = InstanceClassifier(num_instances, feature_dim, classifier_init_norm)
        else:
            self.classifier = SampledInstanceClassifier(
                num_instances, feature_dim, classifier_init_norm, num_negatives,
                negative_sampling, weight_correction, classifier_storage, storage_dir,
                classifier_order_seed, classifier_dtype)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.encoder(crops)
        large = [f for f, c in zip(features, crops, strict=True)
                 if c.shape[-2:] == crops[0].shape[-2:]]
        small = features[len(large):]
        weight, labels = self.classifier(index)
        loss = instance_classification_loss(torch.cat(large), weight, labels.repeat(len(large)),
                                            self.temperature)
        if small:
            small_loss = instance_classification_loss(
                torch.cat(small), weight.detach(), labels.repeat(len(small)), self.temperature)
            # The paper averages all rows in one cross-entropy: weight each part by its rows.
            loss = (loss * len(large) + small_loss * len(small)) / len(features)
        return loss, {"loss": loss.detach()}

    def attach(self, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None) -> None:
        self.classifier.attach(optimizer, scaler)

    def after_step(self) -> None:
        self.classifier.after_step()

    def sync_state(self) -> None:
        """Called by the trainer before every checkpoint: the classifier state made current."""
        if isinstance(self.classifier, SampledInstanceClassifier):
            self.classifier.sync_state()

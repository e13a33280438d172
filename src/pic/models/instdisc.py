"""InstDisc: non-parametric instance discrimination with a memory bank (Wu et al. 2018).

Each image i has a bank row v_i (N×D, L2-normalised). A query f (L2-normalised) is scored
against its own row and K rows drawn uniformly from the other N−1 images; the loss is softmax
cross-entropy over these 1+K scores at temperature τ (PIC's re-implementation) or the
original NCE. After each step the rows of the batch move towards the new features,
v_i ← normalize(m·v_i + (1−m)·f_i). Under DDP the indices and features of every rank are
gathered before the update, so the bank stays identical on all ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..losses import info_nce, nce_loss
from .base import Method

LOSSES = ("softmax", "nce")


class InstDisc(Method):
    def __init__(self, backbone: nn.Module, num_instances: int, feature_dim: int = 128,
                 mlp_head: bool = False, temperature: float = 0.07, num_negatives: int = 4096,
                 momentum: float = 0.5, loss: str = "softmax",
                 bn_per_crop: bool = False, head_batch_norm: bool = False) -> None:
        super().__init__(backbone, feature_dim, mlp_head, bn_per_crop, head_batch_norm)
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}: expected one of {list(LOSSES)}")
        if num_instances < 2:
            raise ValueError(f"InstDisc needs at least 2 training images, got {num_instances}")
        if num_negatives < 1:
            raise ValueError(f"model.num_negatives={num_negatives}: must be >= 1")
        self.temperature, self.momentum, self.loss = temperature, momentum, loss
        # A tiny dataset has fewer other images than the paper's K: use all of them.
        self.num_negatives = min(num_negatives, num_instances - 1)
        self.register_buffer("bank", F.normalize(torch.randn(num_instances, feature_dim), dim=1))
        # NCE's normalisation constant Z: estimated on the first step, then kept (0 = not yet).
        self.register_buffer("z", torch.zeros(()))

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """B×K bank rows drawn uniformly (with replacement) among the N−1 other images."""
        draw = torch.randint(0, self.bank.shape[0] - 1, (index.shape[0], self.num_negatives),
                             device=index.device)
        # Skip over the positive: values at or above it shift up by one.
        return draw + (draw >= index.unsqueeze(1)).long()

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """crops: V views of B×3×H×W (InstDisc uses V = 1; more are extra queries);
        index: B bank rows."""
        features = [F.normalize(f, dim=1) for f in self.encoder(crops)]
        query = torch.cat(features)
        labels = index.repeat(len(features))
        negatives = self.bank[self.sample_negatives(labels)]
        positive = self.bank[labels]
        if self.loss == "softmax":
            loss = info_nce(query, positive, negatives, self.temperature)
        else:
            if not self.z > 0:
                self._estimate_z(query, negatives)
            loss = nce_loss(query, positive, negatives, self.temperature,
                            self.bank.shape[0], float(self.z))
        # Gathered now (every rank's rows, so banks stay identical), applied in after_step.
        self.defer_update((dist.all_gather(index), dist.all_gather(features[0].detach())))
        positive_sim = (features[0].detach() * self.bank[index]).sum(1).mean()
        return loss, {"loss": loss.detach(), "positive_sim": positive_sim}

    def divergence_hint(self) -> str:
        if self.loss != "nce":
            return ""
        return (f"NCE's normaliser Z ({float(self.z):.3g}), estimated once at the first step "
                "and kept, no longer fits the features (model.loss=softmax needs none), ")

    def forward_state(self) -> list[torch.Tensor]:
        # NCE's Z is estimated in the first forward: a skipped first step must not keep it.
        return [*super().forward_state(), self.z]

    @torch.no_grad()
    def _estimate_z(self, query: torch.Tensor, negatives: torch.Tensor) -> None:
        """Z ≈ N·mean_j exp(q·v_j/τ) over the uniformly drawn rows, averaged over ranks."""
        scores = torch.bmm(negatives.float(), query.detach().float().unsqueeze(2))
        z = torch.exp(scores / self.temperature).mean() * self.bank.shape[0]
        self.z.fill_(dist.all_reduce_mean(z).item())

    @torch.no_grad()
    def after_step(self) -> None:
        """Move the batch's bank rows towards their new features (every rank's batch)."""
        update = self.deferred_update()
        if update is None:
            return
        index, features = update
        rows = self.bank[index] * self.momentum + features.to(self.bank.dtype) * (1 - self.momentum)
        self.bank.index_copy_(0, index, F.normalize(rows, dim=1))

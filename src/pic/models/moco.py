"""MoCo v1 / v2: momentum contrast (He et al. 2020; Chen et al. 2020).

A query encoder (trained) and a key encoder (its exponential moving average, θ_k ← m·θ_k +
(1−m)·θ_q). The query of view 1 is scored against the key of view 2 (positive, index 0) and a
queue of K keys of earlier batches (negatives) with InfoNCE at temperature τ. Keys are computed
with shuffle BN — the global batch is permuted across ranks before the key encoder, so BN
statistics cannot leak which samples are positives — then all-gathered and enqueued. v1 and v2
differ only in configuration (head, τ, augmentation, schedule): ``model=moco`` / ``mocov2``.

``exclude_own_keys`` (default on): each queue slot remembers the image its key came from, and a
query's own image's older keys are left out of its negatives. On ImageNet (K = 65,536 of 1.28M
images) a query meets its own older key about never, so this is the paper's loss; on a small
dataset, where the queue holds a key of most images (4,096 slots for the 1,257 digits: every
image three times), the stale copy of the positive would be a negative in nearly every step.
Measured, the exclusion is worth little; keeping the queue a fraction of N is what makes MoCo
learn on small data (README, "MoCo's queue on small datasets").
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..losses import info_nce
from .base import Method

log = logging.getLogger(__name__)


class MoCo(Method):
    def __init__(self, backbone: nn.Module, num_instances: int, feature_dim: int = 128,
                 mlp_head: bool = False, temperature: float = 0.07, queue_size: int = 65536,
                 momentum: float = 0.999, exclude_own_keys: bool = True,
                 bn_per_crop: bool = False, head_batch_norm: bool = False) -> None:
        super().__init__(backbone, feature_dim, mlp_head, bn_per_crop, head_batch_norm)
        if queue_size < 1:
            raise ValueError(f"model.queue_size={queue_size}: must be >= 1")
        if queue_size >= num_instances:
            log.warning("model.queue_size=%d is not smaller than the %d training images: every "
                        "image is queued, and MoCo learns far less than with a queue of a "
                        "fraction of them (README, 'MoCo's queue on small datasets')",
                        queue_size, num_instances)
        self.temperature, self.momentum = temperature, momentum
        self.exclude_own_keys = exclude_own_keys
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_encoder.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, feature_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # The image of each slot's key; -1: a slot still holding its random initial key.
        self.register_buffer("queue_index", torch.full((queue_size,), -1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint written before the queue recorded images resumes with them unknown (-1):
        # its keys stay negatives until the queue has turned over once.
        if prefix + "queue" in state_dict:
            state_dict.setdefault(prefix + "queue_index", torch.full(
                state_dict[prefix + "queue"].shape[:1], -1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a random permutation of the global batch.

        x: local B×… → (B×… rows of the permuted global batch, global permutation of size W·B).
        In one process it permutes the batch, which BN statistics do not see.
        """
        gathered = dist.all_gather(x)
        perm = dist.broadcast(torch.randperm(gathered.shape[0], device=x.device))
        start = dist.get_rank() * x.shape[0]
        return gathered[perm[start:start + x.shape[0]]], perm

    def unshuffle(self, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`shuffle`: y is this rank's B×… output for its permuted slice; returns
        the outputs of this rank's own samples, in their original order."""
        gathered = dist.all_gather(y)
        start = dist.get_rank() * y.shape[0]
        return gathered[torch.argsort(perm)[start:start + y.shape[0]]]

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """B×D L2-normalised keys of x (B×3×H×W) from the key encoder, with shuffle BN."""
        shuffled, perm = self.shuffle(x)
        return F.normalize(self.unshuffle(self.key_encoder([shuffled])[0], perm), dim=1)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """crops: two views, B×3×H×W each (query, key); index: B dataset indices of the
        images, which the queue records beside their keys."""
        if len(crops) != 2:
            raise ValueError(f"MoCo takes 2 views per image, got {len(crops)}: set "
                             "augmentation.num_views=2")
        global_batch = crops[0].shape[0] * dist.get_world_size()
        if self.queue.shape[0] % global_batch:
            raise ValueError(
                f"model.queue_size={self.queue.shape[0]} must be a multiple of the global batch "
                f"(trainer.batch_size={global_batch}) so that every enqueue fills whole slots")
        query = F.normalize(self.encoder([crops[0]])[0], dim=1)
        key = self.keys(crops[1])
        # The queue changes only in after_step, after backward has used it.
        own = index[:, None] == self.queue_index[None, :] if self.exclude_own_keys else None
        loss = info_nce(query, key, self.queue, self.temperature, exclude=own)
        # Enqueued in after_step, once the step is taken.
        self.defer_update((dist.all_gather(index), dist.all_gather(key)))
        positive_sim = (query.detach() * key).sum(1).mean()
        return loss, {"loss": loss.detach(), "positive_sim": positive_sim}

    @torch.no_grad()
    def after_step(self) -> None:
        """Enqueue the step's keys, then move the key encoder towards the updated query
        encoder, so the next keys come from θ_k updated before they are computed."""
        update = self.deferred_update()
        if update is not None:
            index, keys = update
            ptr = int(self.queue_ptr)
            self.queue[ptr:ptr + keys.shape[0]] = keys.to(self.queue.dtype)
            self.queue_index[ptr:ptr + keys.shape[0]] = index
            self.queue_ptr.fill_((ptr + keys.shape[0]) % self.queue.shape[0])
        for q, k in zip(self.encoder.parameters(), self.key_encoder.parameters(), strict=True):
            k.lerp_(q.detach(), 1 - self.momentum)

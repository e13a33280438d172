"""The one interface every method implements."""

from __future__ import annotations

import torch
from torch import nn

from ..networks.batchnorm import convert_batchnorm
from ..networks.deferred import DeferredUpdate
from ..networks.heads import MultiCropEncoder, projection_head


class Trainable(nn.Module):
    """What the trainer drives: ``forward(crops, index) -> (loss, metrics)`` and four hooks,
    each a no-op unless a method needs it (and :meth:`divergence_hint`, for the error of a
    diverged run). The trainer calls the hooks always, in this order:

    - :meth:`attach` once, before the first step, with the optimizer and the loss scaler of
      the run: a method that updates state of its own (a sampled classifier's rows) reads each
      step's learning rate, momentum and weight decay from its ``param_groups`` (one source of
      truth) and unscales its fp16 gradient by the scaler's scale;
    - :meth:`after_step` after every optimizer step that was applied (a skipped step, with a
      non-finite loss or gradient, calls nothing). What ``forward`` produced for the update
      (keys to enqueue, bank rows, classifier rows) is kept by the method until then;
    - :meth:`sync_state` before every checkpoint: lazily updated state made current;
    - :meth:`forward_state` before every step: what ``forward`` changes in place, restored if
      the step is skipped.
    """

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def attach(self, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None) -> None:
        """Called once by the trainer, before training, with the run's optimizer and loss
        scaler (fp16: a method applying gradients itself divides them by its scale)."""

    def after_step(self) -> None:
        """Called after every applied optimizer step (EMA updates, bank/queue/row updates)."""

    def sync_state(self) -> None:
        """Called before every checkpoint: make every buffer current."""

    def divergence_hint(self) -> str:
        """A cause of divergence particular to this method, named in the trainer's
        DivergenceError before the general ones: a clause ending in ``", "``, or ``""``."""
        return ""

    def forward_state(self) -> list[torch.Tensor]:
        """The tensors ``forward`` changes in place, before the step's loss is known: the
        trainer restores them when it skips a non-finite step, so that a skipped step leaves
        the whole model as it was. Updates made in :meth:`after_step` (banks, queues,
        classifier rows, an EMA after the step) need no entry: a skipped step never runs it.

        Default: the running statistics and counters of every BatchNorm layer (key encoders'
        included). A method that changes more in ``forward`` adds those tensors.
        """
        return [buffer for module in self.modules()
                if isinstance(module, nn.modules.batchnorm._NormBase)
                for buffer in module.buffers(recurse=False)]


class Method(DeferredUpdate, Trainable):
    """A self-supervised method: an encoder (backbone + head) and a loss over crop groups.

    ``forward(crops, index)`` takes the list of crop batches (B×3×H×W each, grouped by
    resolution, largest first) and the instance indices (B) and returns the scalar loss and a
    dict of scalar metric tensors (not yet synchronised; the trainer reduces them when it logs).
    State the method keeps between steps (bank, queue, key encoder) lives in buffers or
    submodules, so it is part of ``state_dict`` and of every checkpoint.

    The step's update: what ``forward`` computes for changing that state (InstDisc's gathered
    bank rows and features, MoCo's gathered keys) waits until the optimizer step is known to be
    applied (:class:`~pic.networks.deferred.DeferredUpdate`: ``forward`` calls
    :meth:`defer_update`, ``after_step`` takes it with :meth:`deferred_update`). PIC's sampled
    classifier keeps the rows of its step the same way, inside the classifier.
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

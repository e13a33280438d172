"""Optimisers. ``lr`` is always the base rate for a global batch of 256, scaled linearly."""

from __future__ import annotations

import torch
from torch import nn


def scaled_lr(lr: float, batch_size: int) -> float:
    return lr * batch_size / 256


def sgd(model: nn.Module, batch_size: int, lr: float = 0.03, momentum: float = 0.9,
        weight_decay: float = 1e-4, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay on every parameter (the PIC/MoCo recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=scaled_lr(lr, batch_size), momentum=momentum,
                           weight_decay=weight_decay, nesterov=nesterov)

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


def plain_sgd_group(optimizer: torch.optim.Optimizer, user: str) -> dict:
    """The live param group of a plain momentum SGD (``torch.optim.SGD``, one group, no
    Nesterov, no dampening), from which ``user``, a part of the model that applies SGD to state
    of its own, reads m, λ and each step's lr. Any other optimizer: one clear error."""
    groups = optimizer.param_groups
    name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    if type(optimizer) is not torch.optim.SGD or len(groups) != 1 or groups[0]["nesterov"] \
            or groups[0]["dampening"] != 0:
        detail = " with nesterov" if type(optimizer) is torch.optim.SGD and \
            groups[0]["nesterov"] else ""
        raise ValueError(f"{user} updates its rows with plain momentum SGD itself, so the rest "
                         f"of the model must use it too; got optimizer {name}{detail} "
                         "(use optimizer=sgd optimizer.nesterov=false)")
    return groups[0]

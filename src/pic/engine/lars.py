"""LARS (You et al. 2017) as used by SimCLR: layer-wise trust ratio on top of momentum SGD."""

from __future__ import annotations

import torch
from torch import nn

from .optim import scaled_lr


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose per-tensor step is rescaled by a trust ratio.

    For a parameter w with gradient g, weight decay λ, trust coefficient η, momentum m:
        u = g + λ·w
        r = η·‖w‖ / ‖u‖   (1 if either norm is 0)
        buf ← m·buf + r·u;   w ← w − lr·buf
    Parameter groups with ``adapt=False`` (BN and bias) skip the trust ratio; their weight
    decay is set per group (0 for them in :func:`lars`).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "adapt": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update.mul_(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def lars(model: nn.Module, batch_size: int, lr: float = 0.3, momentum: float = 0.9,
         weight_decay: float = 1e-6, trust_coefficient: float = 0.001) -> torch.optim.Optimizer:
    """LARS over ``model``'s trainable parameters, ``lr`` per 256 images scaled to the batch.

    Biases and normalisation parameters (every tensor with fewer than 2 dimensions) get neither
    weight decay nor the trust ratio, as in SimCLR.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return LARS([{"params": [p for p in params if p.ndim > 1]},
                 {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
                  "adapt": False}],
                lr=scaled_lr(lr, batch_size), momentum=momentum, weight_decay=weight_decay,
                trust_coefficient=trust_coefficient)

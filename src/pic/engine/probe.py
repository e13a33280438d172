"""The fast linear probe: a linear classifier trained on cached frozen features.

The features are extracted once (no augmentation), so each epoch is a few matrix products: many
epochs take seconds, and every (lr, weight decay) pair of the grid is trained at once as one
batched linear layer. The pair is chosen on a held-out part of the *training* split; the chosen
pair is then trained on the whole training split and scored on the validation split once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class FeatureProbe:
    """Softmax regression on N×D features: SGD with momentum, cosine lr over ``epochs``,
    mini-batches of ``batch_size``, L2 weight decay, zero init (the problem is convex).

    ``batch_norm`` standardises each feature with the training split's mean and variance: a
    BatchNorm without affine parameters whose statistics are those of the whole (cached)
    training set, which makes one lr grid fit features of any scale. ``held_out`` is the
    fraction of the training split used to choose ``lr`` × ``weight_decay``.
    """

    def __init__(self, epochs: int = 100, batch_size: int = 256,
                 lr: Sequence[float] = (0.03, 0.1, 0.3, 1.0),
                 weight_decay: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2), momentum: float = 0.9,
                 batch_norm: bool = True, held_out: float = 0.2, seed: int = 0) -> None:
        if not 0 < held_out < 1:
            raise ValueError(f"probe.held_out={held_out}: a fraction of the training split in "
                             f"(0, 1)")
        self.epochs, self.batch_size, self.momentum = epochs, batch_size, momentum
        self.lr, self.weight_decay = list(lr), list(weight_decay)
        self.batch_norm, self.held_out, self.seed = batch_norm, held_out, seed

    def fit(self, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
            val_y: torch.Tensor, num_classes: int) -> dict[str, float]:
        """train_x N×D, train_y N, val_x M×D, val_y M → val top-1/top-5 (percent), the chosen
        ``lr`` and ``weight_decay`` and the held-out top-1 they reached."""
        train_x, val_x = self._standardise(train_x.float(), val_x.float())
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.seed))
        cut = int(round(len(perm) * self.held_out))
        hold, fit = perm[:cut], perm[cut:]
        grid = [(lr, wd) for lr in self.lr for wd in self.weight_decay]
        w, b = self._train(train_x[fit], train_y[fit], num_classes, grid)
        held = [_topk(train_x[hold] @ w[g] + b[g], train_y[hold])[0] for g in range(len(grid))]
        best = max(range(len(grid)), key=lambda g: held[g])  # first of the best: smallest lr
        w, b = self._train(train_x, train_y, num_classes, [grid[best]])
        top1, top5 = _topk(val_x @ w[0] + b[0], val_y)
        return {"top1": top1, "top5": top5, "lr": grid[best][0], "weight_decay": grid[best][1],
                "held_out_top1": held[best]}

    def _standardise(self, train_x: torch.Tensor, val_x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.batch_norm:
            return train_x, val_x
        mean, var = train_x.mean(0), train_x.var(0, unbiased=False)
        scale = (var + 1e-5).rsqrt()  # BatchNorm's eps: a constant feature stays 0
        return (train_x - mean) * scale, (val_x - mean) * scale

    def _train(self, x: torch.Tensor, y: torch.Tensor, num_classes: int,
               grid: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``grid`` (lr, wd) pairs at once on the same batches → weights G×D×C, biases G×C.

        The gradient of the mean cross-entropy is written out (softmax − one-hot): no autograd
        graph per step.
        """
        g, d = len(grid), x.shape[1]
        lr = torch.tensor([p[0] for p in grid], dtype=x.dtype).view(1, g, 1)
        wd = torch.tensor([p[1] for p in grid], dtype=x.dtype).view(1, g, 1)
        # D×G×C: one matrix product serves every pair of the grid.
        w = torch.zeros(d, g, num_classes, dtype=x.dtype)
        b = torch.zeros(1, g, num_classes, dtype=x.dtype)
        v_w, v_b = torch.zeros_like(w), torch.zeros_like(b)
        one_hot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)[:, None, :]
        total = self.epochs * math.ceil(len(y) / self.batch_size)
        order = torch.Generator().manual_seed(self.seed + 1)
        step = 0
        for _ in range(self.epochs):
            for idx in torch.randperm(len(y), generator=order).split(self.batch_size):
                xb = x[idx]
                logits = (xb @ w.view(d, -1)).view(len(idx), g, num_classes) + b
                grad = (logits.softmax(dim=2) - one_hot[idx]) / len(idx)  # B×G×C
                v_w.mul_(self.momentum).add_((xb.T @ grad.view(len(idx), -1)).view_as(w))
                v_w.add_(wd * w)
                v_b.mul_(self.momentum).add_(grad.sum(0, keepdim=True))
                scale = lr * (0.5 * (1 + math.cos(math.pi * step / total)))
                w.sub_(scale * v_w)
                b.sub_(scale * v_b)
                step += 1
        return w.permute(1, 0, 2), b.squeeze(0)


def _topk(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """logits M×C, target M → (top-1, top-5) accuracy in percent."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (100 * (top[:, 0] == target).double().mean().item(),
            100 * (top == target[:, None]).any(dim=1).double().mean().item())

"""Per-iteration learning-rate schedules with linear warmup.

A schedule option builds a factory; the trainer completes it with the run's length:
``schedule(base_lr, total_steps, steps_per_pass)`` returns ``lr_at(step)``. Epoch-valued
settings (warmup, milestones) are converted with ``steps_per_pass`` — the iterations of one
pass over the N training images, whatever the sampler's epoch (a window) — so that the
sliding-window sampler keeps the meaning of an "epoch".
"""

from __future__ import annotations

import math
from collections.abc import Callable


class _Warmup:
    def __init__(self, warmup_epochs: float | None, warmup_start_factor: float) -> None:
        self.warmup_epochs = warmup_epochs
        self.warmup_start_factor = warmup_start_factor

    def _warmup_steps(self, total_steps: int, steps_per_pass: float) -> int:
        if self.warmup_epochs is None:  # the PIC paper's rule: epochs / 40
            return round(total_steps / 40)
        return round(self.warmup_epochs * steps_per_pass)

    def _warm(self, step: int, warmup: int, base_lr: float) -> float | None:
        if step >= warmup:
            return None
        start = base_lr * self.warmup_start_factor
        return start + (base_lr - start) * step / warmup


class Cosine(_Warmup):
    """Linear warmup from ``base_lr·warmup_start_factor``, then cosine decay to ``final_lr``.

    ``warmup_epochs=None`` warms up for 1/40 of the run (the PIC paper's epochs/40).
    """

    def __init__(self, warmup_epochs: float | None = None, warmup_start_factor: float = 0.01,
                 final_lr: float = 1e-6) -> None:
        super().__init__(warmup_epochs, warmup_start_factor)
        self.final_lr = final_lr

    def __call__(self, base_lr: float, total_steps: int,
                 steps_per_pass: float) -> Callable[[int], float]:
        warmup = self._warmup_steps(total_steps, steps_per_pass)

        def lr_at(step: int) -> float:
            warm = self._warm(step, warmup, base_lr)
            if warm is not None:
                return warm
            progress = (step - warmup) / max(1, total_steps - warmup)
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            return self.final_lr + (base_lr - self.final_lr) * cosine

        return lr_at


class Step(_Warmup):
    """Linear warmup, then ``base_lr·gamma^k`` after the k-th milestone.

    Milestones are in epochs (MoCo v1: 120 and 160).
    """

    def __init__(self, milestones: list[float] | None = None, gamma: float = 0.1,
                 warmup_epochs: float | None = 0.0, warmup_start_factor: float = 0.01) -> None:
        super().__init__(warmup_epochs, warmup_start_factor)
        self.milestones = list(milestones) if milestones is not None else [120.0, 160.0]
        self.gamma = gamma

    def __call__(self, base_lr: float, total_steps: int,
                 steps_per_pass: float) -> Callable[[int], float]:
        warmup = self._warmup_steps(total_steps, steps_per_pass)
        bounds = [round(m * steps_per_pass) for m in self.milestones]

        def lr_at(step: int) -> float:
            warm = self._warm(step, warmup, base_lr)
            if warm is not None:
                return warm
            return base_lr * self.gamma ** sum(step >= b for b in bounds)

        return lr_at

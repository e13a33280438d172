"""Is training still sane: tensors that stopped being finite, a loss that diverged.

Method-independent on purpose. Every method's loss here is a cross-entropy over candidates
(instances, queue keys, batch samples), so at random initialisation it sits near chance,
ln(number of candidates), whatever that number is: the run's own first logged loss is the
reference, and no method has to declare its K.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .precision import non_finite_hint


class DivergenceError(RuntimeError):
    """Training diverged (non-finite tensors, or a loss that exploded or fell back to chance)."""


def likely_causes(precision: str, model: torch.nn.Module) -> str:
    """The likely causes of a run that stopped being finite or diverged, the most particular
    first: the precision's (:func:`~.precision.non_finite_hint`), the method's own
    (``Trainable.divergence_hint``), then a learning rate too high for the batch size."""
    return (f"{non_finite_hint(precision)}{model.divergence_hint()}"
            "a learning rate too high for this batch size")


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, else None.

    One host sync for all the tensors (a stack of per-tensor flags).
    """
    named = [(n, t) for n, t in named
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t).all().to("cpu", non_blocking=True)
                         for _, t in named]).tolist()
    return next((n for (n, _), ok in zip(named, flags, strict=True) if not ok), None)


def diverged(history: Sequence[tuple[int, float]], patience: int = 3) -> str | None:
    """Why the loss curve ``history`` ((step, window mean loss) at log points, oldest first)
    has diverged, or None.

    With L0 the first logged loss (chance, see the module docstring) and the last ``patience``
    log windows all agreeing:

    - exploded: above 2·L0;
    - fell back to chance: the best loss so far was at least 25 % below L0 (the method learned
      something), and the recent windows have lost 90 % of that progress.

    Conservative by design: a noisy or slowly learning run never meets either condition.
    """
    if len(history) < patience + 1:
        return None
    start = history[0][1]
    best = min(loss for _, loss in history)
    recent = [loss for _, loss in history[-patience:]]
    if start > 0 and min(recent) > 2 * start:
        return (f"the loss rose to {recent[-1]:.4g}, over twice its first logged value "
                f"{start:.4g}, for {patience} log windows")
    progress = start - best
    if progress >= 0.25 * start > 0 and min(recent) >= start - 0.1 * progress:
        return (f"the loss fell from {start:.4g} (chance, at the start) to {best:.4g}, then came "
                f"back to {recent[-1]:.4g} for {patience} log windows")
    return None


class Snapshot:
    """A copy of what a model's ``forward`` changes in place (``model.forward_state()``),
    taken before every step and put back when the step is skipped. The copies are allocated
    once; taking one is a single fused device copy (BatchNorm statistics: 0.2 % of a
    ResNet-50's parameters), issued without a host sync."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.tensors = list(model.forward_state())
        self.copies = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def take(self) -> None:
        if self.tensors:
            torch._foreach_copy_(self.copies, self.tensors)

    @torch.no_grad()
    def restore(self) -> None:
        if self.tensors:
            torch._foreach_copy_(self.tensors, self.copies)


def watched(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the parameters and the forward state of ``model``: what must stay
    finite between checkpoints (checked at log points; the whole state at every save)."""
    names = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
    forward = [(names.get(id(t), "forward state"), t) for t in model.forward_state()]
    return [*model.named_parameters(), *forward]

"""Collectives that are identities in a single process, so methods never branch on world size."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B×…) from every rank along dim 0, rank order; no gradient."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    tdist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradients of every rank's copy into the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        tdist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        start = get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather`, but gradients flow back to each rank's own rows.

    Every rank computes the same loss over the gathered batch; DDP averages parameter gradients
    over ranks, so the summed gradient of the local slice keeps the single-process scale.
    """
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; no gradient)."""
    if not is_dist():
        return x
    x = x.detach().clone()
    tdist.all_reduce(x)
    return x / get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    x = x.detach().clone()
    tdist.all_reduce(x)
    return x


def all_reduce_sum_async(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start the sum of ``x`` over ranks (in place) and return the call that waits for it, so
    that the collective overlaps the work in between."""
    if not is_dist():
        return lambda: x
    work = tdist.all_reduce(x, async_op=True)
    return lambda: (work.wait(), x)[1]


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s value of ``x`` on every rank (in place)."""
    if is_dist():
        tdist.broadcast(x, src)
    return x

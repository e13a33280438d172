"""Batch normalisation with statistics per crop (ghost batches) and over every rank (SyncBN).

One backbone call per resolution group concatenates the group's crops along the batch (k crops
of B images: k·B rows). Plain BN then normalises with the statistics of all k·B rows, as SwAV
and Google's SimCLR do; the PIC authors' code runs the encoder once per crop, so each crop's
B rows have their own statistics. :class:`BatchNorm` gives the latter inside one call: the
input is split into ``chunks`` equal parts (set for the call by :func:`statistics_per_chunk`)
and each part is normalised with its own statistics, exactly as separate passes would be,
running statistics included. With ``sync`` in a distributed run each chunk's statistics cover
that chunk on every rank (SyncBN; PyTorch's ``nn.SyncBatchNorm`` runs on accelerators only,
this one on CPU with gloo too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as tdist
from torch import nn

from .. import dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks.

    Every rank's loss depends on the summed statistic, so the gradient reaching a rank's own
    contribution is the sum of the gradients of all ranks' losses.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        tdist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over N×C×… inputs, training statistics per chunk and, with ``sync``, over
    every rank's batch.

    ``chunks`` (1 unless :func:`statistics_per_chunk` sets it) splits the N rows into equal
    consecutive parts, each normalised by its own statistics and each updating the running
    statistics in turn, as ``chunks`` separate calls would. Synchronised statistics are
    computed in float32 for narrower inputs (bf16/fp16 under autocast), as
    ``nn.SyncBatchNorm`` and ``nn.BatchNorm2d`` do (a bf16 mean is off by bf16's resolution;
    the running buffers stay float32), and in float64 for float64 inputs (a float64 model
    keeps float64 buffers and must not lose precision on 2 ranks that 1 rank keeps), in two
    passes (mean, then biased variance), each one all-reduce of a chunks×C tensor that carries
    gradient; the output has the input's dtype.
    Outside training it is ``nn.BatchNorm`` with the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, sync: bool = False
                 ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.sync = sync
        self.chunks = 1

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm: expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        if x.shape[0] % self.chunks:
            raise ValueError(f"BatchNorm: {x.shape[0]} rows do not split into {self.chunks} "
                             "equal chunks (crops of one resolution group differ in batch)")
        if self.sync and dist.is_dist():
            return self._synchronised(x)
        if self.chunks == 1:
            return super().forward(x)
        # The native kernel per chunk: bit-identical to separate calls, and fastest on CPU.
        return torch.cat([super(BatchNorm, self).forward(c) for c in x.chunk(self.chunks)])

    def _synchronised(self, x: torch.Tensor) -> torch.Tensor:
        k, channels = self.chunks, x.shape[1]
        dtype = torch.promote_types(x.dtype, torch.float32)
        parts = x.to(dtype).reshape(k, x.shape[0] // k, *x.shape[1:])  # k × B × C × …
        dims = [d for d in range(parts.dim()) if d != 2]
        dims.remove(0)
        shape = [k, 1, channels] + [1] * (x.dim() - 2)
        count = torch.tensor(float(parts[0].numel() // channels), dtype=dtype, device=x.device)
        count = dist.all_reduce_sum(count)
        mean = _AllReduceSum.apply(parts.sum(dims)) / count  # k × C
        centred = parts - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._track(mean.detach(), (var * count / (count - 1).clamp(min=1)).detach())
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape[1:])
        if self.bias is not None:
            out = out + self.bias.view(shape[1:])
        return out.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def _track(self, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
        """Running statistics updated once per chunk, in order (k × C each)."""
        for mean, var in zip(means, unbiased_vars, strict=True):
            self.num_batches_tracked += 1
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
            # The buffers' own dtype (float32 under autocast, float64 in a float64 model).
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_(var.to(self.running_var.dtype), factor)


@contextlib.contextmanager
def statistics_per_chunk(module: nn.Module, chunks: int) -> Iterator[None]:
    """Within the block, every :class:`BatchNorm` of ``module`` splits its input into
    ``chunks`` parts with their own statistics."""
    norms = [m for m in module.modules() if isinstance(m, BatchNorm)]
    for m in norms:
        m.chunks = chunks
    try:
        yield
    finally:
        for m in norms:
            m.chunks = 1


def convert_batchnorm(module: nn.Module, sync: bool) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by :class:`BatchNorm` (same state and
    mode; ``sync`` for synchronised statistics)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        norm = BatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, sync)
        if module.affine and module.bias is None:  # a BN without shift (a head's last layer)
            norm.register_parameter("bias", None)
        state = module.state_dict()
        floating = [v for v in state.values() if v.is_floating_point()]
        if floating:
            norm.to(floating[0].device, floating[0].dtype)
        norm.load_state_dict(state)
        norm.train(module.training)
        return norm
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, sync))
    return module

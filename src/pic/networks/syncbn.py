"""Batch normalisation over the global batch of all ranks (SyncBN), on any device.

PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators; this one uses the collectives of
:mod:`pic.dist`, so the same model trains with synchronised statistics on CPU (gloo) and GPU
(nccl). In one process it is plain batch normalisation.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
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
        torch_dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        torch_dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over N×C×… inputs whose training statistics cover every rank's batch.

    Mean and (biased) variance are computed in two passes over the global batch, each an
    all-reduce of a C-vector that carries gradient; running statistics use the unbiased
    variance, as ``nn.BatchNorm2d`` does. The statistics and the normalisation are computed in
    float32 whatever the input's dtype (bf16/fp16 under autocast), as ``nn.SyncBatchNorm`` and
    ``nn.BatchNorm2d`` do: a bf16 mean over a large batch is off by bf16's resolution, and the
    running buffers stay float32; the output has the input's dtype. Outside training or
    outside a distributed run it is exactly ``nn.BatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_dist()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        count = dist.all_reduce_sum(count)
        xf = x.float()
        mean = _AllReduceSum.apply(xf.sum(dims)) / count
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased.detach(), factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by :class:`SyncBatchNorm` (same state)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module,
                                                                              SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        state = module.state_dict()
        if state:
            sync.to(next(iter(state.values())).device)
        sync.load_state_dict(state)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


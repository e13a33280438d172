"""The online linear probe: a linear classifier trained during pretraining on the detached
pooled features of the training batches, with an SGD of its own. Its validation top-1 monitors
the representation beside the kNN monitor, without touching the method's gradient.

It attaches to a method with two hooks, so that neither the trainer nor any method knows of it:

- a forward pre-hook on the encoder's head keeps the head's first input of the step — the
  backbone's pooled features of the first crop group (v·B × D for v crops of the largest
  resolution), detached;
- a forward hook on the method then takes one step of the probe on those features and the
  class labels of the batch's instance indices, and adds its loss and training top-1 to the
  method's metrics (logged with them).

The probe's weights and momentum are buffers of the method (``online_probe.*``): they are in
every checkpoint, DDP leaves them alone (no parameters) and the method's optimizer never sees
them. The probe's gradient is computed with ``torch.autograd.grad`` on copies and averaged over
ranks, so every rank keeps the same probe; a step whose probe gradient is not finite leaves the
probe as it was (decided on the device: no host sync).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist


class OnlineProbe(nn.Module):
    """Linear classifier C×D on D-dim features; SGD with momentum at a constant ``lr``.

    ``labels`` (N, int64): the class of every training instance index (−1: unlabelled, ignored).
    Weights start at zero (no random draw: the run's random streams are the same with or
    without the probe).
    """

    def __init__(self, feature_dim: int, num_classes: int, labels: torch.Tensor, lr: float,
                 momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        for name, shape in (("weight", (num_classes, feature_dim)), ("bias", (num_classes,))):
            self.register_buffer(name, torch.zeros(shape))
            self.register_buffer(f"{name}_momentum", torch.zeros(shape))
        # Derived from the dataset at start-up, so not part of the checkpoint.
        self.register_buffer("labels", labels.long(), persistent=False)
        self._features: torch.Tensor | None = None

    def attach(self, method: nn.Module) -> OnlineProbe:
        """Become ``method.online_probe`` and hook into its forward (see the module doc).

        The probe's step runs in the method's forward, so its buffers join the method's
        ``forward_state``: a step the trainer skips (non-finite loss) leaves the probe as it
        was, like the rest of the model."""
        method.online_probe = self
        method.encoder.head.register_forward_pre_hook(self._capture)
        method.register_forward_hook(self._step_hook)
        own = method.forward_state
        method.forward_state = lambda: [*own(), self.weight, self.bias, self.weight_momentum,
                                        self.bias_momentum]
        return self

    def _capture(self, head: nn.Module, args: tuple[Any, ...]) -> None:
        if self._features is None and head.training and torch.is_grad_enabled():
            self._features = args[0].detach()

    def _step_hook(self, method: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        features, self._features = self._features, None
        if features is None:
            return None
        loss, metrics = output
        return loss, {**metrics, **self.update(features, args[1])}

    def update(self, features: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step on the cross-entropy of ``features`` (v·B × D) against the labels of
        ``index`` (B, repeated for the v crops). Returns its loss and the batch's top-1 (%)
        before the step, as detached 0-d tensors."""
        target = self.labels[index].repeat(len(features) // len(index))
        with torch.autocast(features.device.type, enabled=False), torch.enable_grad():
            x = features.float()
            weight = self.weight.clone().requires_grad_()
            bias = self.bias.clone().requires_grad_()
            logits = torch.addmm(bias, x, weight.T)
            loss = F.cross_entropy(logits, target, ignore_index=-1)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        grads = dist.all_reduce_mean(torch.cat([grad_w.flatten(), grad_b]))
        finite = torch.isfinite(grads).all()
        grads = grads.split([grad_w.numel(), grad_b.numel()])
        with torch.no_grad():
            for name, grad in zip(("weight", "bias"), grads, strict=True):
                param, momentum = getattr(self, name), getattr(self, f"{name}_momentum")
                step = momentum * self.momentum + grad.view_as(param) + self.weight_decay * param
                momentum.copy_(torch.where(finite, step, momentum))
                param.copy_(torch.where(finite, param - self.lr * step, param))
        labelled = target >= 0
        hits = (logits.detach().argmax(dim=1) == target) & labelled
        top1 = hits.sum() * 100.0 / labelled.sum().clamp(min=1)
        return {"online_probe_loss": loss.detach(), "online_probe_train_top1": top1}

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
                 device: torch.device, num_workers: int = 0) -> dict[str, float]:
        """Top-1 and top-5 (%) of the probe on ``backbone``'s features of ``dataset`` (items
        with one view and a label), over all ranks: rank r scores items r, r + world, ..."""
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
        loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, num_workers=num_workers)
        was_training = backbone.training
        backbone.eval()
        counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5 hits, total
        for batch in loader:
            features = backbone(batch["crops"][0].to(device, non_blocking=True)).float()
            logits = torch.addmm(self.bias, features, self.weight.T)
            target = batch["label"].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts += torch.stack([(top[:, 0] == target).sum(),
                                   (top == target[:, None]).any(dim=1).sum(),
                                   torch.tensor(len(target), device=device)]).double()
        backbone.train(was_training)
        hits1, hits5, total = dist.all_reduce_sum(counts).tolist()
        return {"top1": 100 * hits1 / max(total, 1), "top5": 100 * hits5 / max(total, 1)}

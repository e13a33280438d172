"""PIC's method: loss against an explicit float64 loop; which crops update the classifier."""

from __future__ import annotations

import math

import torch
from torch import nn

from pic.models.pic import PIC


class Flat(nn.Module):
    """A BN-free backbone: features are a linear map of the pixels."""

    out_dim = 12

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def reference_loss(features: list[torch.Tensor], weight: torch.Tensor, labels: torch.Tensor,
                   tau: float) -> float:
    """Mean over every row of every crop of -log softmax(cos(f, w_j)/tau)[label], by loops."""
    total, rows = 0.0, 0
    w = weight.double().tolist()
    for crop in features:
        for f, y in zip(crop.double().tolist(), labels.tolist(), strict=True):
            fn = math.sqrt(sum(v * v for v in f))
            logits = []
            for row in w:
                rn = math.sqrt(sum(v * v for v in row))
                logits.append(sum(a * b for a, b in zip(f, row, strict=True)) / (fn * rn) / tau)
            top = max(logits)
            lse = top + math.log(sum(math.exp(v - top) for v in logits))
            total += lse - logits[y]
            rows += 1
    return total / rows


def make(n: int = 7) -> PIC:
    torch.manual_seed(0)
    return PIC(Flat(), num_instances=n, feature_dim=5, temperature=0.2).double()


def test_pic_loss_equals_a_float64_loop_over_rows():
    model = make()
    crops = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    index = torch.tensor([0, 3, 6, 2])
    loss, metrics = model(crops, index)
    feats = model.encoder(crops)
    expected = reference_loss(feats, model.classifier.weight.detach(), index, 0.2)
    assert abs(loss.item() - expected) < 1e-10
    assert metrics["loss"].item() == loss.item()


def test_multicrop_small_crops_train_the_encoder_but_not_the_classifier():
    model = make()
    index = torch.tensor([1, 4, 5])
    large = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    smalls = [torch.randn(3, 3, 4, 4, dtype=torch.float64) for _ in range(3)]
    loss, _ = model([large, *smalls], index)
    feats = model.encoder([large, *smalls])
    expected = reference_loss(feats, model.classifier.weight.detach(), index, 0.2)
    assert abs(loss.item() - expected) < 1e-10  # one cross-entropy over all rows

    # The classifier's gradient comes from the large crop alone ...
    loss.backward()
    grad_all = model.classifier.weight.grad.clone()
    model.zero_grad()
    large_only, _ = model([large], index)
    (large_only * 1 / 4).backward()  # the large crop's rows are 1/4 of all rows
    torch.testing.assert_close(grad_all, model.classifier.weight.grad, rtol=1e-9, atol=1e-12)
    # ... while small crops still reach the encoder (the loss depends on them through it).
    model.zero_grad()
    loss, _ = model([large, *smalls], index)
    encoder_grad = torch.autograd.grad(loss, model.encoder.backbone.fc.weight)[0]
    model.zero_grad()
    large_only, _ = model([large], index)
    large_grad = torch.autograd.grad(large_only / 4, model.encoder.backbone.fc.weight)[0]
    assert (encoder_grad - large_grad).abs().max() > 1e-6

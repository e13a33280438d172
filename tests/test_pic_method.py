"""PIC's method: loss against an explicit float64 loop; which crops update the classifier."""

from __future__ import annotations

import math

import pytest
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


def test_pic_rows_scores_equal_explicit_loops(tmp_path):
    """bench/pic_rows.py on a short digits run (the sampled classifier, whose rows are brought up
    to date from its table): instance top-1, the own row's mean cosine and the loss against
    per-image float64 loops over the rows."""
    import subprocess
    import sys
    from pathlib import Path

    import torch.nn.functional as F

    from bench.pic_rows import load_run, row_scores

    root = Path(__file__).resolve().parents[1]
    run = tmp_path
    subprocess.run([sys.executable, str(root / "launch.py"), f"hydra.run.dir={run}",
                    "logger=none", "backbone=resnet_tiny", "backbone.widths=[8,16]",
                    "data.image_size=16", "trainer.epochs=1", "trainer.batch_size=64",
                    "trainer.num_workers=0", "model.num_negatives=300"], check=True,
                   capture_output=True)
    scores = row_scores(run)
    cfg, train, model = load_run(run)
    model.eval()
    rows = F.normalize(model.classifier.weight.detach().double(), dim=1)
    top1, own, loss, n = 0, 0.0, 0.0, len(train)
    tau = cfg.model.temperature
    with torch.no_grad():
        for i in range(n):  # one image at a time, its N cosines as Python floats
            x = train[i]["crops"][0][None]
            f = F.normalize(model.encoder.head(model.encoder.backbone(x)).double(), dim=1)[0]
            cos = (rows @ f).tolist()
            top1 += max(cos) == cos[i]
            own += cos[i]
            top = max(cos)
            loss += top / tau + math.log(sum(math.exp((c - top) / tau) for c in cos)) \
                - cos[i] / tau
    assert scores["N"] == n
    assert scores["instance top-1 %"] == pytest.approx(100 * top1 / n, abs=100 / n)
    assert scores["cos own row"] == pytest.approx(own / n, abs=1e-5)
    assert scores["loss at tau"] == pytest.approx(loss / n, abs=1e-4)

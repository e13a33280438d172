"""The online linear probe: its step against a float64 reference, its accuracy against an
explicit loop, and a pretraining whose backbone, optimizer and method state are bit-identical
with and without it (the probe reads features, never writes a gradient)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from pic.engine.checkpoint import load_checkpoint
from pic.engine.online_probe import OnlineProbe
from pic.engine.optim import sgd
from pic.engine.trainer import Trainer
from pic.launch.local import free_port
from pic.models.pic import PIC
from pic.networks.resnet import TinyResNet
from pic.run import run_task

from .helpers import compose_config

SMALL = ["data=synthetic", "data.num_images=96", "data.num_val_images=40", "data.resolution=16",
         "data.image_size=16", "data.num_classes=4", "backbone.widths=[8,16]",
         "trainer.batch_size=32", "trainer.num_workers=0", "trainer.progress=false",
         "trainer.log_every=1", "trainer.epochs=2", "task.plot=false",
         "task.knn_random_init=false", "eval.k=5", "eval.every=1", "eval.batch_size=16"]


def reference_step(probe: OnlineProbe, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, m_w: torch.Tensor, m_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SGD with momentum on the mean cross-entropy over labelled rows, in float64 loops."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    grad_w, grad_b, loss = torch.zeros_like(weight), torch.zeros_like(bias), 0.0
    rows = [i for i in range(len(y)) if y[i] >= 0]
    for i in rows:
        logits = [float(weight[c] @ x[i] + bias[c]) for c in range(len(bias))]
        top = max(logits)
        exps = [torch.tensor(v - top).exp().item() for v in logits]
        total = sum(exps)
        loss += (top + torch.tensor(total).log().item() - logits[int(y[i])]) / len(rows)
        for c in range(len(bias)):
            d = (exps[c] / total - (1.0 if c == y[i] else 0.0)) / len(rows)
            grad_w[c] += d * x[i]
            grad_b[c] += d
    step_w = probe.momentum * m_w.double() + grad_w + probe.weight_decay * weight
    step_b = probe.momentum * m_b.double() + grad_b + probe.weight_decay * bias
    return weight - probe.lr * step_w, bias - probe.lr * step_b, loss


def test_probe_step_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, -1, 1, 2, 1])  # -1: an unlabelled instance, ignored
    probe = OnlineProbe(5, 3, labels, lr=0.3, momentum=0.9, weight_decay=0.01)
    probe.weight.copy_(torch.randn(3, 5, generator=gen))
    probe.bias.copy_(torch.randn(3, generator=gen))
    probe.weight_momentum.copy_(torch.randn(3, 5, generator=gen))
    probe.bias_momentum.copy_(torch.randn(3, generator=gen))
    index = torch.tensor([4, 2, 0, 3])
    features = torch.randn(8, 5, generator=gen)  # two views of the four instances
    expected = reference_step(probe, features, labels[index].repeat(2), probe.weight.clone(),
                              probe.bias.clone(), probe.weight_momentum, probe.bias_momentum)
    metrics = probe.update(features, index)
    torch.testing.assert_close(probe.weight.double(), expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(probe.bias.double(), expected[1], rtol=0, atol=1e-6)
    assert metrics["online_probe_loss"].item() == pytest.approx(expected[2], abs=1e-6)


def test_probe_learns_separable_features_and_skips_non_finite_steps() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(64) % 4
    features = torch.randn(64, 16, generator=gen) + 3 * nn.functional.one_hot(labels, 16)
    probe = OnlineProbe(16, 4, labels, lr=0.5)
    first = probe.update(features, torch.arange(64))["online_probe_train_top1"].item()
    for _ in range(30):
        last = probe.update(features, torch.arange(64))["online_probe_train_top1"].item()
    assert first == 25.0 and last == 100.0  # zero weights: every row scored class 0 at first
    before = [b.clone() for b in probe.buffers()]
    probe.update(torch.full((64, 16), float("nan")), torch.arange(64))
    assert all(torch.equal(a, b) for a, b in zip(before, probe.buffers(), strict=True))


def test_a_skipped_step_leaves_the_probe_as_it_was(tmp_path: Path) -> None:
    """The trainer skips a step with a non-finite loss: the probe, which stepped inside the
    method's forward, is put back with the BN statistics."""
    torch.manual_seed(0)
    model = PIC(TinyResNet([4, 8]), 16, feature_dim=8)
    probe = OnlineProbe(8, 3, torch.arange(16) % 3, lr=0.5).attach(model)
    optimizer = sgd(model, 8)
    model.attach(optimizer)
    trainer = Trainer(batch_size=8, device="cpu")
    batch = {"crops": [torch.randn(8, 3, 8, 8)] * 2, "index": torch.arange(8)}
    assert trainer.train_step(model, model, optimizer, batch, lr=0.1)[0]
    before = [t.clone() for t in (probe.weight, probe.bias, probe.weight_momentum)]
    assert probe.weight.abs().sum() > 0
    model.register_forward_hook(lambda m, a, out: (out[0] * float("nan"), out[1]))
    assert not trainer.train_step(model, model, optimizer, batch, lr=0.1)[0]
    after = (probe.weight, probe.bias, probe.weight_momentum)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _probe_steps(features: torch.Tensor, index: torch.Tensor) -> OnlineProbe:
    """Three steps of a probe (6 classes, 4-dim features) on these rows."""
    probe = OnlineProbe(4, 6, torch.arange(8) % 6, lr=0.5)
    for _ in range(3):
        probe.update(features, index)
    return probe


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2,
                                  timeout=datetime.timedelta(seconds=60))
    try:
        features = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
        probe = _probe_steps(features[rank * 4:(rank + 1) * 4], torch.arange(8)[rank * 4:][:4])
        torch.save(probe.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_one_probe_equal_to_one_process(tmp_path: Path) -> None:
    """Each rank steps on its half of the batch; the averaged gradient keeps both probes equal
    to one process stepping on the whole batch."""
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    features = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    whole = _probe_steps(features, torch.arange(8)).state_dict()
    for key, value in whole.items():
        assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a[key], value, rtol=0, atol=1e-6)
    assert whole["weight"].abs().sum() > 0


def test_evaluate_matches_an_explicit_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    backbone = TinyResNet([8, 16]).eval()
    images, targets = torch.randn(11, 3, 8, 8, generator=gen), torch.randint(0, 7, (11,))
    dataset = [{"crops": [images[i]], "label": int(targets[i])} for i in range(11)]
    probe = OnlineProbe(16, 7, targets, lr=0.1)
    probe.weight.copy_(torch.randn(7, 16, generator=gen))
    probe.bias.copy_(torch.randn(7, generator=gen))
    backbone.train()
    scores = probe.evaluate(backbone, dataset, batch_size=4, device=torch.device("cpu"))
    assert backbone.training  # its mode is restored
    hits1 = hits5 = 0
    with torch.no_grad():
        for i in range(11):
            logits = (backbone.eval()(images[i:i + 1]).double() @ probe.weight.double().T
                      + probe.bias.double())[0]
            order = sorted(range(7), key=lambda c: -float(logits[c]))
            hits1 += order[0] == int(targets[i])
            hits5 += int(targets[i]) in order[:5]
    assert scores == pytest.approx({"top1": 100 * hits1 / 11, "top5": 100 * hits5 / 11})


@pytest.mark.parametrize("model", ["pic", pytest.param("simclr", marks=pytest.mark.slow)])
def test_pretraining_is_bit_identical_with_and_without_the_probe(tmp_path: Path,
                                                                 model: str) -> None:
    """Defaults otherwise (bf16 autocast, channels_last): the probe's step runs inside the
    method's forward, on detached features, outside autocast."""
    plain = run_task(compose_config(*SMALL, f"model={model}", "logger=none",
                                    f"output_dir={tmp_path / 'plain'}"))
    probed = run_task(compose_config(*SMALL, f"model={model}", "logger=tensorboard",
                                     "task.online_probe=true", f"output_dir={tmp_path / 'probe'}"))
    a = load_checkpoint(tmp_path / "plain" / "current.pth")
    b = load_checkpoint(tmp_path / "probe" / "current.pth")
    probe_keys = {k for k in b["model"] if k.startswith("online_probe.")}
    assert probe_keys == {f"online_probe.{n}" for n in
                          ("weight", "bias", "weight_momentum", "bias_momentum")}
    assert a["model"].keys() == b["model"].keys() - probe_keys
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(b["optimizer"]["state"][pid][name], value), (pid, name)
    assert plain["knn_top1"] == probed["knn_top1"]
    assert b["model"]["online_probe.weight"].abs().sum() > 0  # the probe did train

    # Its validation top-1 beside every kNN evaluation, in results.json and in the log.
    on_disk = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert [h["epoch"] for h in on_disk["knn_history"]] == [1.0, 2.0]
    assert all(0 <= h["online_probe_top1"] <= 100 for h in on_disk["knn_history"])
    assert on_disk["online_probe_top1"] == on_disk["knn_history"][-1]["online_probe_top1"]
    assert "online_probe_top1" not in plain
    events = EventAccumulator(str(tmp_path / "probe" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("online_probe_top1")] == [3, 6]
    assert [e.step for e in events.Scalars("knn_top1")] == [3, 6]
    assert len(events.Scalars("online_probe_loss")) == 6

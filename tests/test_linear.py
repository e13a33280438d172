"""Linear evaluation: the probe's loss and accuracy against float64 loops, a frozen backbone (BN
included unless asked otherwise), the task end to end with an exact resume, and its errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from pic.config import CONF_DIR, compose_config
from pic.engine.checkpoint import FORMAT, atomic_save, load_checkpoint
from pic.models.linear_probe import LinearProbe
from pic.models.pic import PIC
from pic.networks.resnet import TinyResNet
from pic.tasks.common import eval_splits
from pic.tasks.linear import LinearEval, evaluate

WIDTHS = [8, 16, 32]
SMALL_RUN = [
    "task=linear", "data=synthetic", "data.num_images=192", "data.num_val_images=96",
    "data.resolution=16", "data.image_size=16", "data.num_classes=4", "backbone=resnet_tiny",
    f"backbone.widths=[{','.join(map(str, WIDTHS))}]", "task.batch_size=64", "task.epochs=2",
    "task.warmup_epochs=1", "task.lr=1.0", "trainer.num_workers=0", "trainer.progress=false",
    "trainer.log_every=1", "logger=none", "name=test",
]


def compose_cfg(*overrides: str) -> DictConfig:
    return compose_config(list(overrides))


def backbone_with_stats(seed: int = 0) -> TinyResNet:
    """A TinyResNet whose BN running statistics are far from what a batch gives (so eval-mode
    and train-mode BN differ visibly)."""
    torch.manual_seed(seed)
    net = TinyResNet(WIDTHS)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.2)  # zero-init gammas would hide the last BN layers
    return net


def write_checkpoint(path: Path, num_instances: int = 192) -> dict[str, torch.Tensor]:
    """A pretraining checkpoint in this platform's format; returns its backbone weights."""
    model = PIC(backbone_with_stats(), num_instances, feature_dim=16)
    atomic_save({"format": FORMAT, "model": model.state_dict(),
                 "config": {"backbone": {"widths": WIDTHS}}}, path)
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_probe_loss_matches_float64_loop() -> None:
    backbone = backbone_with_stats()
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1])
    probe = LinearProbe(backbone, 3, labels).train()
    torch.nn.init.normal_(probe.fc.weight)
    torch.nn.init.normal_(probe.fc.bias)
    images = torch.randn(5, 3, 16, 16)
    index = torch.tensor([7, 0, 3, 5, 1])
    loss, metrics = probe([images], index)

    # Reference: eval-mode backbone features, then logits and cross-entropy by explicit loops.
    with torch.no_grad():
        feats = backbone.eval()(images).double()
    w, b = probe.fc.weight.detach().double(), probe.fc.bias.detach().double()
    total, hits = 0.0, 0
    for i in range(len(index)):
        logits = [sum(feats[i, d] * w[c, d] for d in range(feats.shape[1])) + b[c]
                  for c in range(3)]
        target = int(labels[index[i]])
        log_z = math.log(sum(math.exp(float(z)) for z in logits))
        total += log_z - float(logits[target])
        hits += int(max(range(3), key=lambda c: float(logits[c])) == target)
    assert loss.item() == pytest.approx(total / len(index), rel=1e-5)
    assert metrics["train_top1"].item() == pytest.approx(100 * hits / len(index))


@pytest.mark.parametrize("bn_train_mode", [False, True])
def test_backbone_frozen_and_bn_mode(bn_train_mode: bool) -> None:
    probe = LinearProbe(backbone_with_stats(), 3, torch.zeros(4, dtype=torch.long),
                        bn_train_mode=bn_train_mode).train()
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    loss, _ = probe([torch.randn(4, 3, 16, 16)], torch.arange(4))
    loss.backward()
    after = probe.backbone.state_dict()
    assert probe.backbone.training is bn_train_mode
    assert all(p.grad is None for p in probe.backbone.parameters())
    assert probe.fc.weight.grad is not None and probe.fc.weight.grad.abs().sum() > 0
    stats = [k for k in before if "running_mean" in k]
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    # Eval mode: running statistics stay; train mode (the released code): all of them drift.
    assert moved == (stats if bn_train_mode else [])
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"crops": [self.images[i]], "label": int(self.labels[i]), "index": i}


def test_evaluate_topk_matches_float64_loop() -> None:
    torch.manual_seed(1)
    num_classes = 7
    images, labels = torch.randn(23, 3, 16, 16), torch.randint(0, num_classes, (23,))
    probe = LinearProbe(backbone_with_stats(), num_classes, labels)
    torch.nn.init.normal_(probe.fc.weight, std=3.0)
    scores = evaluate(probe, ListDataset(images, labels), batch_size=5,
                      device=torch.device("cpu"))
    assert probe.training  # evaluate restores the mode it found

    with torch.no_grad():
        feats = probe.backbone.eval()(images).double()
        logits = feats @ probe.fc.weight.double().T + probe.fc.bias.double()
    top1 = top5 = 0
    for i in range(len(labels)):
        # Rank of the true class: how many classes score strictly higher.
        rank = sum(int(logits[i, c] > logits[i, labels[i]]) for c in range(num_classes))
        top1 += rank == 0
        top5 += rank < 5
    assert scores["top1"] == pytest.approx(100 * top1 / len(labels))
    assert scores["top5"] == pytest.approx(100 * top5 / len(labels))


def run_linear(tmp: Path, run: str, *overrides: str) -> dict:
    cfg = compose_cfg(*SMALL_RUN, f"pretrained={tmp / 'pre.pth'}", *overrides)
    return instantiate(cfg.task).run(cfg, tmp / run)


def test_linear_task_end_to_end_and_exact_resume(tmp_path: Path) -> None:
    pretrained = write_checkpoint(tmp_path / "pre.pth")
    straight = run_linear(tmp_path, "straight")
    first = run_linear(tmp_path, "resumed", "trainer.max_steps=3")  # one epoch of 192/64
    assert first["steps"] == 3 and [r["epoch"] for r in first["linear_history"]] == [1.0]
    resumed = run_linear(tmp_path, "resumed")

    a = load_checkpoint(tmp_path / "straight" / "current.pth")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "current.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["linear_history"] == straight["linear_history"]
    assert [r["epoch"] for r in straight["linear_history"]] == [1.0, 2.0]
    # The backbone, BN statistics included, is exactly the pretrained one after training.
    for key, value in pretrained.items():
        assert torch.equal(a[f"backbone.{key}"], value), key

    on_disk = json.loads((tmp_path / "straight" / "results.json").read_text())
    history = on_disk["linear_history"]
    best = max(history, key=lambda r: r["top1"])
    assert on_disk["linear_top1"] == history[-1]["top1"]
    assert on_disk["linear_top5"] == history[-1]["top5"]
    assert (on_disk["linear_best_top1"], on_disk["linear_best_epoch"]) == (best["top1"],
                                                                          best["epoch"])
    assert on_disk["steps"] == 6 and on_disk["completed"]
    # lr 1.0 per 256 at batch 64; 3 warmup steps (1 epoch), then cosine to 1e-6 over 3 steps:
    # the last step (5) is 2/3 of the way down.
    base = 1.0 * 64 / 256
    assert on_disk["final_lr"] == pytest.approx(
        1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi * 2 / 3)))


def test_linear_errors(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL_RUN)
    with pytest.raises(ValueError, match="pretrained=PATH"):
        instantiate(cfg.task).run(cfg, tmp_path / "a")

    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    cfg = compose_cfg(*SMALL_RUN, f"pretrained={foreign}")
    with pytest.raises(ValueError, match="foreign.pth is not a checkpoint of this platform"):
        instantiate(cfg.task).run(cfg, tmp_path / "b")

    write_checkpoint(tmp_path / "pre.pth")
    cfg = compose_cfg(*SMALL_RUN, f"pretrained={tmp_path / 'pre.pth'}",
                      "backbone.widths=[8,16,64]")
    with pytest.raises(ValueError, match="pre.pth: its backbone does not match"):
        instantiate(cfg.task).run(cfg, tmp_path / "c")

    cfg = compose_cfg(*SMALL_RUN, f"pretrained={tmp_path / 'pre.pth'}",
                      "task.pretrain_first=true")
    with pytest.raises(ValueError, match="drop one of the two"):
        instantiate(cfg.task).run(cfg, tmp_path / "d")


def test_pretrain_first_returns_a_stop_of_its_evaluation(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Preempted while evaluating (the pretraining done), the run says it stopped, so that a
    SLURM job requeues itself (it used to return the pretraining's results, as if done)."""
    (tmp_path / "results.json").write_text(json.dumps({"steps": 6, "total_steps": 6}))
    stopped = {"stopped_by": "SIGUSR1", "steps": 1}
    monkeypatch.setattr(LinearEval, "evaluate_checkpoint", lambda *args: stopped)
    cfg = compose_cfg(*SMALL_RUN, "task.pretrain_first=true")
    assert instantiate(cfg.task).run(cfg, tmp_path)["stopped_by"] == "SIGUSR1"
    assert json.loads((tmp_path / "results.json").read_text()) == {"steps": 6, "total_steps": 6}


def test_knn_task_names_a_mismatched_backbone(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "pre.pth")
    data = [o for o in SMALL_RUN if not o.startswith("task")]
    cfg = compose_cfg(*data, "task=knn", f"pretrained={tmp_path / 'pre.pth'}",
                      "backbone.widths=[8,16,64]")
    with pytest.raises(ValueError, match="pre.pth: its backbone does not match"):
        instantiate(cfg.task).run(cfg, tmp_path)


@pytest.mark.slow
def test_two_processes_report_the_accuracy_of_their_final_probe(tmp_path: Path) -> None:
    """cluster=local with 2 gloo processes: the run completes, the backbone stays the pretrained
    one, and the reported top-1/top-5 (each rank scoring half of the validation images) equal a
    one-process evaluation of the saved probe."""
    pretrained = write_checkpoint(tmp_path / "pre.pth")
    run = tmp_path / "ddp"
    overrides = [o for o in SMALL_RUN if o != "name=test"]
    cmd = [sys.executable, "launch.py", *overrides, f"pretrained={tmp_path / 'pre.pth'}",
           f"hydra.run.dir={run}", "cluster.nproc_per_node=2"]
    root = CONF_DIR.parent
    done = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(root / "src"), str(root)])},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 * (192 // 64) and results["completed"]

    state = load_checkpoint(run / "current.pth")["model"]
    for key, value in pretrained.items():
        assert torch.equal(state[f"backbone.{key}"], value), key
    cfg = compose_cfg(*SMALL_RUN)
    data = instantiate(cfg.data)
    _, val_set = eval_splits(data)
    probe = LinearProbe(TinyResNet(WIDTHS), data.num_classes, torch.zeros(1, dtype=torch.long))
    probe.load_state_dict(state)
    scores = evaluate(probe, val_set, batch_size=32, device=torch.device("cpu"))
    assert (results["linear_top1"], results["linear_top5"]) == pytest.approx(
        (scores["top1"], scores["top5"]))

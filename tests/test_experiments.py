"""The paper's table as configs: every row composes with the authors' settings (values from
shared notes on the methods and the authors' scripts), the sweep runs all nine, and a row's
pretrain → linear chain runs end to end (shrunk to the embedded digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pic.config import CONF_DIR, compose_config
from pic.engine.checkpoint import load_checkpoint

ROOT = CONF_DIR.parent
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if not p.stem.startswith(("small_", "semi_")))

# name: (model class, τ, pretraining epochs, optimizer, base lr per 256, weight decay,
#        augmentation, crop sizes per image, sampler)
SGD, LARS = "pic.engine.optim.sgd", "pic.engine.lars.lars"
EPOCH, WINDOW = "pic.data.samplers.EpochSampler", "pic.data.samplers.SlidingWindowSampler"
PIC_CROPS, TWO_VIEWS, ONE_VIEW = [160, 96, 96, 96], [224, 224], [224]
ROWS = {
    "pic_200ep": ("pic.models.pic.PIC", 0.2, 200, SGD, 0.03, 1e-4, "multicrop", PIC_CROPS, WINDOW),
    "pic_400ep": ("pic.models.pic.PIC", 0.2, 400, SGD, 0.03, 1e-4, "multicrop", PIC_CROPS, WINDOW),
    "pic_1600ep": ("pic.models.pic.PIC", 0.2, 1600, SGD, 0.03, 1e-4, "multicrop", PIC_CROPS,
                   WINDOW),
    "instdisc_200ep": ("pic.models.instdisc.InstDisc", 0.07, 200, SGD, 0.03, 1e-4, "instdisc",
                       ONE_VIEW, EPOCH),
    "instdisc_400ep": ("pic.models.instdisc.InstDisc", 0.07, 400, SGD, 0.03, 1e-4, "instdisc",
                       ONE_VIEW, EPOCH),
    "mocov2_100ep": ("pic.models.moco.MoCo", 0.2, 100, SGD, 0.03, 1e-4, "mocov2", TWO_VIEWS,
                     EPOCH),
    "mocov2_200ep": ("pic.models.moco.MoCo", 0.2, 200, SGD, 0.03, 1e-4, "mocov2", TWO_VIEWS,
                     EPOCH),
    "simclr_100ep": ("pic.models.simclr.SimCLR", 0.1, 100, LARS, 0.3, 1e-6, "simclr", TWO_VIEWS,
                     EPOCH),
    "simclr_200ep": ("pic.models.simclr.SimCLR", 0.1, 200, LARS, 0.3, 1e-6, "simclr", TWO_VIEWS,
                     EPOCH),
}

# The linear evaluation's (lr per 256, weight decay) in the authors' scripts, per method.
LINEAR = {"pic.models.pic.PIC": (30.0, 0.0), "pic.models.instdisc.InstDisc": (30.0, 0.0),
          "pic.models.moco.MoCo": (30.0, 0.0), "pic.models.simclr.SimCLR": (0.1, 1e-6)}


def compose_cfg(*overrides: str, searchpath: bool = False) -> DictConfig:
    extra = [f"hydra.searchpath=[file://{ROOT}]"] if searchpath else []
    return compose_config([*overrides, *extra], return_hydra_config=True)


def test_the_table_has_exactly_the_nine_rows() -> None:
    assert EXPERIMENTS == sorted(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("cluster", ["local", "slurm"])
def test_experiment_composes_with_the_authors_settings(name: str, cluster: str) -> None:
    model, tau, epochs, optimizer, lr, wd, augmentation, crops, sampler = ROWS[name]
    cfg = compose_cfg(f"experiment={name}", "data.root=/data/imagenet", f"cluster={cluster}")
    assert cfg.name == name
    assert (cfg.model._target_, cfg.model.temperature) == (model, tau)
    assert cfg.trainer.epochs == epochs and cfg.trainer.batch_size == 256
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        optimizer, lr, wd)
    assert cfg.schedule._target_ == "pic.engine.schedules.Cosine"
    # The authors' scripts warm up for epochs / 40 in integer arithmetic: 2 epochs at 100.
    assert cfg.schedule.warmup_epochs == epochs // 40
    lr_at = instantiate(cfg.schedule)(1.0, epochs * 10, 10)  # 10 steps per epoch
    warmup = epochs // 40 * 10
    assert lr_at(warmup - 1) < 1.0 and lr_at(warmup) == 1.0
    assert cfg.sampler._target_ == sampler
    assert cfg.hydra.runtime.choices.augmentation == augmentation
    # ImageNet-1k (zip format), ResNet-50, 4 GPUs.
    assert cfg.data._target_ == "pic.data.zipdata.ZipData" and cfg.data.image_size == 224
    assert (cfg.backbone.arch, cfg.backbone.small_images) == ("resnet50", False)
    assert cfg.cluster.nproc_per_node == 4
    # Followed by the authors' linear evaluation for that row: their main_linear (MoCo's
    # protocol: lr 30, no weight decay) for PIC, InstDisc and MoCo v2; their SimCLR script's
    # lr 0.1 and weight decay 1e-6 for SimCLR.
    task = cfg.task
    assert task._target_ == "pic.tasks.linear.LinearEval" and task.pretrain_first
    linear_lr, linear_wd = LINEAR[model]
    assert (task.epochs, task.batch_size, task.lr, task.momentum, task.weight_decay,
            task.warmup_epochs, task.bn_train_mode) == (100, 256, linear_lr, 0.9, linear_wd,
                                                        5.0, False)
    # Crops per image, from the augmentation itself.
    views = instantiate(cfg.augmentation)(Image.new("RGB", (320, 240), (90, 120, 30)))
    assert [v.shape[-1] for v in views] == crops


def test_method_specific_settings() -> None:
    pic = compose_cfg("experiment=pic_400ep", "data.root=/d")
    assert (pic.sampler.window_size, pic.sampler.stride) == (131072, 16384)
    assert [(g.size, g.count, list(g.scale)) for g in pic.augmentation.groups] == [
        (160, 1, [0.14, 1.0]), (96, 3, [0.08, 0.14])]
    moco = compose_cfg("experiment=mocov2_200ep", "data.root=/d")
    assert (moco.model.queue_size, moco.model.momentum, moco.model.mlp_head) == (65536, 0.999,
                                                                                  True)
    instdisc = compose_cfg("experiment=instdisc_400ep", "data.root=/d")
    assert (instdisc.model.num_negatives, instdisc.model.momentum, instdisc.model.loss) == (
        65536, 0.5, "softmax")
    simclr = compose_cfg("experiment=simclr_200ep", "data.root=/d")
    assert simclr.model.mlp_head and simclr.model.sync_bn


def test_command_line_overrides_an_experiment() -> None:
    cfg = compose_cfg("experiment=pic_200ep", "data=folder", "data.root=/d", "trainer.epochs=3",
                      "cluster.nproc_per_node=8")
    assert cfg.data._target_ == "pic.data.folder.FolderData"
    assert (cfg.trainer.epochs, cfg.cluster.nproc_per_node) == (3, 8)


def test_paper_table_sweep_runs_every_row() -> None:
    # Hydra composes the sweep once before its rows: task.* overrides must be valid there.
    cfg = compose_cfg("+sweeps=paper_table", "task.epochs=1", searchpath=True)
    assert cfg.task.pretrain_first and cfg.task.epochs == 1
    params = cfg.hydra.sweeper.params
    assert list(params) == ["experiment"]
    (override,) = OverridesParser.create().parse_overrides([f"experiment={params.experiment}"])
    assert sorted(override.sweep_string_iterator()) == sorted(ROWS)
    # One run directory per row, named after it.
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}_${name}"


@pytest.mark.slow
def test_pretrain_then_linear_chain_on_digits(tmp_path: Path) -> None:
    """experiment=pic_200ep shrunk to the digits: pretraining, then the linear evaluation of its
    checkpoint in <run>/linear, and the linear results merged into <run>/results.json."""
    run = tmp_path / "run"
    cmd = [sys.executable, "launch.py", "experiment=pic_200ep", f"hydra.run.dir={run}",
           "data=digits", "backbone=resnet_tiny", "trainer.max_steps=3", "trainer.batch_size=128",
           "augmentation.groups=[{size:32,count:1,scale:[0.14,1.0]},"
           "{size:16,count:3,scale:[0.08,0.14]}]",
           "sampler.window_size=512", "sampler.stride=128", "trainer.precision=fp32",
           "trainer.num_workers=0", "trainer.progress=false", "cluster.nproc_per_node=1",
           "logger=none", "task.epochs=1", "task.batch_size=512", "task.lr=1.0",
           "task.warmup_epochs=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((run / "results.json").read_text())
    linear = json.loads((run / "linear" / "results.json").read_text())
    assert results["steps"] == 3 and "knn_top1" in results
    assert linear["pretrained"] == str(run / "current.pth")
    # One whole epoch of the digits' 1,257 training images (under trainer.max_steps=3).
    assert linear["steps"] == 1257 // 512 and linear["completed"]
    assert [row["epoch"] for row in linear["linear_history"]] == [1.0]
    for key in ("linear_top1", "linear_top5", "linear_best_top1", "linear_best_epoch"):
        assert results[key] == linear[key]
    # The probe's backbone is the pretrained encoder's backbone, unchanged.
    pretrained = load_checkpoint(run / "current.pth")["model"]
    probe = load_checkpoint(run / "linear" / "current.pth")["model"]
    for key, value in probe.items():
        if key.startswith("backbone."):
            assert torch.equal(value, pretrained[f"encoder.{key}"]), key


# ------------------------------------------------------------------ small-image recipes
SMALL = {"small_pic": ("pic.models.pic.PIC", 1, WINDOW), "small_simclr":
         ("pic.models.simclr.SimCLR", 2, EPOCH), "small_mocov2": ("pic.models.moco.MoCo", 2, EPOCH),
         "small_moco": ("pic.models.moco.MoCo", 2, EPOCH),
         "small_instdisc": ("pic.models.instdisc.InstDisc", 1, EPOCH)}


def test_every_method_has_a_small_image_recipe() -> None:
    methods = {target for target, _, _ in SMALL.values()}
    assert methods == set(LINEAR) and sorted(SMALL) == sorted(
        p.stem for p in (CONF_DIR / "experiment").glob("small_*.yaml"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_image_recipe(name: str) -> None:
    """ResNet-18 with a 3×3 stem, batch 64 (SimCLR 256: only its negatives are the batch), no
    Gaussian blur, the method's views per image; PIC: one view, sliding window with
    W/S = 8, recent negatives, BN in the head, tau 0.1 and classifier rows at norm 0.25 (4x the
    paper's lr / (tau |w|^2), at lr 0.3)."""
    target, views, sampler = SMALL[name]
    cfg = compose_cfg(f"experiment={name}", "data=folder", "data.root=/d", "data.image_size=32")
    assert cfg.model._target_ == target and cfg.sampler._target_ == sampler
    assert (cfg.backbone.arch, cfg.backbone.small_images, cfg.trainer.batch_size) == (
        "resnet18", True, 256 if name == "small_simclr" else 64)
    transform = instantiate(cfg.augmentation)
    assert "GaussianBlur" not in repr(transform)
    assert [v.shape[-1] for v in transform(Image.new("RGB", (32, 32), (90, 120, 30)))] == [
        32] * views
    if name == "small_pic":
        assert cfg.sampler.window_size == 8 * cfg.sampler.stride
        assert (cfg.model.negative_sampling, cfg.model.classifier_init_norm,
                cfg.model.temperature, cfg.optimizer.lr) == ("recent", 0.25, 0.1, 0.3)
        assert cfg.model.num_negatives is not None and cfg.model.head_batch_norm
    if name == "small_instdisc":
        assert (cfg.model.loss, cfg.model.temperature, cfg.optimizer.lr) == ("softmax", 0.1, 0.12)
        assert cfg.model.head_batch_norm and not cfg.model.mlp_head


def test_small_pic_composes_with_multicrop() -> None:
    """The recipe sets no key of one augmentation only, so `augmentation=multicrop` replaces
    its one view (it failed to compose while small_pic set `augmentation.num_views`)."""
    groups = "[{size:32,count:1,scale:[0.14,1.0]},{size:16,count:3,scale:[0.08,0.14]}]"
    cfg = compose_cfg("experiment=small_pic", "augmentation=multicrop",
                      f"augmentation.groups={groups}", "data=folder", "data.root=/d",
                      "data.image_size=32")
    crops = instantiate(cfg.augmentation)(Image.new("RGB", (32, 32), (90, 120, 30)))
    assert [c.shape[-1] for c in crops] == [32, 16, 16, 16]
    assert "GaussianBlur" not in repr(instantiate(cfg.augmentation))


@pytest.mark.parametrize("name", ["pic_200ep", "pic_1600ep", "small_pic"])
def test_sliding_window_experiment_takes_the_epoch_sampler(name: str) -> None:
    """The paper's ablation, `experiment=pic_200ep sampler=epoch`: the experiments pick their
    window as a sampler option and set no sampler key, so another option replaces it whole
    (it failed to compose while they set `sampler.window_size`)."""
    window = compose_cfg(f"experiment={name}", "data=folder", "data.root=/d").sampler
    assert window._target_ == WINDOW and window.reshuffle
    epoch = compose_cfg(f"experiment={name}", "sampler=epoch", "data=folder", "data.root=/d")
    assert epoch.sampler._target_ == EPOCH and "window_size" not in epoch.sampler

"""Semi-supervised fine-tuning: the label subset is class-balanced, seeded and saved; the task
fine-tunes the whole network on it alone, reports top-1/top-5, and resumes on the same subset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from pic.data.base import InstanceDataset
from pic.data.samplers import EpochSampler
from pic.engine.checkpoint import load_checkpoint
from pic.tasks.finetune import LabelSubset, balanced_subset

from .helpers import TinyImages, compose_config
from .test_linear import WIDTHS, write_checkpoint

RUN = ["task=finetune", "data=synthetic", "data.num_images=192", "data.num_val_images=48",
       "data.resolution=16", "data.image_size=16", "data.num_classes=4", "backbone=resnet_tiny",
       f"backbone.widths=[{','.join(map(str, WIDTHS))}]", "task.label_fraction=0.1",
       "task.batch_size=8", "task.epochs=2", "task.lr=0.5", "trainer.num_workers=0",
       "trainer.progress=false", "trainer.log_every=1", "logger=none"]


def test_subset_is_class_balanced_and_seeded() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3 + [3] * 17)[torch.randperm(100)]
    subset = balanced_subset(labels, 0.1, seed=0)
    counts = Counter(labels[subset].tolist())
    assert counts == {0: 5, 1: 3, 2: 1, 3: 2}  # round(0.1 n_c), at least one per class
    assert subset == sorted(set(subset))
    assert balanced_subset(labels, 0.1, seed=0) == subset
    assert balanced_subset(labels, 0.1, seed=1) != subset
    with pytest.raises(ValueError, match="label_fraction=0"):
        balanced_subset(labels, 0.0, seed=0)


def test_label_subset_renumbers_items() -> None:
    images = TinyImages(10)
    subset = LabelSubset(images, [7, 2])
    assert len(subset) == 2 and subset[0]["index"] == 0
    assert torch.equal(subset[0]["crops"][0], images[7]["crops"][0])


class BadImages(InstanceDataset):
    """10 one-pixel images whose pixel is their index; images 3 and 4 are unreadable."""

    def __init__(self) -> None:
        super().__init__(lambda image: [torch.tensor(float(image.getpixel((0, 0))[0]))])

    def __len__(self) -> int:
        return 10

    def load(self, index: int) -> Image.Image:
        if index in (3, 4):
            raise OSError("truncated file")
        return Image.new("RGB", (1, 1), (index, 0, 0))

    def label(self, index: int) -> int:
        return index % 3


def test_a_bad_labelled_image_is_replaced_by_the_next_labelled_one() -> None:
    """The dataset alone would hand image 5 (unlabelled here) for image 3; the subset's item
    must be a labelled image whose label the probe's table (read by subset index) gives."""
    data = BadImages()
    subset = LabelSubset(data, [1, 3, 8])
    assert data[3]["index"] == 5  # the dataset's replacement: not in the subset
    item = subset[1]
    assert (item["index"], float(item["crops"][0]), item["replaced"]) == (2, 8.0, 1)
    assert data.label(subset.indices[item["index"]]) == item["label"] == 2
    assert float(subset[0]["crops"][0]) == 1.0 and subset[0]["replaced"] == 0
    with pytest.raises(RuntimeError, match="none of the 2 labelled images"):
        LabelSubset(data, [3, 4])[0]


def test_label_subset_lists_the_items_this_ranks_cache_holds() -> None:
    """With data.cache_mode=part (rank 1 of 2 holds the odd indices), the sampler draws only
    subset items this rank holds, and as many per epoch as every other rank."""
    images = TinyImages(12)
    images.rank_indices = list(range(1, 12, 2))
    subset = LabelSubset(images, [0, 1, 2, 3, 5, 7, 8], world_size=2)
    assert subset.rank_indices == [1, 3, 4, 5]  # the positions of 1, 3, 5, 7
    few = LabelSubset(images, [0, 2, 4, 6, 1], world_size=2)
    assert few.rank_indices == [4, 4]  # holds one of 5: repeated up to 5 // 2 draws
    for part in (subset, few):
        sampler = EpochSampler(len(part), seed=0, rank=1, world_size=2,
                               indices=part.rank_indices)
        drawn = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            drawn += [part.indices[i] for i in sampler]
        assert drawn and set(drawn) <= set(images.rank_indices)
        assert len(drawn) == 3 * (len(part) // 2)
    with pytest.raises(ValueError, match="holds none of the 2 labelled images"):
        LabelSubset(images, [0, 2], world_size=2)
    assert LabelSubset(TinyImages(4), [1, 2]).rank_indices is None  # no per-rank cache


def run(tmp: Path, *overrides: str) -> dict:
    cfg = compose_config(*RUN, f"pretrained={tmp / 'pre.pth'}", *overrides)
    return instantiate(cfg.task).run(cfg, tmp / "run")


def test_finetune_trains_the_whole_network_on_the_subset_and_resumes(tmp_path: Path) -> None:
    pretrained = write_checkpoint(tmp_path / "pre.pth")
    first = run(tmp_path, "trainer.max_steps=2")
    saved = json.loads((tmp_path / "run" / "label_subset.json").read_text())
    data = instantiate(compose_config(*RUN).data)
    labels = torch.tensor([data.build("train", None, 0, 1).label(i) for i in range(192)])
    assert saved["indices"] == balanced_subset(labels, 0.1, 0)
    assert first["steps"] == 2 and len(saved["indices"]) == 20  # 4 classes of 48: 5 each

    results = run(tmp_path)  # resumes on the saved subset: 20 images / 8 = 2 steps per epoch
    assert results["steps"] == 4 and results["completed"] and results["num_labelled"] == 20
    assert [r["epoch"] for r in results["finetune_history"]] == [1.0, 2.0]
    assert 0 <= results["finetune_top1"] <= results["finetune_top5"] <= 100
    state = load_checkpoint(tmp_path / "run" / "current.pth")["model"]
    changed = [k for k, v in pretrained.items()
               if v.is_floating_point() and not torch.equal(state[f"backbone.{k}"], v)]
    assert changed  # the backbone is fine-tuned, not frozen

    with pytest.raises(ValueError, match="label_subset.json holds the subset of 0.1"):
        run(tmp_path, "task.label_fraction=0.01")


@pytest.mark.parametrize(("name", "fraction", "epochs"), [("semi_1pct", 0.01, 60),
                                                           ("semi_10pct", 0.1, 30)])
def test_semi_supervised_rows_have_simclrs_settings(name: str, fraction: float,
                                                    epochs: int) -> None:
    cfg = compose_config(f"experiment={name}", "pretrained=/runs/pic/current.pth")
    task = instantiate(cfg.task)
    assert cfg.task._target_ == "pic.tasks.finetune.FineTune" and cfg.backbone.arch == "resnet50"
    assert (task.label_fraction, task.epochs, task.batch_size) == (fraction, epochs, 4096)
    assert (task.lr * task.batch_size / 256, task.momentum, task.nesterov,
            task.weight_decay) == (0.8, 0.9, True, 0.0)


def test_pretrain_first_pretrains_then_fine_tunes_its_checkpoint(tmp_path: Path) -> None:
    """task.pretrain_first=true, as for task=linear: the pretraining runs in the run dir, the
    fine-tuning of its current.pth in <run dir>/finetune, and the run's results.json has both."""
    small = [o for o in RUN if not o.startswith("task.")] + [
        "task.pretrain_first=true", "task.label_fraction=0.25", "task.batch_size=16",
        "task.epochs=1", "trainer.batch_size=64", "trainer.epochs=1", "eval.k=5"]
    cfg = compose_config(*small)
    results = instantiate(cfg.task).run(cfg, tmp_path)
    tuned = json.loads((tmp_path / "finetune" / "results.json").read_text())
    assert tuned["pretrained"] == str(tmp_path / "current.pth") and tuned["steps"] == 3
    assert results["steps"] == 3 and results["method"] == "pic.models.pic.PIC"
    assert results["finetune_top1"] == tuned["finetune_top1"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "finetune" / "label_subset.json").is_file()

    cfg = compose_config(*small, f"pretrained={tmp_path / 'current.pth'}")
    with pytest.raises(ValueError, match="drop one of the two"):
        instantiate(cfg.task).run(cfg, tmp_path / "other")
    cfg = compose_config(*[o for o in small if o != "task.pretrain_first=true"])
    with pytest.raises(ValueError, match="task=finetune needs pretrained=PATH"):
        instantiate(cfg.task).run(cfg, tmp_path / "other")

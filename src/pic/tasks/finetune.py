"""``task=finetune pretrained=PATH task.label_fraction=0.01|0.1``: semi-supervised evaluation.

The whole network — a checkpoint's backbone and a new linear layer — is fine-tuned on a
class-balanced, seeded subset of the training labels (``label_fraction`` of each class,
at least one image per class), then top-1/top-5 are measured on the validation split after every
epoch. The subset is written to ``<run dir>/label_subset.json`` before training and read back
on a resume. Defaults follow SimCLR's fine-tuning (sources in ``conf/experiment/semi_*.yaml``):
Nesterov SGD, momentum 0.9, lr 0.05 per 256 images (0.8 at batch 4096), cosine, no warmup, no
weight decay, random resized crop + flip only; 60 epochs for 1% of the labels, 30 for 10%
(``task.epochs``). ``task.pretrain_first=true`` pretrains in the run directory first, as
``task=linear`` does (:func:`~pic.tasks.common.evaluate_pretrained`).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .. import dist
from ..data import transforms
from ..engine.checkpoint import atomic_write_text, load_backbone, seed_everything
from ..engine.optim import sgd
from ..engine.schedules import Cosine
from ..models.linear_probe import LinearProbe
from ..provenance import provenance
from .common import Continued, eval_splits, evaluate_pretrained, write_results
from .linear import fit_probe

log = logging.getLogger(__name__)


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """Sorted indices: for each class c with n_c images, round(fraction·n_c) of them (at least
    one), drawn by a generator seeded with ``seed`` (labels: N int64)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"task.label_fraction={fraction}: expected a fraction in (0, 1]")
    gen = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        take = max(1, round(fraction * len(members)))
        chosen += members[torch.randperm(len(members), generator=gen)[:take]].tolist()
    return sorted(chosen)


class LabelSubset(torch.utils.data.Dataset):
    """Items ``indices[i]`` of ``dataset`` as items ``i`` (their ``index`` renumbered, so that
    the sampler and the label table work on the subset).

    With a per-rank cache (``dataset.rank_indices``: the images this rank holds), its own
    ``rank_indices`` are the subset's items among them, for the sampler to draw. A seeded
    class-balanced subset does not split evenly by the cache's rule, and every rank draws
    ``len // world_size`` items per epoch: a rank holding fewer repeats its own cyclically."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int],
                 world_size: int = 1) -> None:
        self.dataset, self.indices = dataset, indices
        self.rank_indices: list[int] | None = None
        held = getattr(dataset, "rank_indices", None)
        if held is not None:
            mine = set(held)
            own = [i for i, index in enumerate(indices) if index in mine]
            if not own:
                raise ValueError(f"data.cache_mode=part: this rank holds none of the "
                                 f"{len(indices)} labelled images; use data.cache_mode=full "
                                 "or fewer processes")
            need = max(len(own), len(indices) // world_size)
            self.rank_indices = [own[k % len(own)] for k in range(need)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item ``i``; an unreadable labelled image is replaced by the next labelled one this
        rank holds. (The dataset's own replacement is the next image of the whole set, likely
        unlabelled, whose crops would be trained with item ``i``'s label.)"""
        item = self.dataset[self.indices[i]]
        if item["index"] == self.indices[i]:
            return {**item, "index": i}
        own = self.rank_indices or range(len(self.indices))  # the rare path: search in order
        start = own.index(i) if i in own else 0
        for k in range(1, len(own)):
            j = own[(start + k) % len(own)]
            item = self.dataset[self.indices[j]]
            if item["index"] == self.indices[j]:
                return {**item, "index": j, "replaced": item["replaced"] + k}
        raise RuntimeError(f"none of the {len(own)} labelled images of this rank is readable")


class FineTuned(LinearProbe):
    """The probe's network with its backbone trained too (BN in train mode)."""

    def __init__(self, backbone: torch.nn.Module, num_classes: int,
                 labels: torch.Tensor) -> None:
        super().__init__(backbone, num_classes, labels, bn_train_mode=True)
        self.backbone.requires_grad_(True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images B×3×H×W → class logits B×C, with gradient into the backbone."""
        return self.fc(self.norm(self.backbone(images)))


class FineTune:
    """Fine-tuning on ``label_fraction`` of the labels; see the module doc for the protocol.
    ``pretrain_first``: pretrain with the same config in the run directory first and fine-tune
    its ``current.pth`` in ``<run dir>/finetune`` (as ``task=linear`` does)."""

    def __init__(self, label_fraction: float = 0.01, epochs: float = 60.0,
                 batch_size: int = 4096, lr: float = 0.05, momentum: float = 0.9,
                 nesterov: bool = True, weight_decay: float = 0.0, subset_seed: int = 0,
                 pretrain_first: bool = False) -> None:
        balanced_subset(torch.zeros(1, dtype=torch.long), label_fraction, 0)  # checks the range
        self.label_fraction, self.epochs, self.batch_size = label_fraction, epochs, batch_size
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay, self.subset_seed = weight_decay, subset_seed
        self.pretrain_first = pretrain_first

    def subset(self, labels: torch.Tensor, out_dir: Path, resume: bool) -> list[int]:
        """The run's labelled subset: read from ``label_subset.json`` when resuming, else drawn
        and written there (rank 0, atomically) before training."""
        path = out_dir / "label_subset.json"
        wanted = {"label_fraction": self.label_fraction, "subset_seed": self.subset_seed}
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            if {k: saved.get(k) for k in wanted} != wanted:
                raise ValueError(f"{path} holds the subset of {saved.get('label_fraction')} / "
                                 f"seed {saved.get('subset_seed')}, not of {wanted}: use a new "
                                 "run directory or the same task.label_fraction/subset_seed")
            return saved["indices"]
        indices = balanced_subset(labels, self.label_fraction, self.subset_seed)
        if dist.is_main():
            atomic_write_text(json.dumps({**wanted, "indices": indices}) + "\n", path)
        dist.barrier()
        return indices

    def run(self, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
        return evaluate_pretrained(cfg, out_dir, "finetune", self.pretrain_first,
                                   partial(self.finetune, cfg))

    def finetune(self, cfg: DictConfig, pretrained: Path, out_dir: Path,
                 continued: Continued | None = None) -> dict[str, Any]:
        """Fine-tune ``pretrained``'s backbone; results in ``out_dir``. ``continued``: the
        pretraining whose logger run this continues, under ``finetune/`` names."""
        out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        trainer = instantiate(cfg.trainer, epochs=self.epochs, batch_size=self.batch_size)
        data = instantiate(cfg.data)
        augment = transforms.linear_eval_resized_crop(data.image_size, data.mean, data.std)
        full = data.build("train", augment, dist.get_rank(), dist.get_world_size())
        labels = torch.tensor([full.label(i) for i in range(len(full))])
        train_set = LabelSubset(full, self.subset(labels, out_dir, cfg.auto_resume),
                                dist.get_world_size())
        _, val_set = eval_splits(data)
        net = FineTuned(load_backbone(instantiate(cfg.backbone), pretrained),
                        data.num_classes, labels[train_set.indices]).to(trainer.device)
        optimizer = sgd(net, self.batch_size, self.lr, self.momentum, self.weight_decay,
                        self.nesterov)
        results = fit_probe(cfg, trainer, net, train_set, val_set, optimizer,
                            Cosine(warmup_epochs=0.0), out_dir, "finetune", provenance(full),
                            continued, partial(self._scores, train_set, pretrained))
        if not results["stopped_by"]:
            write_results(out_dir, results)
            if dist.is_main():
                print(f"fine-tuned on {len(train_set)} labels ({self.label_fraction:g}): top-1 "
                      f"{results['finetune_top1']:.2f}%  top-5 {results['finetune_top5']:.2f}%",
                      flush=True)
        return results

    def _scores(self, train_set: LabelSubset, pretrained: Path, rows: list[dict[str, float]]
                ) -> dict[str, Any]:
        """The final epoch's scores of the history ``rows`` and what was fine-tuned on."""
        return {"finetune_top1": rows[-1]["top1"], "finetune_top5": rows[-1]["top5"],
                "label_fraction": self.label_fraction, "num_labelled": len(train_set),
                "pretrained": str(pretrained)}

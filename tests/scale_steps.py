"""The sampled classifier's test steps, importable without the trainer, and the subprocess the
kill -9 test runs: ``python tests/scale_steps.py DIR kill|-``."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import torch

import pic.networks.correction as correction
from pic.data.samplers import list_order
from pic.losses import instance_classification_loss
from pic.networks.classifier import SampledInstanceClassifier

M, WD, TAU = 0.9, 1e-4, 0.2


def lr_at(step: int) -> float:
    """A varying schedule, so that the correction has to use each step's own lr."""
    return 0.5 * (1 + math.cos(math.pi * step / 40)) + 0.05


def sampled(tmp_path: Path, n: int, **kw) -> SampledInstanceClassifier:
    kw.setdefault("storage_dir", str(tmp_path / "store"))
    return attached(SampledInstanceClassifier(n, 16, **kw))


def attached(clf: SampledInstanceClassifier) -> SampledInstanceClassifier:
    """``clf`` attached to a plain SGD with m = M, λ = WD (its lr set by :func:`after`)."""
    clf.attach(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0, momentum=M,
                               weight_decay=WD))
    return clf


def after(clf: SampledInstanceClassifier, lr: float) -> None:
    """The update of a step at learning rate ``lr``."""
    clf.group["lr"] = lr
    clf.after_step()


def batch(step: int, n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features B×16 and distinct labels B, a function of the step alone."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(b, 16, generator=g), torch.randperm(n, generator=g)[:b]


def sampled_step(clf: SampledInstanceClassifier, step: int, b: int) -> torch.Tensor:
    """One forward/backward; the step's instance indices (sorted)."""
    feats, labels = batch(step, clf.num_instances, b)
    gathered = []  # the forward gathers the step's rows once
    gather = clf.store.gather
    clf.store.gather = lambda rows: gathered.append(rows) or gather(rows)
    try:
        rows, pos = clf(labels)
    finally:
        del clf.store.gather
    instance_classification_loss(feats, rows, pos, TAU).backward()
    return instances(clf, gathered[0])


def instances(clf: SampledInstanceClassifier, rows: torch.Tensor) -> torch.Tensor:
    """Sorted instance indices of table rows."""
    if clf.order_seed is None:
        return rows.clone()
    index = list_order(clf.order_seed, clf.num_instances, rows.numpy())
    return torch.from_numpy(index).sort().values


def run_steps(clf: SampledInstanceClassifier, steps: range) -> None:
    for step in steps:
        sampled_step(clf, step, 4)
        after(clf, lr_at(step))


CHILD_STEPS, CHILD_KILL_AT, CHILD_CHECKPOINT = 30, 23, 17


def child(directory: str, kill: bool) -> None:
    """CHILD_STEPS steps, a checkpoint after CHILD_CHECKPOINT, SIGKILL of itself in the middle
    of step CHILD_KILL_AT (after its journal record, before its rows); or, resuming, the rest.
    Writes the final rows to ``final.pt``."""
    saved = correction.MAX_GAP, correction.BLOCK_ROWS
    correction.MAX_GAP, correction.BLOCK_ROWS = 4, 64  # parking in every checkpoint interval
    try:
        torch.manual_seed(0)
        clf = sampled(Path(directory), 400, num_negatives=12, sampling="recent",
                      storage="mmap", order_seed=3)
    finally:
        correction.MAX_GAP, correction.BLOCK_ROWS = saved  # read by the constructor only
    ckpt = Path(directory) / "ckpt.pt"
    start = 0
    if ckpt.is_file():
        clf.load_state_dict(torch.load(ckpt, weights_only=False))
        start = clf.t
    for step in range(start, CHILD_STEPS):
        sampled_step(clf, step, 8)
        if kill and step == CHILD_KILL_AT:
            clf.store.scatter = lambda rows, raw: os.kill(os.getpid(), signal.SIGKILL)
        after(clf, lr_at(step))
        if step + 1 == CHILD_CHECKPOINT:
            torch.save(clf.state_dict(), ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
    torch.save(clf.weight, Path(directory) / "final.pt")



if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2] == "kill")

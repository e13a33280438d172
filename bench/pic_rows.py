"""Does a PIC run's classifier know its images? Each training image's head feature (the
evaluation transform, the encoder in eval mode) scored against all N classifier rows.

    python bench/pic_rows.py RUN_DIR [RUN_DIR ...]

Per run: instance top-1 (its own row scores highest of the N), the median rank of its own row,
the mean cosine between an image and its own row, with the best other row, and between two
images, the mean row norm, and the cross-entropy at the run's τ (ln N: rows no better than
chance). Reads the run's ``config.yaml`` and ``current.pth``; works for the dense and the
sampled classifier (``model.num_negatives``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from pic.engine.features import encoder_of, extract_features
from pic.tasks.common import eval_splits


def load_run(run: Path) -> tuple[DictConfig, Dataset, torch.nn.Module]:
    """A PIC run's config, its training split under the evaluation transform, and its model
    from ``current.pth``."""
    cfg = OmegaConf.load(run / "config.yaml")
    if not cfg.model._target_.endswith(".PIC"):
        raise SystemExit(f"{run}: model {cfg.model._target_} is not PIC")
    train, _ = eval_splits(instantiate(cfg.data))
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                        num_instances=len(train), storage_dir=str(run))
    state = torch.load(run / "current.pth", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return cfg, train, model


def row_scores(run: Path) -> dict[str, float]:
    cfg, train, model = load_run(run)
    features, _ = extract_features(encoder_of(model, "head"), train, 256, torch.device("cpu"))
    features = F.normalize(features.double(), dim=1)
    weight = model.classifier.weight.detach().double()
    cos = features @ F.normalize(weight, dim=1).T
    own = cos.diagonal()
    rank = (cos > own[:, None]).sum(1).double()
    others = cos.clone()
    others.fill_diagonal_(-2.0)
    n = len(train)
    between = ((features.sum(0).square().sum() - n) / (n * (n - 1))).item()
    return {"N": n, "ln N": math.log(n),
            "instance top-1 %": 100 * (rank == 0).double().mean().item(),
            "median rank": rank.median().item(),
            "cos own row": own.mean().item(),
            "cos best other row": others.max(1).values.mean().item(),
            "cos image-image": between,
            "row norm": weight.norm(dim=1).mean().item(),
            "loss at tau": F.cross_entropy(cos / cfg.model.temperature,
                                           torch.arange(n)).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = {run: row_scores(run) for run in args.runs}
    keys = list(next(iter(rows.values())))
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for run, r in rows.items():
        print(f"| {run} | " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")


if __name__ == "__main__":
    main()

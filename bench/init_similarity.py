"""How alike are a method's features at random initialisation: the cosine between the L2-
normalised head outputs of two different training images, mean and std over every pair of a
seeded sample, for the composed config with ``model.head_batch_norm`` false and true.

A memory bank or a classifier that starts from features pointing nearly one way (cosine near 1)
cannot tell images apart until the backbone has spread them; BN after the head centres them.

    python bench/init_similarity.py [--images 256] [HYDRA_OVERRIDES ...]
    python bench/init_similarity.py experiment=small_instdisc backbone=resnet_tiny data=folder \\
        data.root=DIR data.image_size=32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pic import config  # noqa: E402


def similarity(overrides: list[str], images: int) -> tuple[float, float]:
    """Mean and std of the cosine over the off-diagonal pairs of ``images`` training images
    (the first view of each, the encoder in train mode as in the first step)."""
    cfg = config.compose_config(["name=init_similarity", *overrides])
    torch.manual_seed(cfg.seed)
    train_set = instantiate(cfg.data).build("train", instantiate(cfg.augmentation))
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                        num_instances=len(train_set)).train()
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1))[:images]
    batch = torch.stack([train_set[int(i)]["crops"][0] for i in pick])
    with torch.no_grad():
        features = F.normalize(model.encoder([batch])[0], dim=1)
    cosine = (features @ features.T)[~torch.eye(len(pick), dtype=torch.bool)]
    return cosine.mean().item(), cosine.std().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config.register_schemas()
    print("| `model.head_batch_norm` | cosine between two images at init, mean | std |")
    print("|---|---:|---:|")
    for bn in (False, True):
        mean, std = similarity([*args.overrides, f"model.head_batch_norm={bn}"], args.images)
        print(f"| {str(bn).lower()} | {mean:.3f} | {std:.3f} |")


if __name__ == "__main__":
    main()

"""Composing the project's config in tests, exactly as launch.py does."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from pic import config

ROOT = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str) -> DictConfig:
    """The config launch.py would get; ``name`` (which reads Hydra's runtime) is fixed here."""
    if not any(o.startswith("name=") for o in overrides):
        overrides = ("name=test", *overrides)
    return config.compose_config(list(overrides))


class TinyImages(torch.utils.data.Dataset):
    """N fixed random 3×size×size images, in the item format of pic.data.base."""

    def __init__(self, n: int, size: int = 4) -> None:
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"crops": [self.images[i]], "index": i, "label": 0, "replaced": 0}

"""Composing the project's config in tests, exactly as launch.py does."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pic.config import CONF_DIR, register_schemas

ROOT = Path(__file__).resolve().parents[1]
register_schemas()


def compose_config(*overrides: str) -> DictConfig:
    """The config launch.py would get; ``name`` (which reads Hydra's runtime) is fixed here."""
    if not any(o.startswith("name=") for o in overrides):
        overrides = ("name=test", *overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


class TinyImages(torch.utils.data.Dataset):
    """N fixed random 3×size×size images, in the item format of pic.data.base."""

    def __init__(self, n: int, size: int = 4) -> None:
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"crops": [self.images[i]], "index": i, "label": 0, "replaced": 0}

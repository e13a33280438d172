"""Composing the project's config in tests, exactly as launch.py does."""

from __future__ import annotations

from pathlib import Path

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

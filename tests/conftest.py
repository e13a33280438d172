"""Shared test set-up: the single-machine SLURM cluster fixture, and no network for W&B."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

pytest_plugins = ["tests.slurm.cluster"]

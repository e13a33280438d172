"""Shared test set-up: the single-machine SLURM cluster fixture, no network for W&B, and a
baseline cache private to this session (shared by its tests and the processes they start; a
developer's ~/.cache/pic is never read)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["PIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="pic-test-cache-")
atexit.register(shutil.rmtree, os.environ["PIC_CACHE_DIR"], ignore_errors=True)

pytest_plugins = ["tests.slurm.cluster"]

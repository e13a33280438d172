"""Shared test set-up: the single-machine SLURM cluster fixture, no network for W&B, and a
baseline cache private to this session (shared by its tests and the processes they start; a
developer's ~/.cache/pic is never read), and the layout of a parallel run.

`make test` runs the suite in one pytest-xdist worker per core (`-n auto --dist loadgroup`):
many tests wait on subprocesses, SLURM or the disk, and one process used only ~1.1 of 2 cores.
Each worker then gets its share of the cores as its thread count (an explicit OMP_NUM_THREADS
wins), so that two workers do not each run two threads on two cores.
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The controller of a parallel run makes it; its workers inherit it (entries are written
# atomically, so two workers may score the same baseline at once).
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["PIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="pic-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PIC_CACHE_DIR"], ignore_errors=True)

pytest_plugins = ["tests.slurm.cluster"]


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """All SLURM tests in one worker (one session cluster serves them), and the SLURM and slow
    tests handed out first, so that no long test starts when the other worker is nearly done."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: (not item.get_closest_marker("slurm"),
                                 not item.get_closest_marker("slow")))

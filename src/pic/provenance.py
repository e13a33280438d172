"""What a checkpoint or a result came from: the dataset's fingerprint and the code's version.

Stored in every checkpoint and ``results.json`` (flat keys, see :func:`provenance`), so that a
resume refuses to continue on different data unless told (``allow_dataset_change=true``) and
``python -m pic.collect`` shows, per row, which data and which code produced it.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


class DatasetChanged(RuntimeError):
    """A resume on data other than the checkpoint's."""


def _git(*args: str) -> str | None:
    """stdout of ``git args`` run in the package's folder, or None when git cannot say."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or it hangs (a network file system)
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``code_commit`` (40 hex digits) and ``code_dirty`` (tracked files modified), both None
    when the package does not run from a git checkout (an installed wheel, a copied tree)."""
    # The package itself must be tracked there: an install inside some other repository's
    # folder (a virtualenv in a project) would otherwise report that repository's commit.
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"code_commit": None, "code_dirty": None}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"code_commit": commit, "code_dirty": None if status is None else bool(status)}


def provenance(dataset: Any) -> dict[str, Any]:
    """``data_fingerprint`` (see ``InstanceDataset.fingerprint``) and the code version."""
    return {"data_fingerprint": dataset.fingerprint(), **code_version()}


def describe_code(record: dict[str, Any]) -> str:
    """``1a2b3c4d5e``, ``1a2b3c4d5e+dirty`` or ``unknown``, from a record of :func:`provenance`."""
    commit = record.get("code_commit")
    if not commit:
        return "unknown"
    return commit[:10] + ("+dirty" if record.get("code_dirty") else "")


def check_same_dataset(saved: dict[str, Any], current: dict[str, Any], path: Path,
                       allow_change: bool) -> None:
    """Refuse (or, with ``allow_change``, warn) when checkpoint ``path`` was written while
    training on another dataset. Either side without a fingerprint (a checkpoint older than
    fingerprints, a run given none) passes."""
    before, now = saved.get("data_fingerprint"), current.get("data_fingerprint")
    if before is None or now is None or before == now:
        return
    message = (f"{path} was trained on dataset {before}, the configured data is {now} (another "
               "data.root, or files added, removed or relabelled)")
    if allow_change:
        log.warning("%s; continuing on the new data (allow_dataset_change=true)", message)
        return
    raise DatasetChanged(f"{message}. To continue training on the new data pass "
                         "allow_dataset_change=true; to start afresh use another hydra.run.dir.")

"""Per-epoch evaluation rows that survive resumes (the kNN monitor, the linear task)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import dist
from ..engine.checkpoint import atomic_write_text


class MetricHistory:
    """Rows ``{"epoch": e, **scores}`` in a JSON file beside the checkpoint, so that a resumed
    run reports every epoch; an epoch recorded again after a resume replaces its earlier row.
    Rank 0 writes (atomically); every rank keeps the same rows."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.by_epoch: dict[float, dict[str, float]] = {}
        if resume and path.is_file():
            self.by_epoch = {row["epoch"]: row for row in json.loads(path.read_text())}

    def record(self, epoch: float, scores: dict[str, float]) -> None:
        self.by_epoch[epoch] = {"epoch": epoch, **scores}
        if dist.is_main():
            atomic_write_text(json.dumps(self.rows(), indent=1) + "\n", self.path)

    def rows(self, until: float = float("inf")) -> list[dict[str, float]]:
        """The rows of epochs ≤ ``until``, by epoch."""
        return [self.by_epoch[e] for e in sorted(self.by_epoch) if e <= until]

    def __contains__(self, epoch: float) -> bool:
        return epoch in self.by_epoch

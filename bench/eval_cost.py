"""Where the default run's evaluation time goes: each phase's CPU seconds, in one process.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/eval_cost.py --threads 1

CPU time of this process (user + system), so that a crowded machine still gives each phase's
cost; with ``--threads 1`` no thread waits for another. Prints a table.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from pic.config import compose_config
from pic.engine.features import extract_features, pixels
from pic.tasks.common import eval_splits
from pic.tasks.pretrain import _plot


def cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def timed(rows: list[tuple[str, float, float]], name: str, fn: Callable[[], Any]) -> Any:
    wall, cpu = time.perf_counter(), cpu_s()
    out = fn()
    rows.append((name, cpu_s() - cpu, time.perf_counter() - wall))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(["name=bench"])
    data, rows = instantiate(cfg.data), []
    bank, val = eval_splits(data)
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone), num_instances=len(bank))
    knn, probe = instantiate(cfg.eval), instantiate(cfg.task.probe)
    device = torch.device("cpu")
    features = {}
    for name, net in (("network", model.backbone), ("pixels", pixels())):
        f = features[name] = timed(rows, f"{name}: features of {len(bank) + len(val)} images",
                                   lambda n=net: (*extract_features(n, bank, 256, device),
                                                  *extract_features(n, val, 256, device)))
        pairs = len(probe.lr) * len(probe.weight_decay)
        timed(rows, f"{name}: kNN, {len(knn.k) * len(knn.temperature)} k x T pairs",
              lambda f=f: knn.score(*f, data.num_classes))
        timed(rows, f"{name}: probe ({f[0].shape[1]}-d, {pairs} pairs)",
              lambda f=f: probe.fit(*f, data.num_classes))
    _, _, val_f, val_y = features["network"]
    timed(rows, f"t-SNE + plot of {len(val)} points",
          lambda: _plot(Path(tempfile.gettempdir()) / "eval_cost.png", [(1, 1.0)], val_f, val_y,
                        "bench"))
    print(f"{'phase':<44} {'CPU s':>7} {'wall s':>7}   ({args.threads} threads)")
    for name, cpu, wall in rows:
        print(f"{name:<44} {cpu:>7.1f} {wall:>7.1f}")


if __name__ == "__main__":
    main()

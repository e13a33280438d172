"""BN statistics per crop vs per resolution group: the cost of ``model.bn_per_crop``.

One resolution group of k crops of B images (PIC's three small crops, SimCLR's two views)
through backbone + head, forward and backward, three ways: one call on the concatenated
crops with BN statistics of all k·B rows (``bn_per_crop=false``); one call with per-crop
statistics (ghost batches, ``bn_per_crop=true``); k separate calls (the authors' code).
Interleaved repeats, median ms per step; prints a Markdown table.

    python bench/bn_per_crop.py [--batch 64] [--crops 3] [--size 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pic.networks.batchnorm import convert_batchnorm  # noqa: E402
from pic.networks.heads import MultiCropEncoder, projection_head  # noqa: E402
from pic.networks.resnet import TinyResNet  # noqa: E402


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return f"{name}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = MultiCropEncoder(TinyResNet([32, 64, 128]), projection_head(128, 128))
    per_crop = convert_batchnorm(copy.deepcopy(plain), sync=False)
    per_crop.bn_per_crop = True
    crops = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.crops)]
    ways = {
        "concatenated (bn_per_crop=false)": lambda: plain(crops),
        "per crop, one call (bn_per_crop=true)": lambda: per_crop(crops),
        "k separate calls (authors' code)": lambda: [plain([c])[0] for c in crops],
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.repeats + 1):
        for name, run in (ways.items() if r % 2 else reversed(ways.items())):
            start = time.perf_counter()
            sum(o.square().sum() for o in run()).backward()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["concatenated (bn_per_crop=false)"])
    print(f"\nOne group of {args.crops} crops × {args.batch} images at {args.size} px, TinyResNet "
          f"32-64-128 + MLP head, fp32, forward + backward, on {cpu_name()}; median of "
          f"{args.repeats}\n")
    print("| BN statistics | ms per step | vs concatenated |")
    print("|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {1e3 * t:.1f} | {t / base:.2f}× |")


if __name__ == "__main__":
    main()

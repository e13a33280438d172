"""Step time and peak memory of PIC's classifier head: dense vs sampled, N = 10^4 … 10^8.

One step = forward + backward + update of the head alone on a fixed feature batch (B×D,
features requiring grad): cosine logits against all N rows (dense, torch.optim.SGD on W) or
against the positives plus K sampled rows (sampled: its own SGD on those rows, lazy weight
update correction, the round-robin sweep). Each configuration runs in a fresh subprocess, so
the peak memory is its own: ``peak RSS`` is the kernel's high-water mark (VmHWM; with mmap it
includes file pages of the mapping, which the kernel can drop), ``peak anon`` the largest
anonymous (non-file) resident memory sampled after set-up and after every step.

    python bench/pic_head.py [--sizes 1e4 1e5 1e6 1e7 1e8] [--num-negatives 4096] [--steps 20]
                             [--rounds 1] [--sampling uniform|recent]

Prints a Markdown table; "vs first N" is the best step time over that of the smallest N of the
same head. With ``--rounds R`` every configuration runs R times, the sizes alternating, and
keeps its best round: on a shared machine a burst of load then spoils one round, not one size.
Configurations that do not fit in RAM (or on disk, for mmap) are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

B, D = 256, 128


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def measure(kind: str, n: int, k: int, steps: int, directory: str, sampling: str) -> dict:
    """Runs in the subprocess: build the head, time ``steps`` steps after 3 warm-up steps."""
    import torch

    from pic.data.samplers import SlidingWindowSampler
    from pic.losses import instance_classification_loss
    from pic.networks.classifier import InstanceClassifier, SampledInstanceClassifier

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(0)
    features = torch.randn(B, D, requires_grad=True)
    start = time.perf_counter()
    if kind == "dense":
        clf = InstanceClassifier(n, D)
        opt = torch.optim.SGD(clf.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    else:
        storage = kind.split("-")[1]
        clf = SampledInstanceClassifier(n, D, num_negatives=k, sampling=sampling,
                                        storage=storage, storage_dir=directory)
        os.sync()  # time steps, not the write-back of the freshly written files
    setup_s = time.perf_counter() - start
    peak_anon = status_kib("RssAnon")
    times, rows = [], 0
    # uniform: positives uniform over N too; recent: PIC's setting, positives from the sliding
    # window (default W and S), negatives the most recent instances.
    window = iter(SlidingWindowSampler(n)) if sampling == "recent" else None
    for step in range(steps + 3):
        if window is None:
            labels = torch.randint(n, (B,))
        else:
            labels = torch.tensor([next(window) for _ in range(B)])
        t0 = time.perf_counter()
        weight, pos = clf(labels)
        loss = instance_classification_loss(features, weight, pos, 0.2)
        loss.backward()
        if kind == "dense":
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            clf.after_step(0.03)
        features.grad = None
        if step >= 3:
            times.append(time.perf_counter() - t0)
        rows = weight.shape[0]
        peak_anon = max(peak_anon, status_kib("RssAnon"))
    # The fastest step: on a shared machine the others measure the neighbours.
    return {"step_ms": 1000 * min(times), "median_ms": 1000 * statistics.median(times),
            "rows": rows, "setup_s": setup_s, "peak_anon_mib": peak_anon / 1024,
            "peak_rss_mib": status_kib("VmHWM") / 1024}


def skip_reason(kind: str, n: int, directory: str) -> str | None:
    table = n * D * 4
    if kind == "dense":  # W, its gradient and momentum; logits, softmax and their gradient
        need = 3 * table + 4 * B * n * 4
        if need > 0.6 * mem_available():
            return f"needs ~{need / 2**30:.0f} GiB RAM (W, grad, momentum, B×N logits)"
    elif kind == "sampled-device":
        if 2 * table > 0.6 * mem_available():
            return f"W + momentum need {2 * table / 2**30:.0f} GiB RAM"
    else:  # the table file (W, momentum, update count) and one checkpoint snapshot of it
        need = 4 * table
        free = shutil.disk_usage(directory).free
        if need > free:
            return (f"needs ~{need / 2**30:.0f} GiB disk (the W + momentum file and one "
                    f"checkpoint snapshot), {free / 2**30:.0f} GiB free")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--num-negatives", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sampling", choices=["uniform", "recent"], default="uniform",
                        help="negatives (and positives: uniform, or from the sliding window)")
    parser.add_argument("--kinds", nargs="+",
                        default=["dense", "sampled-device", "sampled-mmap"])
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the mmap files go (needs free disk)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, k, steps, directory, sampling = args.child
        print(json.dumps(measure(kind, int(n), int(k), int(steps), directory, sampling)))
        return

    print(f"PIC head, B={B}, D={D}, K={args.num_negatives} {args.sampling} negatives, "
          f"{os.environ.get('BENCH_THREADS', '1')} threads, {args.steps} steps, "
          f"best of {args.rounds} round(s)\n")
    results: dict[tuple[int, str], dict | str] = {}
    for _ in range(args.rounds):
        for n in map(int, args.sizes):
            for kind in args.kinds:
                previous = results.get((n, kind))
                if isinstance(previous, str):
                    continue  # skipped or failed: no use trying again
                print(f"running N={n:.0e} {kind}", file=sys.stderr, flush=True)
                result = run_one(kind, n, args)
                if isinstance(result, str) or previous is None or \
                        result["step_ms"] < previous["step_ms"]:
                    results[(n, kind)] = result
    print("| N | head | rows scored | best step ms | vs first N | median ms | peak anon MiB "
          "| peak RSS MiB | set-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    first: dict[str, float] = {}
    for (n, kind), r in results.items():
        if isinstance(r, str):
            print(f"| {n:.0e} | {kind} | {r} | | | | | | |")
            continue
        ratio = r["step_ms"] / first.setdefault(kind, r["step_ms"])
        print(f"| {n:.0e} | {kind} | {r['rows']} | {r['step_ms']:.1f} | {ratio:.2f}x | "
              f"{r['median_ms']:.1f} | {r['peak_anon_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['setup_s']:.1f} |")


def run_one(kind: str, n: int, args: argparse.Namespace) -> dict | str:
    """One configuration in a fresh subprocess: its measurements, or why there are none."""
    # The 10^8 row is for mmap only: device storage would need 2·N·D·4 = 95 GiB.
    directory = tempfile.mkdtemp(prefix="pic_head_", dir=args.dir)
    try:
        reason = skip_reason(kind, n, directory)
        if reason:
            return f"skipped: {reason}"
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(n), str(args.num_negatives),
             str(args.steps), directory, args.sampling],
            capture_output=True, text=True, check=False)
        if out.returncode:
            tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
            return f"failed: {tail[0]}"
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

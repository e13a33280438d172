"""Step time, memory, checkpoints and disk of PIC's classifier head, N = 10^4 … 10^8.

One step = forward + backward + update of the head alone on a fixed feature batch (B×D,
features requiring grad): cosine logits against all N rows (dense, torch.optim.SGD on W) or
against the positives plus K sampled rows (sampled: its own SGD on those rows, lazy weight
update correction, block parking). With ``--sampling recent`` (default) the positives come from
the sliding-window sampler (W = 131072, S = 16384) and the table is in its order (``-index``:
row i = image i). Each configuration runs in a fresh subprocess, so memory is its own: peak
anonymous and peak file-backed resident memory (pages of the table file the process holds),
sampled after set-up and every step. A checkpoint (sync_state + state_dict) every
``--checkpoint-every`` steps: its time, and its bytes (the undo journal of the interval plus
the state). Disk: the table file's allocated blocks after the run, per row written.

    python bench/pic_head.py [--sizes 1e4 1e6 1e7 1e8] [--num-negatives 4096 65536]
                             [--steps 30] [--rounds 3] [--sampling recent|uniform]
                             [--kinds sampled-mmap sampled-mmap-bfloat16 sampled-mmap-index]

Prints the CPU, the load average, and a Markdown table; "vs first N" is the median step time
over that of the smallest N of the same head and K. Rounds are interleaved (sizes, K and heads
alternate), and the median is over every timed step of every round: on a shared machine a
burst of load spoils no single configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

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


def sliding_window(n: int) -> Iterator[int]:
    """The sliding-window sampler's images, window after window (one window of N <= W images
    is shorter than the bench)."""
    from pic.data.samplers import SlidingWindowSampler

    sampler = SlidingWindowSampler(n)
    for t in itertools.count():
        sampler.set_epoch(t)
        yield from sampler


def measure(kind: str, n: int, k: int, steps: int, directory: str, sampling: str,
            every: int) -> dict:
    """Runs in the subprocess: build the head, time ``steps`` steps after 3 warm-up steps,
    with a checkpoint (sync_state + state_dict) every ``every`` steps."""
    import io

    import torch

    from pic.losses import instance_classification_loss
    from pic.networks.classifier import InstanceClassifier, SampledInstanceClassifier

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(0)
    features = torch.randn(B, D, requires_grad=True)
    start = time.perf_counter()
    if kind == "dense":
        clf = InstanceClassifier(n, D)
        opt = torch.optim.SGD(clf.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    else:  # sampled-<storage>[-<dtype>][-index]: window order unless -index
        parts = kind.split("-")
        dtype = next((p for p in parts if p in ("bfloat16", "float16")), "float32")
        clf = SampledInstanceClassifier(n, D, num_negatives=k, sampling=sampling,
                                        storage=parts[1], storage_dir=directory, dtype=dtype,
                                        order_seed=None if "index" in parts else 0)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.03, momentum=0.9,
                              weight_decay=1e-4)
        clf.attach(opt)
    setup_s = time.perf_counter() - start
    peak = {"anon": status_kib("RssAnon"), "file": status_kib("RssFile")}
    times, ckpt_s, ckpt_bytes, rows, visited = [], [], [], 0, set()
    if kind != "dense":  # the rows written: every write goes through the store's scatter
        scatter = clf.store.scatter
        clf.store.scatter = lambda r, raw: visited.update(r.tolist()) or scatter(r, raw)
    # uniform: positives uniform over N too; recent: PIC's setting, positives from the sliding
    # window (default W and S), negatives the most recent rows.
    window = sliding_window(n) if sampling == "recent" else None
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
            clf.after_step()
        features.grad = None
        if step >= 3:
            times.append(time.perf_counter() - t0)
        rows = weight.shape[0]
        if kind != "dense" and (step + 1) % every == 0:
            journal = clf.store.journal_bytes()  # the rows written since the last checkpoint
            t0 = time.perf_counter()
            clf.sync_state()
            state = io.BytesIO()
            torch.save(clf.state_dict(), state)
            ckpt_s.append(time.perf_counter() - t0)
            ckpt_bytes.append(journal + state.tell())
        for key, field in (("anon", "RssAnon"), ("file", "RssFile")):
            peak[key] = max(peak[key], status_kib(field))
    out = {"times_ms": [1000 * t for t in times], "rows": rows, "setup_s": setup_s,
           "peak_anon_mib": peak["anon"] / 1024, "peak_file_mib": peak["file"] / 1024}
    if kind != "dense":
        out.update(ckpt_ms=1000 * statistics.median(ckpt_s[1:] or ckpt_s),
                   ckpt_mib=statistics.median(ckpt_bytes[1:] or ckpt_bytes) / 2**20,
                   disk_mib=clf.store.allocated_bytes() / 2**20, visited=len(visited))
    return out


def skip_reason(kind: str, n: int, directory: str) -> str | None:
    table = n * D * 4
    if kind == "dense":  # W, its gradient and momentum; logits, softmax and their gradient
        need = 3 * table + 4 * B * n * 4
        if need > 0.6 * mem_available():
            return f"needs ~{need / 2**30:.0f} GiB RAM (W, grad, momentum, B×N logits)"
    elif "mmap" not in kind and 2 * table > 0.6 * mem_available():
        return f"W + momentum need {2 * table / 2**30:.0f} GiB RAM"
    # mmap: a sparse file; the disk it takes is measured (rows written), not needed up front.
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e6, 1e7, 1e8])
    parser.add_argument("--num-negatives", type=int, nargs="+", default=[4096])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--sampling", choices=["uniform", "recent"], default="recent",
                        help="negatives (and positives: uniform, or from the sliding window)")
    parser.add_argument("--kinds", nargs="+", default=["sampled-mmap"],
                        help="dense, or sampled-<device|host|mmap>[-bfloat16|-float16][-index]")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the mmap files go")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, k, steps, directory, sampling, every = args.child
        print(json.dumps(measure(kind, int(n), int(k), int(steps), directory, sampling,
                                 int(every))))
        return

    print(f"PIC head, B={B}, D={D}, {args.sampling} negatives, "
          f"{os.environ.get('BENCH_THREADS', '1')} threads, {args.steps} steps × "
          f"{args.rounds} interleaved round(s), a checkpoint every {args.checkpoint_every} "
          f"steps; {machine()}\n")
    results: dict[tuple[int, int, str], list[dict] | str] = {}
    for r in range(args.rounds):  # configurations alternate: a burst of load spoils none
        print(f"round {r + 1}: load average {os.getloadavg()[0]:.1f}", flush=True)
        for n in map(int, args.sizes):
            for k in args.num_negatives:
                for kind in args.kinds:
                    key = (n, k, kind)
                    if isinstance(results.get(key), str):
                        continue  # skipped or failed: no use trying again
                    print(f"running N={n:.0e} K={k} {kind}", file=sys.stderr, flush=True)
                    result = run_one(kind, n, k, args)
                    if isinstance(result, str):
                        results[key] = result
                    else:
                        results.setdefault(key, []).append(result)  # type: ignore[union-attr]
        print(f"load average {os.getloadavg()[0]:.1f}")
        print_table(results)  # after every round: a run cut short keeps what it measured


def machine() -> str:
    """The CPU's model name and whether it has native bf16 (avx512_bf16)."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    return f"{name}, {'native' if 'avx512_bf16' in info else 'no native'} bf16"


def print_table(results: dict[tuple[int, int, str], list[dict] | str]) -> None:
    print("| N | K | head | rows scored | median step ms | vs first N | peak anon MiB "
          "| peak file-backed MiB | checkpoint ms | MiB per checkpoint | disk MiB "
          "| disk B per row written | set-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    first: dict[tuple[int, str], float] = {}
    for (n, k, kind), runs in sorted(results.items(), key=lambda item: item[0][::-1]):
        if isinstance(runs, str):
            print(f"| {n:.0e} | {k} | {kind} | {runs} |" + " |" * 9)
            continue
        median = statistics.median(t for r in runs for t in r["times_ms"])
        ratio = median / first.setdefault((k, kind), median)
        r = runs[-1]
        peak_anon = max(x["peak_anon_mib"] for x in runs)
        peak_file = max(x["peak_file_mib"] for x in runs)
        extra = (f"{r['ckpt_ms']:.0f} | {r['ckpt_mib']:.1f} | {r['disk_mib']:.0f} | "
                 f"{r['disk_mib'] * 2**20 / max(r['visited'], 1):.0f}") if "ckpt_ms" in r \
            else " | | |"
        print(f"| {n:.0e} | {k} | {kind} | {r['rows']} | {median:.1f} | {ratio:.2f}x | "
              f"{peak_anon:.0f} | {peak_file:.0f} | {extra} | {r['setup_s']:.1f} |", flush=True)


def run_one(kind: str, n: int, k: int, args: argparse.Namespace) -> dict | str:
    """One configuration in a fresh subprocess: its measurements, or why there are none."""
    directory = tempfile.mkdtemp(prefix="pic_head_", dir=args.dir)
    try:
        reason = skip_reason(kind, n, directory)
        if reason:
            return f"skipped: {reason}"
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(n), str(k),
             str(args.steps), directory, args.sampling, str(args.checkpoint_every)],
            capture_output=True, text=True, check=False)
        if out.returncode:
            tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
            return f"failed: {tail[0]}"
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

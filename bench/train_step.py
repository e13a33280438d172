"""The platform's training step against a hand-written PyTorch loop, and the GPU speed options.

Overhead (the default): for PIC and SimCLR, the objects launch.py builds (config composed with
Hydra, model, optimizer and lr schedule instantiated from it) trained by
``Trainer.train_step`` — the call ``Trainer.fit`` makes for every batch — plus fit's metric
sums and its log-point reduction every ``trainer.log_every`` steps, against a minimal loop
written here by hand: the same network, the loss written out (cosine softmax for PIC, NT-Xent
for SimCLR), ``backward``, the same optimizer's ``step``. Both train on one in-memory batch
(data loading is not compared), with the config's precision and layout. Repeats are
interleaved (which loop goes first alternates) and the ratio is taken per pair of adjacent
measurements, so slow drifts of a shared machine cancel; medians over pairs are reported.

    python bench/train_step.py [OVERRIDE ...] [--repeats 9] [--steps 8]
    python bench/train_step.py trainer.precision=fp32 trainer.channels_last=false

Options (``--device cuda``): images/s of ResNet-50 at 224 px (one crop per image) and of PIC's
multi-crop (one 160 px + three 96 px crops) through ``Trainer.train_step``, with the config's
defaults and with each speed option flipped; FLOPs per step are counted from the model
(``torch.utils.flop_counter``: convolutions and matrix products, forward and backward) and
divided by the step time and the GPU's dense bf16 peak (``--peak-tflops``, 989 for H100/H200
SXM; 835 for H200 NVL).

    python bench/train_step.py --device cuda [--batch-size 256]

``--quick`` runs either mode on a tiny network for a few steps (a smoke test).
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pic import config  # noqa: E402
from pic.engine.trainer import PRECISIONS, Trainer, Window  # noqa: E402

QUICK = ["backbone=resnet_tiny", "backbone.widths=[8,16]", "trainer.batch_size=16",
         "data.image_size=16"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def compose_config(overrides: list[str]) -> DictConfig:
    """The config launch.py would compose for these overrides (``name`` fixed, no logger)."""
    return config.compose_config(["name=bench", "logger=none", *overrides])


class Setup:
    """Model, optimizer, lr schedule and trainer built from ``cfg`` as the pretrain task does."""

    def __init__(self, cfg: DictConfig, num_instances: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.trainer: Trainer = instantiate(cfg.trainer)
        self.model = instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                                 num_instances=num_instances).to(self.trainer.device)
        self.optimizer = instantiate(cfg.optimizer, model=self.model,
                                     batch_size=self.trainer.batch_size)
        self.model.attach(self.optimizer, self.trainer.scaler)  # as Trainer.fit does
        self.lr_at = instantiate(cfg.schedule)(self.optimizer.defaults["lr"], 10_000, 100.0)


def digits_batch(cfg: DictConfig) -> tuple[dict[str, Any], int]:
    """One real training batch of the config's data and augmentation, and the dataset size."""
    torch.manual_seed(0)
    data = instantiate(cfg.data)
    train_set = data.build("train", instantiate(cfg.augmentation), 0, 1)
    items = [train_set[i] for i in range(cfg.trainer.batch_size)]
    return torch.utils.data.default_collate(items), len(train_set)


# ---------------------------------------------------------------------- the hand-written loop
def bare_loss(method: str, model: torch.nn.Module, crops: list[torch.Tensor],
              index: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The loss as a researcher would write it: features under autocast, loss in fp32."""
    device = crops[0].device.type
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        z = model.encoder.head(model.encoder.backbone(torch.cat(crops)))
    z = F.normalize(z.float(), dim=1)
    if method == "pic":
        w = F.normalize(model.classifier.weight, dim=1)
        return F.cross_entropy(z @ w.T / model.temperature, index.repeat(len(crops)))
    n = z.shape[0]  # SimCLR: z = [z1; z2], the positive of row i is row (i + n/2) mod n
    sim = (z @ z.T / model.temperature).fill_diagonal_(float("-inf"))
    return F.cross_entropy(sim, (torch.arange(n, device=z.device) + n // 2) % n)


def bare_steps(method: str, s: Setup, crops: list[torch.Tensor], index: torch.Tensor,
               start: int, steps: int) -> torch.Tensor:
    dtype = PRECISIONS[s.trainer.precision]
    for step in range(start, start + steps):
        for group in s.optimizer.param_groups:
            group["lr"] = s.lr_at(step)
        loss = bare_loss(method, s.model, crops, index, dtype)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------- the platform's loop
class PlatformLoop:
    """``Trainer.train_step`` with fit's per-step bookkeeping (metric sums, log points)."""

    def __init__(self, s: Setup, batch: dict[str, Any]) -> None:
        self.s, self.batch = s, batch
        self.window = Window()  # fit's metric sums and log-point reduction

    def run(self, start: int, steps: int) -> torch.Tensor:
        t, s = self.s.trainer, self.s
        for step in range(start, start + steps):
            finite, grad_norm, metrics = t.train_step(s.model, s.model, s.optimizer, self.batch,
                                                      s.lr_at(step))
            self.window.add(metrics, t.batch_size)
            if (step + 1) % t.log_every == 0:
                self.window.reduce(grad_norm)
        return metrics["loss"]


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def overhead(method: str, overrides: list[str], repeats: int, steps: int) -> dict[str, Any]:
    """Interleaved timings of the platform loop and the bare loop for one method."""
    cfg = compose_config([f"model={method}", *overrides])
    batch, n = digits_batch(cfg)
    platform_setup, bare_setup = Setup(cfg, n), Setup(cfg, n)
    bare_setup.model.load_state_dict(platform_setup.model.state_dict())
    # The platform converts its model itself (Trainer.prepare, as fit does); the hand-written
    # loop gets the same layout by hand, and both take the batch already in that layout.
    platform_setup.trainer.prepare(platform_setup.model)
    layout = torch.channels_last if platform_setup.trainer.channels_last else \
        torch.contiguous_format
    device = platform_setup.trainer.device
    bare_setup.model.to(memory_format=layout).train()
    platform_setup.model.train()
    crops = [c.to(device, memory_format=layout) for c in batch["crops"]]
    index = batch["index"].to(device)
    loop = PlatformLoop(platform_setup, {"crops": crops, "index": index})

    # The two loops compute the same loss on the same weights (a check that they compare
    # like with like), then warm up.
    first_platform = loop.run(0, 1)
    first_bare = bare_steps(method, bare_setup, crops, index, 0, 1)
    if not torch.allclose(first_platform.float(), first_bare.float(), rtol=1e-3):
        raise RuntimeError(f"{method}: platform loss {float(first_platform):.6f} != hand-written "
                           f"loss {float(first_bare):.6f} at step 0")
    loop.run(1, 2)
    bare_steps(method, bare_setup, crops, index, 1, 2)

    plat_times, bare_times, step = [], [], 3
    for r in range(repeats):
        order = ("platform", "bare") if r % 2 == 0 else ("bare", "platform")
        for which in order:
            if which == "platform":
                plat_times.append(timed(lambda s=step: loop.run(s, steps), device))
            else:
                bare_times.append(timed(
                    lambda s=step: bare_steps(method, bare_setup, crops, index, s, steps), device))
        step += steps
    ratios = sorted(p / b for p, b in zip(plat_times, bare_times, strict=True))
    return {
        "method": method, "batch": cfg.trainer.batch_size,
        "precision": platform_setup.trainer.precision,
        "channels_last": cfg.trainer.channels_last,
        "optimizer": type(platform_setup.optimizer).__name__,
        "platform": steps / statistics.median(plat_times),
        "bare": steps / statistics.median(bare_times),
        "ratio": statistics.median(ratios), "ratio_lo": ratios[0], "ratio_hi": ratios[-1],
        "ratio_fastest": min(plat_times) / min(bare_times),
        "spread": (max(bare_times) - min(bare_times)) / statistics.median(bare_times),
    }


def print_overhead(rows: list[dict[str, Any]], repeats: int, steps: int) -> None:
    print(f"\nPlatform step vs hand-written loop on {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {repeats} interleaved "
          f"repeats of {steps} steps, medians. One in-memory batch: data loading excluded.\n")
    print("| method | batch | precision | channels_last | optimizer | platform steps/s | "
          "bare steps/s | time ratio platform ÷ bare: median over pairs (min–max) | "
          "fastest ÷ fastest | bare spread |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['batch']} | {r['precision']} | {r['channels_last']} | "
              f"{r['optimizer']} | {r['platform']:.3f} | {r['bare']:.3f} | {r['ratio']:.3f} "
              f"({r['ratio_lo']:.3f}–{r['ratio_hi']:.3f}) | {r['ratio_fastest']:.3f} | "
              f"{100 * r['spread']:.0f}% |")
    print("\nfastest ÷ fastest: the ratio of each loop's fastest repeat (other processes only "
          "ever add time). bare spread: (slowest − fastest) ÷ median of the hand-written loop's "
          "timings, the machine's noise.")


# ---------------------------------------------------------------------- GPU options
WORKLOADS = {  # name -> crop sizes per image
    "224 px": [224],
    "PIC multi-crop": [160, 96, 96, 96],
}


def option_rows(quick: bool) -> list[tuple[str, list[str], str]]:
    """(label, trainer overrides, where the batch starts: device | pinned | pageable)."""
    rows = [("config defaults", [], "device"),
            ("precision=fp32", ["trainer.precision=fp32"], "device"),
            ("precision=fp16", ["trainer.precision=fp16"], "device"),
            ("channels_last=false", ["trainer.channels_last=false"], "device"),
            ("cudnn_benchmark=false", ["trainer.cudnn_benchmark=false"], "device"),
            ("batch from host, pinned, non_blocking", [], "pinned"),
            ("batch from host, pageable", [], "pageable")]
    if not quick:  # compiling takes minutes on a CPU: the quick smoke run leaves it out
        rows.insert(4, ("compile=true", ["trainer.compile=true"], "device"))
    return rows


def step_flops(s: Setup, batch: dict[str, Any]) -> int:
    """FLOPs of one training step (forward + backward), counted by PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        s.trainer.train_step(s.model, s.model, s.optimizer, batch, s.lr_at(0))
    return counter.get_total_flops()


def options(device: str, overrides: list[str], batch_size: int, sizes: dict[str, list[int]],
            steps: int, warmup: int, peak_tflops: float, quick: bool) -> None:
    base = ["model=pic", "data=synthetic", f"trainer.device={device}",
            f"trainer.batch_size={batch_size}", *(QUICK if quick else ["backbone=resnet50"]),
            *overrides]
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    print(f"\nTrainer.train_step on {name}, PIC (N = 10,000 instances), ResNet-50 unless --quick, "
          f"per-device batch {batch_size}; {steps} timed steps after {warmup} warm-up steps; "
          f"FLOP fraction of {peak_tflops:g} TFLOP/s. {time.strftime('%Y-%m-%d')}, "
          f"torch {torch.__version__}.\n")
    print("| workload | option | images/s | ms/step | TFLOP/s | fraction of peak |")
    print("|---|---|---|---|---|---|")
    for workload, crop_sizes in sizes.items():
        flops = None
        for label, extra, source in option_rows(quick):
            cfg = compose_config([*base, *extra])
            s = Setup(cfg, num_instances=10_000)
            s.trainer.prepare(s.model)
            s.model.train()
            g = torch.Generator().manual_seed(0)
            crops = [torch.randn(batch_size, 3, px, px, generator=g) for px in crop_sizes]
            if source == "device":
                crops = [c.to(dev) for c in crops]
            elif source == "pinned" and dev.type == "cuda":
                crops = [c.pin_memory() for c in crops]
            batch = {"crops": crops, "index": torch.randperm(10_000, generator=g)[:batch_size]}
            if flops is None:  # the same network and batch in every row: count once
                flops = step_flops(s, batch)
            for i in range(warmup):
                s.trainer.train_step(s.model, s.model, s.optimizer, batch, s.lr_at(i))
            seconds = timed(lambda s=s, b=batch: [
                s.trainer.train_step(s.model, s.model, s.optimizer, b, s.lr_at(i))
                for i in range(steps)], dev) / steps
            tflops = flops / seconds / 1e12
            print(f"| {workload} | {label} | {batch_size / seconds:.0f} | {1e3 * seconds:.1f} | "
                  f"{tflops:.1f} | {tflops / peak_tflops:.1%} |", flush=True)
            del s, batch, crops
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (trainer.precision=fp32)")
    parser.add_argument("--device", default="cpu", help="cpu (overhead table) or cuda (options)")
    parser.add_argument("--options", action="store_true",
                        help="the options table (the default with --device cuda)")
    parser.add_argument("--methods", nargs="+", default=["pic", "simclr"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed repeat")
    parser.add_argument("--batch-size", type=int, default=256, help="options table only")
    parser.add_argument("--peak-tflops", type=float, default=989.4,
                        help="the device's dense bf16 peak (H100/H200 SXM: 989.4)")
    parser.add_argument("--quick", action="store_true", help="tiny network, few steps")
    args = parser.parse_args(argv)

    if args.options or args.device.startswith("cuda"):
        if args.quick:
            options(args.device, args.overrides, 4, {"16 px": [16], "multi-crop": [16, 8, 8]},
                    steps=1, warmup=1, peak_tflops=args.peak_tflops, quick=True)
        else:
            options(args.device, args.overrides, args.batch_size, WORKLOADS, steps=20, warmup=5,
                    peak_tflops=args.peak_tflops, quick=False)
        return
    if args.device != "cpu":
        raise SystemExit(f"--device {args.device}: the overhead table runs on cpu, the options "
                         "table on cuda")
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    repeats, steps = (2, 1) if args.quick else (args.repeats, args.steps)
    rows = [overhead(m, overrides, repeats, steps) for m in args.methods]
    print_overhead(rows, repeats, steps)


if __name__ == "__main__":
    main()

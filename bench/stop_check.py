"""Cost of the trainer's per-step stop vote (``Trainer._start_stop_vote``) under DDP.

    python bench/stop_check.py [--world 2] [--calls 200]

A stop request (a signal on any rank) must end the run at the same step on every rank, so
with a process group the trainer all-reduces one flag every step, started before the step and
read after it. This starts ``world`` gloo processes on this machine's CPU and times a tiny DDP
training step (ResNet-tiny, 8 px, batch 8 per rank: the cheapest step there is, where the vote
weighs most) alone, followed by a blocking all-reduce of the flag, and with the trainer's
overlapped vote; prints a Markdown table. In one process the vote is a flag read.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_step import cpu_name  # noqa: E402  (this folder heads sys.path)

from pic import dist  # noqa: E402
from pic.engine.trainer import Trainer  # noqa: E402
from pic.networks.resnet import TinyResNet  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_time(fn, calls: int) -> float:
    rounds = []
    for _ in range(5):
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def worker(rank: int, world: int, port: int, calls: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    trainer = Trainer(device="cpu")
    net = torch.nn.parallel.DistributedDataParallel(TinyResNet([8, 16]))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(8, 3, 8, 8)

    def step() -> None:
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    def blocking_vote() -> None:
        step()
        bool(dist.all_reduce_sum(torch.tensor([0.0])).item() > 0)

    def overlapped_vote() -> None:
        vote = trainer._start_stop_vote()
        step()
        vote()

    times = {name: median_time(fn, calls) for name, fn in
             (("step", step), ("blocking", blocking_vote), ("overlapped", overlapped_vote))}
    if rank == 0:
        out.update(times)
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.world, free_port(), args.calls, out), nprocs=args.world)
        times = dict(out)
    print(f"\nPer-step stop vote, {args.world} gloo processes on {cpu_name()} "
          f"({os.cpu_count()} cores), median of 5 rounds of {args.calls} steps\n")
    print("| step | µs per step | vs the step alone |")
    print("|---|---|---|")
    rows = (("tiny DDP step alone (ResNet-tiny, 8 px, batch 8)", "step"),
            ("step, then a blocking all-reduce of the flag", "blocking"),
            ("step with the vote overlapping it (the trainer's)", "overlapped"))
    for label, key in rows:
        print(f"| {label} | {times[key] * 1e6:.0f} | {times[key] / times['step']:.3f} |")


if __name__ == "__main__":
    main()

"""Two gloo processes on CPU against one process: the methods are correct under DDP.

One module-scoped job spawns 2 ranks once and runs every scenario; each test checks one
property against a single-process computation.

- SimCLR: one step of 2 ranks × B/2 equals 1 process × B. Its backbone keeps BN, converted to
  SyncBN (model.sync_bn), which over 2 ranks computes the statistics of the whole batch.
- PIC: same property, with a backbone *without* BN: PIC keeps per-rank BN (as the paper does),
  which couples the loss to how the batch is split, so only a BN-free network can match.
- InstDisc bank and MoCo queue are identical on both ranks after several steps.
- MoCo's shuffle BN permutes the global batch across ranks before the key encoder.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from pic.engine.lars import lars
from pic.engine.optim import sgd
from pic.models.instdisc import InstDisc
from pic.models.moco import MoCo
from pic.models.pic import PIC
from pic.models.simclr import SimCLR
from pic.networks.resnet import TinyResNet

WORLD, BATCH, N = 2, 8, 16  # global batch of 8: 4 per rank
SHUFFLE_SEED = 123


class NoBNNet(nn.Module):
    """conv → ReLU → conv → ReLU → global pool; no batch statistics anywhere."""

    out_dim = 12

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny() -> nn.Module:
    return TinyResNet(widths=[8, 16, 16])


def batch(step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The global batch of a step: two views (B×3×12×12) and B distinct instance indices."""
    g = torch.Generator().manual_seed(step)
    views = [torch.randn(BATCH, 3, 12, 12, generator=g) for _ in range(2)]
    return views, torch.randperm(N, generator=g)[:BATCH]


def local(crops: list[torch.Tensor], index: torch.Tensor, rank: int, world: int
          ) -> tuple[list[torch.Tensor], torch.Tensor]:
    size = BATCH // world
    part = slice(rank * size, (rank + 1) * size)
    return [c[part] for c in crops], index[part]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, crops: list[torch.Tensor],
               index: torch.Tensor) -> None:
    """What the trainer does in one step (DDP wrap when distributed)."""
    net = model
    if torch_dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    model.attach(opt)
    loss, _ = net(crops, index)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.after_step()


def one_step(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """State after one step of SimCLR or PIC, run by ``world`` processes."""
    torch.manual_seed(0)
    if name == "simclr":
        model = SimCLR(tiny(), feature_dim=8, temperature=0.1, sync_bn=True)
        opt = lars(model, BATCH, lr=0.3)
    else:
        model = PIC(NoBNNet(), num_instances=N, feature_dim=8, temperature=0.2,
                    classifier_init_norm=1.0)
        opt = sgd(model, BATCH, lr=0.3)
    train_step(model, opt, *local(*batch(0), rank, world))
    return {k: v.clone() for k, v in model.state_dict().items()}


def several_steps(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if name == "instdisc":
        model = InstDisc(tiny(), num_instances=N, feature_dim=8, num_negatives=5)
    else:
        model = MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=2 * BATCH)
    opt = sgd(model, BATCH, lr=0.3)
    torch.manual_seed(1 + rank)  # the ranks' random draws (negatives) differ, as in a real run
    for step in range(3):
        train_step(model, opt, *local(*batch(step), rank, world))
    return {k: v.clone() for k, v in model.state_dict().items()
            if k in ("bank", "queue", "queue_ptr")}


def shuffle_bn(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=BATCH)
    (x, _), _ = local(*batch(7), rank, world)
    shuffled, perm = model.shuffle(x)
    torch.manual_seed(SHUFFLE_SEED)  # rank 0's draw decides the permutation
    return {"shuffled": shuffled, "perm": perm, "keys": model.keys(x)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: one_step(name, rank, world) for name in ("simclr", "pic")}
        results.update({name: several_steps(name, rank, world) for name in ("instdisc", "moco")})
        results["shuffle_bn"] = shuffle_bn(rank, world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", ["simclr", "pic"])
def test_one_step_on_two_ranks_equals_one_process(ranks, name: str) -> None:
    expected = one_step(name, rank=0, world=1)
    for r in range(WORLD):
        got = ranks[r][name]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)
    start = {"simclr": lambda: SimCLR(tiny(), feature_dim=8),
             "pic": lambda: PIC(NoBNNet(), num_instances=N, feature_dim=8)}[name]
    torch.manual_seed(0)
    init = start().state_dict()
    # The step moved the weights by much more than the tolerance: the comparison has power.
    moved = max((expected[k].float() - init[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3


@pytest.mark.parametrize("name,key", [("instdisc", "bank"), ("moco", "queue")])
def test_memory_identical_on_both_ranks(ranks, name: str, key: str) -> None:
    assert torch.equal(ranks[0][name][key], ranks[1][name][key])
    torch.manual_seed(0)
    fresh = (InstDisc(tiny(), num_instances=N, feature_dim=8) if name == "instdisc"
             else MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=2 * BATCH))
    initial = getattr(fresh, key)
    if name == "instdisc":
        # Rows of both ranks' samples moved on both ranks; the others did not.
        seen = torch.cat([batch(s)[1] for s in range(3)]).unique()
        changed = (ranks[0][name][key] != initial).any(dim=1).nonzero().flatten()
        assert torch.equal(changed, seen)
    else:
        # 3 steps × global batch 8 into 16 slots: every slot was written, pointer at 8.
        assert (ranks[0][name][key] != initial).any(dim=1).all()
        assert ranks[0][name]["queue_ptr"].item() == ranks[1][name]["queue_ptr"].item() == 8


def test_moco_shuffle_bn_permutes_across_ranks(ranks) -> None:
    (x, _), _ = batch(7)
    half = BATCH // WORLD
    perm = ranks[0]["shuffle_bn"]["perm"]
    assert torch.equal(perm, ranks[1]["shuffle_bn"]["perm"])
    assert torch.equal(perm.sort().values, torch.arange(BATCH))
    for r in range(WORLD):
        mine = perm[r * half:(r + 1) * half]
        torch.testing.assert_close(ranks[r]["shuffle_bn"]["shuffled"], x[mine])
        assert ((mine // half) != r).any(), "no sample crossed to another rank"
    # The keys: each rank's key-encoder BN saw its permuted slice, then outputs went home.
    torch.manual_seed(0)
    model = MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=BATCH)
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(BATCH)
    with torch.no_grad():
        out = torch.empty(BATCH, 8)
        for r in range(WORLD):
            rows = perm[r * half:(r + 1) * half]
            out[rows] = model.key_encoder([x[rows]])[0]
        unshuffled_bn = torch.cat([model.key_encoder([x[r * half:(r + 1) * half]])[0]
                                   for r in range(WORLD)])
    expected = nn.functional.normalize(out, dim=1)
    got = torch.cat([ranks[r]["shuffle_bn"]["keys"] for r in range(WORLD)])
    torch.testing.assert_close(got, expected)
    # Without the shuffle the keys would differ: the check above sees which samples shared BN.
    assert (nn.functional.normalize(unshuffled_bn, dim=1) - expected).abs().max() > 1e-3

"""Two gloo processes on CPU against one process: the methods are correct under DDP.

One module-scoped job spawns 2 ranks once and runs every scenario; each test checks one
property against a single-process computation.

- SimCLR: one step of 2 ranks × B/2 equals 1 process × B. Its backbone keeps BN, converted to
  SyncBN (model.sync_bn), which over 2 ranks computes the statistics of the whole batch (of
  both views, or of each view with model.bn_per_crop).
- PIC: same property, with a backbone *without* BN: PIC keeps per-rank BN (as the paper does),
  which couples the loss to how the batch is split, so only a BN-free network can match.
- InstDisc bank and MoCo queue (keys and their images) are identical on both ranks after several
  steps.
- MoCo's shuffle BN permutes the global batch across ranks before the key encoder.
- With a float64 model, SimCLR's SyncBN step on 2 ranks equals 1 process to float64's
  precision (statistics and running buffers in float64).
- Every method takes a step under bf16 and under fp16 autocast (SyncBN keeps its statistics
  in fp32), and SimCLR's 2-rank step under bf16 matches the 1-process one within bf16's error.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from pic.engine.lars import lars
from pic.engine.optim import sgd
from pic.launch.local import free_port
from pic.models.instdisc import InstDisc
from pic.models.moco import MoCo
from pic.models.pic import PIC
from pic.models.simclr import SimCLR
from pic.networks.resnet import TinyResNet

WORLD, BATCH, N = 2, 8, 16  # global batch of 8: 4 per rank
SHUFFLE_SEED = 123
METHODS = ("pic", "instdisc", "moco", "simclr")
ONE_STEP = ("simclr", "simclr_per_crop", "pic")
SYNC_BN = ("simclr", "simclr_per_crop")


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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, crops: list[torch.Tensor],
               index: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """What the trainer does in one step (DDP wrap when distributed); returns the loss."""
    net = model
    if torch_dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    model.attach(opt)
    dtype = PRECISIONS[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, _ = net(crops, index)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.after_step()
    return loss.detach()


def one_step(name: str, rank: int, world: int, precision: str = "fp32", sync_bn: bool = True
             ) -> dict[str, torch.Tensor]:
    """State after one step of SimCLR or PIC, run by ``world`` processes; ``fp64``: the
    model and data in float64 (the reference for the bf16 step)."""
    torch.manual_seed(0)
    if name.startswith("simclr"):  # simclr_per_crop: each view's own (synchronised) statistics
        model = SimCLR(tiny(), feature_dim=8, temperature=0.1, sync_bn=sync_bn,
                       bn_per_crop=name == "simclr_per_crop")
        opt = lars(model, BATCH, lr=0.3)
    else:
        model = PIC(NoBNNet(), num_instances=N, feature_dim=8, temperature=0.2,
                    classifier_init_norm=1.0)
        opt = sgd(model, BATCH, lr=0.3)
    crops, index = local(*batch(0), rank, world)
    if precision == "fp64":
        model.double()
        crops, precision = [c.double() for c in crops], "fp32"
    train_step(model, opt, crops, index, precision)
    return {k: v.clone() for k, v in model.state_dict().items()}


def float64_step(name: str, rank: int, world: int) -> dict:
    """:func:`one_step` in float64 (SyncBN statistics and running buffers included): the
    state, or the error that stopped it."""
    try:
        return {"state": one_step(name, rank, world, precision="fp64")}
    except RuntimeError as e:
        return {"error": str(e)}


def new_method(name: str) -> nn.Module:
    """Each method on a backbone with BN (SimCLR's converted to SyncBN when distributed); PIC
    and SimCLR with BN statistics per view (per-chunk, and synchronised per-chunk, BN)."""
    if name == "simclr":
        return SimCLR(tiny(), feature_dim=8, sync_bn=True, bn_per_crop=True)
    if name == "pic":
        return PIC(tiny(), num_instances=N, feature_dim=8, bn_per_crop=True)
    if name == "instdisc":
        return InstDisc(tiny(), num_instances=N, feature_dim=8, num_negatives=5)
    return MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=BATCH)


def autocast_step(name: str, precision: str, rank: int, world: int) -> dict:
    """One step of a method under bf16 or fp16 autocast: the loss, the state after the step,
    or the error that stopped it."""
    torch.manual_seed(0)
    model = new_method(name)
    opt = lars(model, BATCH, lr=0.3) if name == "simclr" else sgd(model, BATCH, lr=0.3)
    crops, index = local(*batch(0), rank, world)
    try:
        loss = train_step(model, opt, crops[:1] if name == "instdisc" else crops, index,
                          precision)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"loss": loss, "state": {k: v.clone() for k, v in model.state_dict().items()}}


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
            if k in ("bank", "queue", "queue_ptr", "queue_index")}


def shuffle_bn(rank: int, world: int) -> dict[str, torch.Tensor]:
    """float64: the keys are compared with a one-process computation (see ``F64``)."""
    torch.manual_seed(0)
    model = MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=BATCH).double()
    (x, _), _ = local(*batch(7), rank, world)
    x = x.double()
    shuffled, perm = model.shuffle(x)
    torch.manual_seed(SHUFFLE_SEED)  # rank 0's draw decides the permutation
    return {"shuffled": shuffled, "perm": perm, "keys": model.keys(x)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: one_step(name, rank, world) for name in ONE_STEP}
        results.update({f"{name}_fp64": float64_step(name, rank, world) for name in SYNC_BN})
        results["simclr_bf16"] = one_step("simclr", rank, world, "bf16")
        results["simclr_bf16_local_bn"] = one_step("simclr", rank, world, "bf16", sync_bn=False)
        results["autocast"] = {(name, precision): autocast_step(name, precision, rank, world)
                               for name in METHODS for precision in ("bf16", "fp16")}
        results.update({name: several_steps(name, rank, world) for name in ("instdisc", "moco")})
        results["shuffle_bn"] = shuffle_bn(rank, world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


# The tests of the two ranks' results share one spawn (`ranks`): one xdist worker runs them all.
SHARES_RANKS = pytest.mark.xdist_group("test_distributed.ranks")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# float64 (unit roundoff 1.1e-16): computations that differ only in the order of their sums
# agree to a few hundred roundoffs after one step of these small networks; 1e-10 leaves a margin
# of 10^3 on any CPU and is 10^7 below what a wrong split would cost.
F64 = {"rtol": 1e-10, "atol": 1e-12}
U32 = 2.0 ** -24  # float32's unit roundoff


@SHARES_RANKS
@pytest.mark.parametrize("name", ONE_STEP)
def test_one_step_on_two_ranks_equals_one_process(ranks, name: str) -> None:
    """float32 on 2 ranks and in 1 process against the float64 step. The split changes only the
    order of float32 sums (SyncBN statistics, the gradient all-reduce), so each run is about as
    far from exact arithmetic as the other: per tensor, the 2-rank error is within 4 times the
    1-process step's own error (the spread between two orderings' rounding errors), plus 8
    roundoffs of the tensor's norm for tensors that the 1-process step happens to get exact.
    The bound comes from the run itself, whatever the CPU's vector width."""
    single = one_step(name, rank=0, world=1)
    expected = one_step(name, rank=0, world=1, precision="fp64")
    for r in range(WORLD):
        got = ranks[r][name]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if not value.is_floating_point():
                assert torch.equal(got[key], single[key]), key
                continue
            bound = 4 * (single[key].double() - value).norm() + 8 * U32 * value.norm()
            error = (got[key].double() - value).norm()
            assert error <= bound, (key, error.item(), bound.item())
    start = {"simclr": lambda: SimCLR(tiny(), feature_dim=8),
             "simclr_per_crop": lambda: SimCLR(tiny(), feature_dim=8),
             "pic": lambda: PIC(NoBNNet(), num_instances=N, feature_dim=8)}[name]
    torch.manual_seed(0)
    init = start().state_dict()
    # The step moved the weights by much more than the tolerance: the comparison has power.
    moved = max((expected[k].float() - init[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3


@SHARES_RANKS
@pytest.mark.parametrize("name", SYNC_BN)
def test_syncbn_step_in_float64_on_two_ranks_equals_one_process(ranks, name: str) -> None:
    """A float64 model with SyncBN: 2 ranks × B/2 against 1 process × B, float64 throughout
    (the statistics and running buffers too). The split changes only the order of float64
    sums, hence ``F64``. Statistics rounded to float32 anywhere miss it by orders of
    magnitude, as the float32 2-rank step does (float32 roundoff 6e-8 ≫ 1e-10)."""
    expected = one_step(name, rank=0, world=1, precision="fp64")
    float32_caught = False
    for r in range(WORLD):
        assert "error" not in ranks[r][f"{name}_fp64"], ranks[r][f"{name}_fp64"]["error"]
        got = ranks[r][f"{name}_fp64"]["state"]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype, key  # float64 buffers stay float64
            torch.testing.assert_close(got[key], value, **F64, msg=lambda m, key=key: f"{key}: {m}")
            if value.is_floating_point():
                float32_caught |= not torch.allclose(ranks[r][name][key].double(), value,
                                                     rtol=1e3 * F64["rtol"],
                                                     atol=1e3 * F64["atol"])
    # The float32 2-rank step is outside even 1000 times the tolerance: the test has power.
    assert float32_caught


@SHARES_RANKS
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
        # Each slot records its key's image, gathered in the global batch's order: step 2's
        # images overwrote slots 0-7, step 1's are in 8-15.
        expected = torch.cat([batch(2)[1], batch(1)[1]])
        for rank in ranks:
            assert torch.equal(rank[name]["queue_index"], expected)


@SHARES_RANKS
def test_moco_shuffle_bn_permutes_across_ranks(ranks) -> None:
    (x, _), _ = batch(7)
    half = BATCH // WORLD
    perm = ranks[0]["shuffle_bn"]["perm"]
    assert torch.equal(perm, ranks[1]["shuffle_bn"]["perm"])
    assert torch.equal(perm.sort().values, torch.arange(BATCH))
    for r in range(WORLD):
        mine = perm[r * half:(r + 1) * half]
        assert torch.equal(ranks[r]["shuffle_bn"]["shuffled"], x[mine].double())  # a gather
        assert ((mine // half) != r).any(), "no sample crossed to another rank"
    # The keys: each rank's key-encoder BN saw its permuted slice, then outputs went home.
    torch.manual_seed(0)
    model = MoCo(tiny(), num_instances=N, feature_dim=8, queue_size=BATCH).double()
    x = x.double()
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(BATCH)
    with torch.no_grad():
        out = torch.empty(BATCH, 8, dtype=torch.float64)
        for r in range(WORLD):
            rows = perm[r * half:(r + 1) * half]
            out[rows] = model.key_encoder([x[rows]])[0]
        unshuffled_bn = torch.cat([model.key_encoder([x[r * half:(r + 1) * half]])[0]
                                   for r in range(WORLD)])
    expected = nn.functional.normalize(out, dim=1)
    got = torch.cat([ranks[r]["shuffle_bn"]["keys"] for r in range(WORLD)])
    torch.testing.assert_close(got, expected, **F64)
    # Without the shuffle the keys would differ: the check above sees which samples shared BN.
    assert (nn.functional.normalize(unshuffled_bn, dim=1) - expected).abs().max() > 1e-3


@SHARES_RANKS
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_one_step_under_autocast_on_two_ranks(ranks, name: str, precision: str) -> None:
    got = [ranks[r]["autocast"][(name, precision)] for r in range(WORLD)]
    for r in range(WORLD):
        assert "error" not in got[r], got[r].get("error")
        assert torch.isfinite(got[r]["loss"])
    torch.manual_seed(0)
    init = new_method(name).state_dict()
    params = dict(new_method(name).named_parameters())
    for key, value in got[0]["state"].items():
        assert torch.isfinite(value.float()).all(), key
        assert value.dtype == init[key].dtype, key  # buffers keep their dtype
        if key in params:  # DDP averaged the gradients: both ranks took the same step
            assert torch.equal(value, got[1]["state"][key]), key
    moved = max((got[0]["state"][k].float() - init[k].float()).abs().max().item() for k in params)
    assert moved > 1e-3
    if name == "simclr":  # SyncBN: running statistics of the global batch, on both ranks
        stats = [k for k in init if k.endswith(("running_mean", "running_var"))]
        assert stats and all(torch.equal(got[0]["state"][k], got[1]["state"][k]) for k in stats)


@SHARES_RANKS
def test_simclr_two_ranks_equal_one_process_under_bf16(ranks) -> None:
    """2 ranks × B/2 against 1 process × B, both under bf16 autocast. Both runs make the same
    bf16 roundings of the same values (the split changes only the order of fp32 sums: the
    SyncBN statistics, the gradient all-reduce), so each is as far from exact arithmetic as
    the other, and by the triangle inequality they differ by at most twice the 1-process
    step's error against a float64 step (plus twice its fp32 error, which covers tensors that
    bf16 leaves exact). The bound is per tensor and comes from the run itself."""
    single = one_step("simclr", rank=0, world=1, precision="bf16")
    exact = one_step("simclr", rank=0, world=1, precision="fp64")
    fp32 = one_step("simclr", rank=0, world=1)
    torch.manual_seed(0)
    init = SimCLR(tiny(), feature_dim=8).state_dict()
    moved_far, local_bn_caught = False, False
    for key, value in single.items():
        if not value.is_floating_point():
            assert all(torch.equal(ranks[r]["simclr_bf16"][key], value) for r in range(WORLD))
            continue
        value = value.double()
        bound = 2 * ((value - exact[key]).norm() + (fp32[key].double() - exact[key]).norm())
        for r in range(WORLD):
            split = (ranks[r]["simclr_bf16"][key].double() - value).norm()
            assert split <= bound, (key, split.item(), bound.item())
        moved_far |= bool((value - init[key].double()).norm() > 10 * bound)
        local_bn = (ranks[0]["simclr_bf16_local_bn"][key].double() - value).norm()
        local_bn_caught |= bool(local_bn > 10 * bound)
    # The step moved weights by far more than the bound, and per-rank BN statistics (the
    # defect SyncBN exists to prevent) exceed it: the comparison has power.
    assert moved_far and local_bn_caught

"""PIC at scale: negative sampling, exact weight update correction, window-ordered sparse rows.

References are independent: dense PIC with torch.optim.SGD, and a float64 explicit loop of
PyTorch's SGD rule over every row (zero gradient for rows outside the step's set).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pic.networks.correction as module
from pic.data.samplers import SlidingWindowSampler
from pic.engine.schedules import Cosine
from pic.engine.trainer import Trainer
from pic.launch.local import free_port
from pic.logging.loggers import NoLogger
from pic.losses import instance_classification_loss
from pic.models.pic import PIC
from pic.networks.classifier import InstanceClassifier, SampledInstanceClassifier
from pic.networks.correction import initial_rows, mix64, uniform_rows

from .helpers import TinyImages
from .scale_steps import (
    TAU,
    WD,
    M,
    after,
    attached,
    batch,
    child,
    lr_at,
    run_steps,
    sampled,
    sampled_step,
)

EPS32 = torch.finfo(torch.float32).eps


def float32_bound(steps: int, scale: float) -> float:
    """Largest difference float32 SGD on the rows can have from exact arithmetic after
    ``steps`` updates of values of magnitude <= ``scale``: each update rounds at most 4 float32
    operations per element (weight decay, momentum scale and add, lr step), each by at most
    eps·scale, and a rounding error once made is carried on, not amplified (|1 − ηλ| ≤ 1,
    m < 1). Not tuned on a CPU: it holds for any vector width or FMA use."""
    return 4 * steps * EPS32 * scale


@pytest.mark.parametrize("storage", ["device", "host", "mmap"])
def test_all_rows_equal_dense_pic_with_torch_sgd(tmp_path: Path, storage: str) -> None:
    torch.manual_seed(3)
    clf = sampled(tmp_path, 64, storage=storage)  # num_negatives=None: all rows
    dense = InstanceClassifier(64, 16)
    with torch.no_grad():
        dense.weight.copy_(clf.weight)  # the same initialisation
    opt = torch.optim.SGD(dense.parameters(), lr=1.0, momentum=M, weight_decay=WD)
    w_scale = b_scale = 0.0
    for step in range(30):
        feats, labels = batch(step, 64, 8)
        w, y = dense(labels)
        opt.param_groups[0]["lr"] = lr_at(step)
        opt.zero_grad()
        instance_classification_loss(feats, w, y, TAU).backward()
        opt.step()
        sampled_step(clf, step, 8)
        after(clf, lr_at(step))
        buf = opt.state[dense.weight]["momentum_buffer"]
        w = dense.weight.detach()
        w_scale = max(w_scale, float(w.abs().max() + lr_at(step) * buf.abs().max()))
        b_scale = max(b_scale, float(buf.abs().max() + dense.weight.grad.abs().max()))
        # Two float32 computations of the same updates: each within the bound of the exact one.
        assert_within(clf.weight, dense.weight.detach(), 2 * float32_bound(step + 1, w_scale))
    assert_within(clf.momentum_buffer, buf, 2 * float32_bound(30, b_scale))


def reference_run(clf: SampledInstanceClassifier, steps: int, b: int,
                  check_every_step: bool) -> None:
    """Runs ``clf`` and a float64 dense-SGD loop side by side; rows outside the step's set
    get a zero gradient in the reference. Compares every row (brought up to date)."""
    n = clf.num_instances
    w64 = clf.weight.double().clone()
    b64 = torch.zeros_like(w64)
    w_scale = b_scale = 0.0  # the magnitudes the float32 updates of w and b work at
    for step in range(steps):
        rows = sampled_step(clf, step, b)
        feats, labels = batch(step, n, b)
        # The gradient of the sampled loss, in float64, from the reference's own rows.
        sub = w64[rows].clone().requires_grad_(True)  # rows: instance indices
        pos = torch.tensor([rows.tolist().index(i) for i in labels.tolist()])
        instance_classification_loss(feats.double(), sub, pos, TAU).backward()
        grad = torch.zeros_like(w64)
        grad[rows] = sub.grad
        eta = lr_at(step)
        for r in range(n):  # PyTorch's SGD rule, one row at a time
            b64[r] = M * b64[r] + grad[r] + WD * w64[r]
            w64[r] = w64[r] - eta * b64[r]
        b_scale = max(b_scale, float(b64.abs().max() + grad.abs().max() + WD * w64.abs().max()))
        w_scale = max(w_scale, float(w64.abs().max() + eta * b64.abs().max()))
        after(clf, eta)
        if check_every_step:
            w, mom = clf.current()
            assert_within(w, w64, bound(clf, step + 1, w_scale))
            assert_within(mom, b64, bound(clf, step + 1, b_scale))
    clf.sync_state()
    w, mom = clf.current()
    assert_within(w, w64, bound(clf, steps, w_scale))
    assert_within(mom, b64, bound(clf, steps, b_scale))


def bound(clf: SampledInstanceClassifier, steps: int, scale: float) -> float:
    """float32's bound, plus, for 16-bit rows, one rounding to the storage type (unit
    roundoff u = eps/2) per update, each at most u·scale, carried on unamplified."""
    u = torch.finfo(clf.store.dtype).eps / 2
    return float32_bound(steps, scale) + (steps * u * scale if u > EPS32 else 0.0)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=bound)


@pytest.mark.parametrize(("sampling", "order_seed"), [("uniform", None), ("recent", None),
                                                     ("recent", 5)])
def test_unsampled_rows_equal_zero_gradient_dense_sgd(tmp_path: Path, sampling: str,
                                                      order_seed: int | None) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 40, num_negatives=6, sampling=sampling, order_seed=order_seed)
    reference_run(clf, steps=40, b=4, check_every_step=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correction_over_long_gaps_parks_blocks(tmp_path: Path, dtype: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A short history and small blocks make rows outside the step's set go through parking
    # (a block brought to one update, then carried by one map) many times.
    monkeypatch.setattr(module, "MAX_GAP", 4)
    monkeypatch.setattr(module, "BLOCK_ROWS", 8)
    torch.manual_seed(1)
    clf = sampled(tmp_path, 30, num_negatives=3, sampling="uniform", storage="mmap",
                  order_seed=2, dtype=dtype)
    assert clf.correction.q.shape == (4, 4) and clf.correction.M.shape == (4, 4)
    parkings = torch.zeros(4, dtype=torch.long)
    parked = clf.correction.parked

    def counted(block: int, t: int) -> None:
        parkings[block] += 1
        parked(block, t)

    clf.correction.parked = counted
    reference_run(clf, steps=25, b=2, check_every_step=dtype == "float32")
    # Every block parked again and again (16 parkings in 25 updates: 4 per block), each row
    # carried through several parked maps, and compared with the float64 loop throughout.
    assert int(parkings.min()) >= 3, parkings


def test_without_correction_unsampled_rows_do_not_move(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 40, num_negatives=4, sampling="uniform", weight_correction=False)
    before = clf.weight
    rows = sampled_step(clf, 0, 4)
    after(clf, 0.5)
    moved = (clf.weight != before).any(dim=1)
    assert torch.equal(moved.nonzero().flatten(), rows)


def test_recent_negatives_are_the_latest_instances(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 100, num_negatives=12, sampling="recent")
    seen: list[int] = []
    for step in range(6):
        rows = set(sampled_step(clf, step, 4).tolist())
        labels = batch(step, 100, 4)[1].tolist()
        if step >= 3:  # the FIFO holds exactly the previous 3 batches
            assert rows == set(seen[-12:]) | set(labels)
        seen += labels
        after(clf, 0.1)


def test_uniform_rows_distinct_and_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(2000):
        rows = uniform_rows(50, 5, g)
        assert len(rows) == 5 and len(rows.unique()) == 5 and torch.all(rows[1:] > rows[:-1])
        counts[rows] += 1
    expected = 2000 * 5 / 50  # 200 per row; binomial sd ≈ 13.4
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * (1 - 5 / 50))
    draws = [uniform_rows(1000, 30, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*draws) and len(draws[0].unique()) == 30
    assert torch.equal(uniform_rows(7, 9, g), torch.arange(7))


def test_uniform_negatives_depend_only_on_seed_and_step(tmp_path: Path) -> None:
    torch.manual_seed(5)
    a = sampled(tmp_path / "a", 1000, num_negatives=20, sampling="uniform")
    torch.manual_seed(5)
    b = sampled(tmp_path / "b", 1000, num_negatives=20, sampling="uniform")
    for step in range(3):
        assert torch.equal(sampled_step(a, step, 4), sampled_step(b, step, 4))
        after(a, 0.1)
        after(b, 0.1)


def test_mmap_checkpoint_writes_no_table_and_resumes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 5000, num_negatives=5, sampling="recent", storage="mmap",
                  order_seed=1)
    run_steps(clf, range(5))
    state = clf.state_dict()  # a checkpoint at step 5
    at_5 = clf.weight
    run_steps(clf, range(5, 12))  # rows change in place after it
    assert not torch.equal(clf.weight, at_5)
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    # The table, the journal since the checkpoint and the one before it (kept until the next
    # checkpoint is in place): no copy of the table.
    assert files == ["pic_classifier.table", "pic_classifier.table.undo000000001",
                     "pic_classifier.table.undo000000002"]
    # The journal holds each row written since the checkpoint once, as it was at it: the
    # rows of 7 steps (at most 4 positives + 5 negatives each), not the table.
    written = clf.store.journal_bytes()
    assert 0 < written <= 7 * 9 * (8 + clf.store.row_bytes) + 7 * 8
    torch.manual_seed(0)
    resumed = sampled(tmp_path, 5000, num_negatives=5, sampling="recent", storage="mmap",
                      order_seed=1)
    resumed.load_state_dict(state)  # undoes the 7 steps in the shared file
    assert torch.equal(resumed.weight, at_5)
    run_steps(resumed, range(5, 12))
    again = fresh_run(tmp_path / "again", 12)
    assert torch.equal(resumed.weight, again.weight)  # bitwise: no row is synced on the way


def fresh_run(path: Path, steps: int) -> SampledInstanceClassifier:
    torch.manual_seed(0)
    clf = sampled(path, 5000, num_negatives=5, sampling="recent", storage="mmap", order_seed=1)
    run_steps(clf, range(steps))
    return clf


def test_window_rows_are_contiguous_and_the_file_sparse(tmp_path: Path) -> None:
    n, window, stride = 50000, 4096, 1024
    sampler = SlidingWindowSampler(n, seed=4, window_size=window, stride=stride)
    torch.manual_seed(0)
    clf = attached(SampledInstanceClassifier(n, 16, num_negatives=64, storage="mmap",
                                             order_seed=4, storage_dir=str(tmp_path)))
    for t in (0, 3, 48):  # 48: the window wraps around the list
        rows = clf.rows_of(torch.from_numpy(sampler.window(t)))
        assert torch.equal(rows.sort().values,
                           (t * stride + torch.arange(window)).remainder(n).sort().values)
    sampler.set_epoch(0)
    order = iter(sampler)
    for step in range(8):  # positives from window 0, the recent rows as negatives
        feats = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        rows, pos = clf(torch.tensor([next(order) for _ in range(32)]))
        instance_classification_loss(feats, rows, pos, TAU).backward()
        after(clf, 0.1)
    table = clf.store
    assert table.path.stat().st_size == n * table.row_bytes
    # Only pages holding a written row are on disk: the window's 4096 of the 50000 rows.
    assert table.allocated_bytes() <= window * table.row_bytes + 4096 * 2


def test_initial_rows_are_a_function_of_seed_and_row() -> None:
    rows = torch.tensor([0, 7, 123456789])
    whole = initial_rows(11, rows, 16, None)
    assert torch.equal(initial_rows(11, rows[1:2], 16, None), whole[1:2])
    assert not torch.equal(initial_rows(12, rows, 16, None), whole)
    big = initial_rows(3, torch.arange(20000), 16, None)
    assert abs(float(big.mean())) < 5 * 0.01 / math.sqrt(big.numel())
    assert abs(float(big.std()) - 0.01) < 0.01 * 5 / math.sqrt(2 * big.numel())
    norm = initial_rows(3, torch.arange(5), 16, 2.0).norm(dim=1)
    torch.testing.assert_close(norm, torch.full((5,), 2.0))


def test_mix64_is_splitmix64_modulo_2_64() -> None:
    def reference(x: int) -> int:  # Python integers: exact
        mask = (1 << 64) - 1
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    xs = [0, 1, 2**40 + 17, 2**62 - 1, -1, -(2**63)]
    got = mix64(torch.tensor(xs)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [reference(x & ((1 << 64) - 1)) for x in xs]


def run_child(directory: Path, kill: bool) -> int:
    script = Path(__file__).with_name("scale_steps.py")  # imports little: starts fast
    return subprocess.run([sys.executable, str(script), str(directory),
                           "kill" if kill else "-"], check=False).returncode


def test_mmap_table_resumes_exactly_after_kill_9(tmp_path: Path) -> None:
    child(str(tmp_path / "once"), kill=False)  # uninterrupted, in this process
    assert run_child(tmp_path / "killed", kill=True) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.pt").exists()
    assert run_child(tmp_path / "killed", kill=False) == 0
    once = torch.load(tmp_path / "once" / "final.pt")
    assert torch.equal(torch.load(tmp_path / "killed" / "final.pt"), once)


class TinyBackbone(nn.Sequential):
    out_dim = 8

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(48, 8))


def tiny_pic(**model_kw) -> PIC:
    torch.manual_seed(0)
    return PIC(TinyBackbone(), 64, feature_dim=16, mlp_head=False, classifier_init_norm=1.0,
               **model_kw)


def train_pic(out_dir: Path, max_steps: int, init: torch.Tensor | None = None,
              **model_kw) -> PIC:
    """Trains a tiny PIC; ``init``: the classifier's initial W (dense classifier)."""
    from pic.data.samplers import EpochSampler
    from pic.engine.optim import sgd

    model = tiny_pic(**model_kw)
    if init is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(init)
    trainer = Trainer(epochs=5, batch_size=8, max_steps=max_steps, checkpoint_every=7,
                      num_workers=0, device="cpu", progress=False)
    optimizer = sgd(model, 8, lr=3.0)
    trainer.fit(model, TinyImages(64), EpochSampler(64, seed=0), optimizer,
                Cosine(warmup_epochs=1.0), out_dir, NoLogger(), seed=0)
    model.trained_optimizer = optimizer  # for the tests' float32 bounds
    return model


def assert_models_close(a: PIC, b: PIC, steps: int) -> None:
    """Classifier rows and encoder parameters of two float32 runs of the same updates agree
    within twice the float32 bound (each is within it of the exact run) at their scale:
    the largest parameter and lr-scaled momentum of the run."""
    wa, wb = classifier_weight(a), classifier_weight(b)
    scale = float(wa.abs().max()) + 3.0 * 8 / 256 * max(
        float(buf.abs().max()) for buf in momentum_buffers(a))
    torch.testing.assert_close(wa, wb, rtol=0, atol=2 * float32_bound(steps, scale))
    for p, q in zip(a.encoder.parameters(), b.encoder.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=2 * float32_bound(steps, scale))


def momentum_buffers(model: PIC) -> list[torch.Tensor]:
    clf = model.classifier
    bufs = [model.trained_optimizer.state[p]["momentum_buffer"]
            for p in model.trained_optimizer.param_groups[0]["params"]]
    if isinstance(clf, SampledInstanceClassifier):
        bufs.append(clf.momentum_buffer)
    return bufs


def classifier_weight(model: PIC) -> torch.Tensor:
    clf = model.classifier
    if isinstance(clf, SampledInstanceClassifier):
        clf.sync_state()
    return clf.weight.detach().clone()


def test_pic_with_all_rows_sampled_equals_dense_pic(tmp_path: Path) -> None:
    kw = dict(num_negatives=64, negative_sampling="uniform")
    full = train_pic(tmp_path / "full", 30, **kw)
    dense = train_pic(tmp_path / "dense", 30, init=tiny_pic(**kw).classifier.weight)
    assert_models_close(full, dense, 30)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["host", "mmap"])
def test_sampled_pic_resumes_exactly(tmp_path: Path, storage: str) -> None:
    kw = dict(num_negatives=10, negative_sampling="recent", classifier_storage=storage,
              classifier_order_seed=0)
    once = train_pic(tmp_path / "once", 30, storage_dir=str(tmp_path / "once"), **kw)
    train_pic(tmp_path / "twice", 17, storage_dir=str(tmp_path / "twice"), **kw)
    twice = train_pic(tmp_path / "twice", 30, storage_dir=str(tmp_path / "twice"), **kw)
    assert once.classifier.t == twice.classifier.t == 30
    assert torch.equal(once.classifier.fifo, twice.classifier.fifo)
    # Bitwise: a checkpoint stores the rows and the correction state as they are.
    assert torch.equal(classifier_weight(twice), classifier_weight(once))
    for p, q in zip(twice.encoder.parameters(), once.encoder.parameters(), strict=True):
        assert torch.equal(p, q)


def _ddp_worker(rank: int, world: int, port: int, out: str, storage: str) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    # mmap: one file for both ranks (rank 0 writes it, both read it).
    clf = attached(SampledInstanceClassifier(60, 16, 1.0, 8, "uniform", True, storage,
                                             f"{out}/store", order_seed=6))
    for step in range(10):
        feats, labels = batch(step, 60, 8)
        mine = slice(rank * 4, rank * 4 + 4)
        rows, pos = clf(labels[mine])
        instance_classification_loss(feats[mine], rows, pos, TAU).backward()
        after(clf, lr_at(step))
    clf.sync_state()
    torch.save(clf.weight, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["host", "mmap"])
def test_ddp_ranks_share_rows_and_match_one_process(tmp_path: Path, storage: str) -> None:
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), storage), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    if storage == "mmap":
        assert [p.name for p in (tmp_path / "store").glob("*.table")] == ["pic_classifier.table"]
    torch.manual_seed(0)
    one = attached(SampledInstanceClassifier(60, 16, 1.0, 8, "uniform", True, "host",
                                             order_seed=6))
    for step in range(10):
        sampled_step(one, step, 8)
        after(one, lr_at(step))
    one.sync_state()
    # The ranks' mean gradient and one process's are sums in different orders: float32 apart.
    scale = float(one.weight.abs().max()) + max(map(lr_at, range(10))) * float(
        one.momentum_buffer.abs().max())
    torch.testing.assert_close(ranks[0], one.weight, rtol=0, atol=2 * float32_bound(10, scale))


@pytest.mark.parametrize(("kw", "match"), [
    ({"storage": "gpu"}, "model.classifier_storage='gpu'"),
    ({"sampling": "random"}, "model.negative_sampling='random'"),
    ({"num_negatives": 0}, "model.num_negatives=0"),
    ({"storage": "mmap", "storage_dir": None}, "needs model.storage_dir"),
    ({"dtype": "int8"}, "model.classifier_dtype='int8'"),
])
def test_bad_settings_name_the_key(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sampled(tmp_path, 10, **kw)


@pytest.mark.parametrize(("overrides", "match"), [
    (["optimizer=lars"], "got optimizer pic.engine.lars.LARS"),
    (["optimizer.nesterov=true"], "with nesterov"),
])
def test_sampled_classifier_refuses_an_optimizer_it_does_not_implement(overrides, match) -> None:
    from hydra.utils import instantiate

    from .helpers import compose_config

    def attach(*overrides: str) -> dict:
        cfg = compose_config("model.num_negatives=16", *overrides)
        model = instantiate(cfg.model, backbone=TinyBackbone(), num_instances=64)
        model.attach(instantiate(cfg.optimizer, model=model, batch_size=256))  # as the trainer
        return model.classifier.group

    with pytest.raises(ValueError, match=match):
        attach(*overrides)
    # The default optimizer is accepted, and its settings are the classifier's.
    group = attach("optimizer.momentum=0.8", "optimizer.weight_decay=0.01", "optimizer.lr=2.56")
    assert (group["momentum"], group["weight_decay"], group["lr"]) == (0.8, 0.01, 2.56)


@pytest.mark.parametrize("storage", ["device", "mmap"])
def test_native_row_moves_equal_torch_s(tmp_path: Path, storage: str, monkeypatch) -> None:
    from pic import native

    assert native.LIB is not None, "the native library is not built: `make install`"
    tables = []
    for lib in (native.LIB, None):  # the C gather/scatter, then index_select/index_copy_
        monkeypatch.setattr(native, "LIB", lib)
        torch.manual_seed(0)
        clf = sampled(tmp_path / str(lib is None), 50, num_negatives=7, sampling="uniform",
                      storage=storage)
        for step in range(12):
            sampled_step(clf, step, 4)
            after(clf, lr_at(step))
        tables.append(clf.store.table.clone())
    assert torch.equal(*tables)


def test_native_row_moves_check_the_range(tmp_path: Path) -> None:
    clf = sampled(tmp_path, 20, num_negatives=3, sampling="uniform")
    with pytest.raises(IndexError, match=r"outside \[0, 20\)"):
        clf.store.gather(torch.tensor([3, 20]))


def test_a_checkpoint_in_another_row_order_is_refused(tmp_path: Path) -> None:
    clf = sampled(tmp_path, 50, num_negatives=5, storage="host", order_seed=1)
    run_steps(clf, range(2))
    state = clf.state_dict()
    extra = next(k for k in state if k.endswith("_extra_state"))
    del state[extra]["order"]  # a checkpoint from before the counter-based list order
    fresh = sampled(tmp_path, 50, num_negatives=5, storage="host", order_seed=1)
    with pytest.raises(ValueError, match="'numpy'"):
        fresh.load_state_dict(state)
    state[extra]["order"] = fresh._order()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, clf.weight)


def test_synthetic_fingerprint_at_1e8_images_lists_no_image() -> None:
    from pic.data.synthetic import SyntheticData

    def fingerprint(**kw) -> str:
        return SyntheticData(**kw).build("train", lambda image: image).fingerprint()

    big = fingerprint(num_images=10**8)  # listing 10^8 names: minutes and gigabytes
    assert big == fingerprint(num_images=10**8)
    assert big != fingerprint(num_images=10**8 - 1) != fingerprint(num_images=10**8, seed=1)
    assert big != SyntheticData(num_images=10**8).build("val", lambda i: i).fingerprint()


def test_a_correction_checkpoint_holds_only_the_written_blocks(monkeypatch) -> None:
    """The checkpoint grows with the blocks visited, not with N, and restores every map
    bitwise: a block never written keeps M = P (composed with the same maps), so it need not
    be stored."""
    monkeypatch.setattr(module, "MAX_GAP", 4)
    monkeypatch.setattr(module, "BLOCK_ROWS", 8)
    c = module.Correction(80)  # 10 blocks
    for t in range(1, 8):
        c.advance(t, lr=0.1 * t, m=0.9, lam=1e-3)
        c.wrote(torch.tensor([9, 20 + t % 3]), t)  # blocks 1 and 2
        for block in c.due(t).tolist():
            c.parked(block, t)
    assert (c.park >= 0).any()  # some parking happened
    state = c.state_dict()
    assert state["blocks"].tolist() == [1, 2] and state["M"].shape == (4, 2)
    untouched = [b for b in range(10) if b not in (1, 2)]
    assert torch.equal(c.M[:, untouched], c.P[:, None].expand(4, len(untouched)))
    fresh = module.Correction(80)
    fresh.load_state_dict(state)
    for name in ("q", "P", "M", "park", "dirty"):
        assert torch.equal(getattr(fresh, name), getattr(c, name)), name
    with pytest.raises(ValueError, match="10 blocks of 8 rows, this classifier's 4 × 11"):
        module.Correction(88).load_state_dict(state)

"""PIC at scale: negative sampling, exact weight update correction, host/mmap storage.

References are independent: dense PIC with torch.optim.SGD, and a float64 explicit loop of
PyTorch's SGD rule over every row (zero gradient for rows outside the step's set).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pic.networks.classifier as module
from pic.engine.schedules import Cosine
from pic.engine.trainer import Trainer
from pic.logging.loggers import NoLogger
from pic.losses import instance_classification_loss
from pic.models.pic import PIC
from pic.networks.classifier import (
    InstanceClassifier,
    SampledInstanceClassifier,
    uniform_rows,
)

from .helpers import TinyImages

M, WD, TAU = 0.9, 1e-4, 0.2
EPS32 = torch.finfo(torch.float32).eps


def float32_bound(steps: int, scale: float) -> float:
    """Largest difference float32 SGD on the rows can have from exact arithmetic after
    ``steps`` updates of values of magnitude <= ``scale``: each update rounds at most 4 float32
    operations per element (weight decay, momentum scale and add, lr step), each by at most
    eps·scale, and a rounding error once made is carried on, not amplified (|1 − ηλ| ≤ 1,
    m < 1). Not tuned on a CPU: it holds for any vector width or FMA use."""
    return 4 * steps * EPS32 * scale


def lr_at(step: int) -> float:
    """A varying schedule, so that the correction has to use each step's own lr."""
    return 0.5 * (1 + math.cos(math.pi * step / 40)) + 0.05


def sampled(tmp_path: Path, n: int, **kw) -> SampledInstanceClassifier:
    kw.setdefault("storage_dir", str(tmp_path / "store"))
    return SampledInstanceClassifier(n, 16, momentum=M, weight_decay=WD, **kw)


def batch(step: int, n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features B×16 and distinct labels B, a function of the step alone."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(b, 16, generator=g), torch.randperm(n, generator=g)[:b]


def sampled_step(clf: SampledInstanceClassifier, step: int, b: int) -> torch.Tensor:
    feats, labels = batch(step, clf.num_instances, b)
    rows, pos = clf(labels)
    instance_classification_loss(feats, rows, pos, TAU).backward()
    return clf._pending[0].clone()  # the step's row set


@pytest.mark.parametrize("storage", ["device", "host", "mmap"])
def test_all_rows_equal_dense_pic_with_torch_sgd(tmp_path: Path, storage: str) -> None:
    torch.manual_seed(3)
    dense = InstanceClassifier(64, 16)
    opt = torch.optim.SGD(dense.parameters(), lr=1.0, momentum=M, weight_decay=WD)
    torch.manual_seed(3)
    clf = sampled(tmp_path, 64, storage=storage)  # num_negatives=None: all rows
    assert torch.equal(clf.weight, dense.weight.detach())  # same initialisation
    w_scale = b_scale = 0.0
    for step in range(30):
        feats, labels = batch(step, 64, 8)
        w, y = dense(labels)
        opt.param_groups[0]["lr"] = lr_at(step)
        opt.zero_grad()
        instance_classification_loss(feats, w, y, TAU).backward()
        opt.step()
        sampled_step(clf, step, 8)
        clf.after_step(lr_at(step))
        buf = opt.state[dense.weight]["momentum_buffer"]
        w_scale = max(w_scale, float(dense.weight.abs().max() + lr_at(step) * buf.abs().max()))
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
        sub = w64[rows].clone().requires_grad_(True)
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
        clf.after_step(eta)
        if check_every_step:
            current = clf._current(torch.arange(n))
            w, mom = current[:, :clf.dim], current[:, clf.dim:2 * clf.dim]
            assert_within(w, w64, float32_bound(step + 1, w_scale))
            assert_within(mom, b64, float32_bound(step + 1, b_scale))
    clf.sync_state()
    assert bool((clf.last == clf.t % module.CLOCK).all())
    assert_within(clf.weight, w64, float32_bound(steps, w_scale))
    assert_within(clf.momentum_buffer, b64, float32_bound(steps, b_scale))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=bound)


@pytest.mark.parametrize("sampling", ["uniform", "recent"])
def test_unsampled_rows_equal_zero_gradient_dense_sgd(tmp_path: Path, sampling: str) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 40, num_negatives=6, sampling=sampling)
    reference_run(clf, steps=40, b=4, check_every_step=True)


def test_correction_over_long_gaps_and_wrapping_update_counts(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A short history makes the sweep carry rows across many windows of it; a short clock
    # makes the stored update counts wrap around several times.
    monkeypatch.setattr(module, "MAX_GAP", 4)
    monkeypatch.setattr(module, "CLOCK", 8)
    torch.manual_seed(1)
    clf = sampled(tmp_path, 30, num_negatives=3, sampling="uniform", storage="mmap")
    assert clf.sweep_rows == 8 and clf.q.shape == (4, 4)
    reference_run(clf, steps=25, b=2, check_every_step=False)


def test_without_correction_unsampled_rows_do_not_move(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 40, num_negatives=4, sampling="uniform", weight_correction=False)
    before = clf.weight.clone()
    rows = sampled_step(clf, 0, 4)
    clf.after_step(0.5)
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
        clf.after_step(0.1)


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
        a.after_step(0.1)
        b.after_step(0.1)


def test_mmap_checkpoint_is_a_snapshot(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = sampled(tmp_path, 50, num_negatives=5, sampling="uniform", storage="mmap")
    for step in range(5):
        sampled_step(clf, step, 4)
        clf.after_step(0.3)
    state = {k: v for k, v in clf.state_dict().items()}
    saved_w = clf.weight.clone()
    for step in range(5, 12):  # the live files move on; a checkpoint at each of two steps
        sampled_step(clf, step, 4)
        clf.after_step(0.3)
        if step in (8, 11):
            clf.sync_state()
    snapshots = sorted(p.name for p in (tmp_path / "store").glob("pic_classifier.step*"))
    # The last two snapshots are kept (the newer one's checkpoint may not be written yet).
    assert snapshots == [f"pic_classifier.step{t:012d}.table" for t in (9, 12)]
    assert not torch.equal(clf.weight, saved_w)
    # Resuming from the checkpoint of step 5 needs its snapshot: it was pruned.
    torch.manual_seed(0)
    fresh = sampled(tmp_path, 50, num_negatives=5, sampling="uniform", storage="mmap")
    with pytest.raises(FileNotFoundError, match="step000000000005"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(clf.state_dict())
    assert torch.equal(fresh.weight, clf.weight) and fresh.t == 12


class TinyBackbone(nn.Sequential):
    out_dim = 8

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(48, 8))


def train_pic(out_dir: Path, max_steps: int, **model_kw) -> PIC:
    from pic.data.samplers import EpochSampler
    from pic.engine.optim import sgd

    torch.manual_seed(0)
    model = PIC(TinyBackbone(), 64, feature_dim=16, mlp_head=False,
                classifier_init_norm=1.0, **model_kw)
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
    dense = train_pic(tmp_path / "dense", 30)
    full = train_pic(tmp_path / "full", 30, num_negatives=64, negative_sampling="uniform")
    assert_models_close(full, dense, 30)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["host", "mmap"])
def test_sampled_pic_resumes_exactly(tmp_path: Path, storage: str) -> None:
    kw = dict(num_negatives=10, negative_sampling="recent", classifier_storage=storage,
              classifier_momentum=0.9, classifier_weight_decay=1e-4)
    once = train_pic(tmp_path / "once", 30, storage_dir=str(tmp_path / "once"), **kw)
    train_pic(tmp_path / "twice", 17, storage_dir=str(tmp_path / "twice"), **kw)
    twice = train_pic(tmp_path / "twice", 30, storage_dir=str(tmp_path / "twice"), **kw)
    assert once.classifier.t == twice.classifier.t == 30
    assert torch.equal(once.classifier.fifo, twice.classifier.fifo)
    # Not bitwise: the checkpoint at step 17 holds every row made current, and a row corrected
    # in two hops (to 17, then on) rounds differently from one hop, by about one float32 ulp.
    assert_models_close(twice, once, 30)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    clf = SampledInstanceClassifier(60, 16, 1.0, 8, "uniform", True, M, WD, "host")
    for step in range(10):
        feats, labels = batch(step, 60, 8)
        mine = slice(rank * 4, rank * 4 + 4)
        rows, pos = clf(labels[mine])
        instance_classification_loss(feats[mine], rows, pos, TAU).backward()
        clf.after_step(lr_at(step))
    clf.sync_state()
    torch.save(clf.weight, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_share_rows_and_match_one_process(tmp_path: Path) -> None:
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    torch.manual_seed(0)
    one = SampledInstanceClassifier(60, 16, 1.0, 8, "uniform", True, M, WD, "host")
    for step in range(10):
        sampled_step(one, step, 8)
        one.after_step(lr_at(step))
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
])
def test_bad_settings_name_the_key(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sampled(tmp_path, 10, **kw)


@pytest.mark.parametrize(("overrides", "match"), [
    (["optimizer=lars"], "got optimizer pic.engine.lars.lars"),
    (["optimizer.nesterov=true"], "with nesterov"),
])
def test_sampled_classifier_refuses_an_optimizer_it_does_not_implement(overrides, match) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from .helpers import compose_config

    cfg = compose_config("model.num_negatives=16", *overrides)
    with pytest.raises(InstantiationException, match=match):  # wraps the model's ValueError
        instantiate(cfg.model, backbone=TinyBackbone(), num_instances=64)
    cfg = compose_config("model.num_negatives=16")  # the default optimizer: accepted
    assert instantiate(cfg.model, backbone=TinyBackbone(), num_instances=64).classifier


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
            clf.after_step(lr_at(step))
        tables.append(clf.table.clone())
    assert torch.equal(*tables)


def test_native_row_moves_check_the_range(tmp_path: Path) -> None:
    clf = sampled(tmp_path, 20, num_negatives=3, sampling="uniform")
    with pytest.raises(IndexError, match=r"outside \[0, 20\)"):
        clf._gather(torch.tensor([3, 20]))

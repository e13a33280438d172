"""InstDisc, MoCo, SimCLR, LARS and SyncBN in one process, against float64 loop references."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pic.engine.lars import lars
from pic.models.instdisc import InstDisc
from pic.models.moco import MoCo
from pic.models.simclr import SimCLR
from pic.networks.batchnorm import BatchNorm, convert_batchnorm, statistics_per_chunk
from pic.networks.heads import MultiCropEncoder, projection_head
from pic.networks.resnet import TinyResNet

from .helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_backbone() -> nn.Module:
    return TinyResNet(widths=[8, 16, 16])


def images(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


U32 = 2.0 ** -24  # float32's unit roundoff


def cosine_ce_tolerance(dim: int, temperature: float, logits: int, rows: int,
                        loss: float) -> float:
    """Worst-case |float32 − float64| of a mean cross-entropy over cosine logits / T when both
    start from the same float32 features (dim each). Normalising a vector and taking a dot
    product of dim terms is off by ≤ (2·dim + 4)·u (terms bounded by 1), dividing by T by one
    more rounding: each logit by ≤ (2·dim + 5)·u / T. −log softmax moves by at most twice the
    largest logit error; its float32 log-sum-exp over ``logits`` terms adds ≤ (logits + 3)·u
    and the mean over ``rows`` ≤ (rows + 2)·u·|loss|."""
    per_logit = (2 * dim + 5) * U32 / temperature
    return 2 * per_logit + (logits + 3) * U32 + (rows + 2) * U32 * abs(loss)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def softmax_ce_first(logits: list[float]) -> float:
    """−log softmax(logits)[0], by explicit sums."""
    m = max(logits)
    return -(logits[0] - m - math.log(sum(math.exp(x - m) for x in logits)))


# ---------------------------------------------------------------------------------- InstDisc
def test_instdisc_bank_rows_unit_norm_at_init() -> None:
    model = InstDisc(tiny_backbone(), num_instances=30, feature_dim=8)
    assert model.bank.shape == (30, 8)
    # Norms of float32 unit vectors of 8 terms: ≤ (8 + 4)·u from 1.
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(30), rtol=0, atol=12 * U32)


def test_instdisc_negatives_uniform_over_others_and_clipped() -> None:
    torch.manual_seed(0)
    model = InstDisc(tiny_backbone(), num_instances=7, feature_dim=8, num_negatives=4096)
    assert model.num_negatives == 6  # clipped to N − 1
    index = torch.arange(7)
    neg = model.sample_negatives(index.repeat(300))
    assert neg.shape == (2100, 6)
    assert not (neg == index.repeat(300).unsqueeze(1)).any()
    # Uniform over the 6 others: each of them drawn ≈ 1/6 of the time for every positive.
    for i in range(7):
        counts = torch.bincount(neg[index.repeat(300) == i].flatten(), minlength=7).double()
        assert counts[i] == 0
        others = counts[torch.arange(7) != i] / counts.sum()
        assert (others - 1 / 6).abs().max() < 0.02


def test_instdisc_softmax_loss_matches_loop_reference() -> None:
    model = InstDisc(tiny_backbone(), num_instances=20, feature_dim=8, num_negatives=5,
                     temperature=0.1)
    x, index = images(4, 1), torch.tensor([3, 0, 19, 7])
    torch.manual_seed(5)
    loss, metrics = model([x], index)
    torch.manual_seed(5)
    neg = model.sample_negatives(index)
    feats = model.encoder([x])[0].double()
    bank = model.bank.double().tolist()
    expected = 0.0
    for b in range(4):
        q = unit(feats[b].tolist())
        logits = [dot(q, bank[int(index[b])]) / 0.1] + [dot(q, bank[int(j)]) / 0.1
                                                          for j in neg[b]]
        expected += softmax_ce_first(logits) / 4
    assert loss.item() == pytest.approx(expected, rel=0, abs=cosine_ce_tolerance(
        8, 0.1, len(logits), 4, expected))
    assert metrics["loss"].requires_grad is False


def test_instdisc_nce_estimates_z_once_and_keeps_it() -> None:
    n = 20
    model = InstDisc(tiny_backbone(), num_instances=n, feature_dim=8, num_negatives=6,
                     loss="nce")
    x, index = images(4, 2), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(3)
    model([x], index)
    torch.manual_seed(3)
    neg = model.sample_negatives(index)
    feats = model.encoder([x])[0].double()
    bank = model.bank.double().tolist()
    total = 0.0
    for b in range(4):
        q = unit(feats[b].tolist())
        total += sum(math.exp(dot(q, bank[int(j)]) / 0.07) for j in neg[b])
    # exp of a logit off by ≤ (2·8 + 5)·u / 0.07 (cosine_ce_tolerance): that relative error
    # (×1.01 for exp's curvature), plus the float32 mean of 24 terms and the scaling by n.
    rel = 1.01 * 21 * U32 / 0.07 + (24 + 4) * U32
    assert model.z.item() == pytest.approx(n * total / (4 * 6), rel=rel, abs=0)
    z = model.z.clone()
    model([images(4, 3)], index)
    assert torch.equal(model.z, z)


def test_instdisc_bank_update_after_step_only() -> None:
    model = InstDisc(tiny_backbone(), num_instances=10, feature_dim=8, momentum=0.5)
    x, index = images(3, 4), torch.tensor([2, 5, 9])
    before = model.bank.clone()
    model([x], index)
    assert torch.equal(model.bank, before)  # forward alone (a skipped step) changes nothing
    feats = model.encoder([x])[0].detach().double()
    model.after_step()
    for b, i in enumerate(index.tolist()):
        f = unit(feats[b].tolist())
        row = unit([0.5 * m + 0.5 * v for m, v in zip(before[i].tolist(), f, strict=True)])
        # Unit vectors of 8 terms, from the same float32 inputs: the momentum mix (2 roundings
        # of terms ≤ 1), the norm (8 + 2) and the division (1): ≤ 13·u per element.
        torch.testing.assert_close(model.bank[i].double(), torch.tensor(row, dtype=torch.float64),
                                   rtol=0, atol=13 * U32)
    untouched = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(model.bank[untouched], before[untouched])


@pytest.mark.parametrize("name", ["instdisc", "moco"])
def test_step_update_applied_once_and_only_for_a_taken_step(name: str) -> None:
    """The Method protocol: forward defers the step's update, after_step takes it once; a
    skipped step's update (forward without after_step) is replaced by the next forward's."""
    torch.manual_seed(0)
    model = (InstDisc(tiny_backbone(), num_instances=10, feature_dim=8, num_negatives=3)
             if name == "instdisc" else MoCo(tiny_backbone(), num_instances=10, feature_dim=8,
                                             queue_size=8))
    state = "bank" if name == "instdisc" else "queue"
    before = getattr(model, state).clone()
    crops = [images(4, 1)] if name == "instdisc" else [images(4, 1), images(4, 2)]
    model(crops, torch.tensor([0, 1, 2, 3]))  # this step is skipped
    crops = [images(4, 3)] if name == "instdisc" else [images(4, 3), images(4, 4)]
    model(crops, torch.tensor([4, 5, 6, 7]))
    update = model.deferred_update()
    assert update is not None and model.deferred_update() is None  # taken once
    model.defer_update(update)
    model.after_step()
    after = getattr(model, state).clone()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    # Only the applied step's rows: InstDisc's bank rows 4-7; MoCo's first 4 queue slots.
    assert changed == ([4, 5, 6, 7] if name == "instdisc" else [0, 1, 2, 3])
    model.after_step()  # nothing left to apply
    if name == "instdisc":
        assert torch.equal(model.bank, after)
    else:
        assert torch.equal(model.queue, after) and int(model.queue_ptr) == 4


def test_instdisc_rejects_unknown_loss() -> None:
    with pytest.raises(ValueError, match="model.loss='nc'"):
        InstDisc(tiny_backbone(), num_instances=10, loss="nc")


# ---------------------------------------------------------------------------------- MoCo
def moco(**kw) -> MoCo:
    args = {"num_instances": 100, "feature_dim": 8, "queue_size": 8, "momentum": 0.9,
            "temperature": 0.2} | kw
    return MoCo(tiny_backbone(), **args)


def test_moco_queue_size_must_divide_by_global_batch() -> None:
    model = moco(queue_size=10)
    with pytest.raises(ValueError, match=r"model.queue_size=10.*trainer.batch_size=4"):
        model([images(4, 0), images(4, 1)], torch.arange(4))


def test_moco_loss_positive_first_against_queue() -> None:
    torch.manual_seed(0)
    model = moco()
    x1, x2 = images(4, 0), images(4, 1)
    loss, _ = model([x1, x2], torch.arange(4))
    # In one process the shuffle is within the batch, which BN statistics do not see.
    q = model.encoder([x1])[0].double()
    k = model.key_encoder([x2])[0].double()
    queue = model.queue.double().tolist()
    expected = 0.0
    for b in range(4):
        qb, kb = unit(q[b].tolist()), unit(k[b].tolist())
        logits = [dot(qb, kb) / 0.2] + [dot(qb, n) / 0.2 for n in queue]
        expected += softmax_ce_first(logits) / 4
    assert loss.item() == pytest.approx(expected, rel=0, abs=cosine_ce_tolerance(
        8, 0.2, len(logits), 4, expected))


@pytest.mark.parametrize("exclude_own_keys", [True, False])
def test_moco_leaves_the_querys_own_older_keys_out_of_its_negatives(exclude_own_keys) -> None:
    torch.manual_seed(0)
    model = moco(exclude_own_keys=exclude_own_keys)
    model([images(4, 0), images(4, 1)], torch.tensor([3, 5, 7, 9]))
    model.after_step()
    assert model.queue_index.tolist() == [3, 5, 7, 9, -1, -1, -1, -1]
    x1, x2, index = images(4, 2), images(4, 3), [5, 9, 0, 1]  # 5 and 9 have keys queued
    loss, _ = model([x1, x2], torch.tensor(index))
    q = model.encoder([x1])[0].double()
    k = model.key_encoder([x2])[0].double()
    queue, slots = model.queue.double().tolist(), model.queue_index.tolist()
    expected = 0.0
    for b in range(4):
        qb, kb = unit(q[b].tolist()), unit(k[b].tolist())
        negatives = [n for n, i in zip(queue, slots, strict=True)
                     if not (exclude_own_keys and i == index[b])]
        logits = [dot(qb, kb) / 0.2] + [dot(qb, n) / 0.2 for n in negatives]
        expected += softmax_ce_first(logits) / 4
    assert loss.item() == pytest.approx(expected, rel=0, abs=cosine_ce_tolerance(
        8, 0.2, 9, 4, expected))


def test_moco_enqueue_and_momentum_update_after_step() -> None:
    model = moco(queue_size=8, momentum=0.9)
    for q, k in zip(model.encoder.parameters(), model.key_encoder.parameters(), strict=True):
        assert torch.equal(q, k) and not k.requires_grad
    queue = model.queue.clone()
    x2 = images(4, 1)
    torch.manual_seed(4)
    model([images(4, 0), x2], torch.arange(4))
    torch.manual_seed(4)  # the same shuffle, so the same BN sums: the same keys, bit for bit
    keys = model.keys(x2)
    assert torch.equal(model.queue, queue) and model.queue_ptr.item() == 0  # not before the step
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)  # stands in for the optimizer step
    old_keys = [k.clone() for k in model.key_encoder.parameters()]
    model.after_step()
    assert torch.equal(model.queue[:4], keys)
    assert torch.equal(model.queue[4:], queue[4:]) and model.queue_ptr.item() == 4
    for q, k, old in zip(model.encoder.parameters(), model.key_encoder.parameters(), old_keys,
                         strict=True):
        # float32 m·k + (1 − m)·q: 0.9 and 0.1 rounded (1 u each), two products and a sum.
        exact = 0.9 * old.double() + 0.1 * q.double()
        bound = 4 * U32 * (0.9 * old.double().abs() + 0.1 * q.double().abs())
        assert ((k.double() - exact).abs() <= bound).all()
    model([images(4, 2), images(4, 3)], torch.arange(4))
    model.after_step()
    assert model.queue_ptr.item() == 0  # wrapped around


def test_moco_checkpoint_holds_key_encoder_and_queue() -> None:
    keys = moco().state_dict().keys()
    assert {"queue", "queue_ptr", "queue_index"} <= set(keys)
    assert any(k.startswith("key_encoder.backbone.") for k in keys)


def test_moco_resumes_a_checkpoint_from_before_the_queue_recorded_images() -> None:
    model = moco()
    model([images(4, 0), images(4, 1)], torch.tensor([3, 5, 7, 9]))
    model.after_step()
    state = model.state_dict()
    del state["queue_index"]
    fresh = moco()
    fresh.load_state_dict(state)  # strict: every other key still required
    assert torch.equal(fresh.queue, model.queue) and fresh.queue_index.tolist() == [-1] * 8
    del state["queue"]
    with pytest.raises(RuntimeError, match="queue"):
        moco().load_state_dict(state)


# ---------------------------------------------------------------------------------- SimCLR
def test_simclr_loss_matches_loop_reference() -> None:
    model = SimCLR(tiny_backbone(), feature_dim=8, temperature=0.1)
    x1, x2 = images(3, 0), images(3, 1)
    loss, _ = model([x1, x2], torch.arange(3))
    z1, z2 = (z.double() for z in model.encoder([x1, x2]))  # one pass: same BN batch
    z = [unit(v.tolist()) for v in torch.cat([z1, z2])]
    expected = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        logits = [dot(z[i], z[pos]) / 0.1] + [dot(z[i], z[j]) / 0.1 for j in range(6)
                                               if j not in (i, pos)]
        expected += softmax_ce_first(logits) / 6
    assert loss.item() == pytest.approx(expected, rel=0, abs=cosine_ce_tolerance(
        8, 0.1, len(logits), 6, expected))


def test_simclr_needs_two_views() -> None:
    with pytest.raises(ValueError, match="augmentation.num_views=2"):
        SimCLR(tiny_backbone())([images(4, 0)], torch.arange(4))


# ---------------------------------------------------------------------------------- LARS
def test_lars_matches_loop_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt = lars(model, batch_size=512, lr=0.3, momentum=0.9, weight_decay=0.1,
               trust_coefficient=0.01)
    lr = 0.3 * 512 / 256
    grads = []
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3, generator=torch.Generator().manual_seed(step))).pow(2).sum() \
            .backward()
        grads.append({n: p.grad.double().clone() for n, p in model.named_parameters()})
        opt.step()
    for name, p in model.named_parameters():
        w = start[name].flatten().tolist()
        buf = [0.0] * len(w)
        size = len(w)
        adapt = name == "0.weight"  # only the matrix: biases and BN are excluded
        # float32's error per step and element: g + wd·w (2 roundings), the trust ratio (two
        # norms of ``size`` terms, a division and a product: ≤ (size + 6)·u), the momentum
        # buffer (3) and the update (2), each relative to the magnitudes it combines; ×2 for
        # the earlier steps' errors that later ones carry (lr·wd·ratio ≪ 1 here).
        magnitude = [0.0] * size
        for g in grads:
            # Each recorded gradient was taken at the weights of that step: replay from start.
            gv = g[name].flatten().tolist()
            u = [gi + (0.1 * wi if adapt else 0.0) for gi, wi in zip(gv, w, strict=True)]
            ratio = 1.0
            if adapt:
                ratio = 0.01 * math.sqrt(sum(x * x for x in w)) / math.sqrt(sum(x * x for x in u))
            buf = [0.9 * bi + ratio * ui for bi, ui in zip(buf, u, strict=True)]
            magnitude = [m + abs(wi) + lr * abs(bi) + lr * ratio * abs(ui)
                         for m, wi, bi, ui in zip(magnitude, w, buf, u, strict=True)]
            w = [wi - lr * bi for wi, bi in zip(w, buf, strict=True)]
        bound = torch.tensor(magnitude, dtype=torch.float64) * 2 * (size + 13) * U32
        error = (p.detach().double().flatten() - torch.tensor(w, dtype=torch.float64)).abs()
        assert (error <= bound).all(), (name, error, bound)


# ------------------------------------------------------------------------ BN: sync, per crop
def test_batchnorm_conversion_keeps_state_and_is_plain_bn_in_one_process() -> None:
    torch.manual_seed(0)
    net = tiny_backbone()
    net(images(6, 0))  # running statistics away from their init
    converted = convert_batchnorm(tiny_backbone(), sync=True)
    converted.load_state_dict(net.state_dict())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert any(isinstance(m, BatchNorm) and m.sync for m in converted.modules())
    # float64: the two compute the same function, in the order of their sums only (F64).
    net, converted, x = net.double(), converted.double(), images(6, 1).double()
    torch.testing.assert_close(converted(x), net(x), **F64)
    torch.testing.assert_close(converted.state_dict(), net.state_dict(), **F64)


# float64 (unit roundoff 1.1e-16): the per-crop and the separate computations, and a converted
# BN and torch's, differ only in summation order.
F64 = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("k", [2, 3])
def test_ghost_bn_over_k_chunks_equals_k_separate_passes(k: int) -> None:
    """One call on k concatenated crops with per-chunk statistics = k calls of plain BN:
    outputs, parameter gradients and running statistics (updated once per crop, in order)."""
    torch.manual_seed(0)
    separate = nn.Sequential(tiny_backbone(), nn.Linear(16, 8), nn.BatchNorm1d(8)).double()
    ghost = convert_batchnorm(copy.deepcopy(separate), sync=False)
    crops = [images(5, 10 + i).double() for i in range(k)]
    want = [separate(c) for c in crops]
    with statistics_per_chunk(ghost, k):
        got = ghost(torch.cat(crops)).chunk(k)
    weights = torch.randn(k, 5, 8, dtype=torch.float64)  # a loss that weighs every output
    sum((w * o).sum() for w, o in zip(weights, want, strict=True)).backward()
    sum((w * o).sum() for w, o in zip(weights, got, strict=True)).backward()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **F64)
    for (name, a), b in zip(ghost.named_parameters(), separate.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **F64, msg=name)
    torch.testing.assert_close(ghost.state_dict(), separate.state_dict(), **F64)
    # Statistics of all k·B rows give other outputs: the comparison sees the difference.
    concatenated = copy.deepcopy(separate)(torch.cat(crops)).chunk(k)
    assert max((a - b).abs().max() for a, b in zip(concatenated, want, strict=True)) > 1e-3
    assert all(m.chunks == 1 for m in ghost.modules() if isinstance(m, BatchNorm))


def test_encoder_bn_per_crop_within_each_resolution_group() -> None:
    """MultiCropEncoder(bn_per_crop): each crop of a group normalised as if alone; groups of
    one crop are unchanged."""
    torch.manual_seed(0)
    plain = MultiCropEncoder(tiny_backbone(), projection_head(16, 8)).double()
    per_crop = convert_batchnorm(copy.deepcopy(plain), sync=False)
    per_crop.bn_per_crop = True
    crops = [images(4, 20).double(), images(4, 21).double(),
             nn.functional.interpolate(images(4, 22), size=8).double()]
    got = per_crop(crops)
    want = [plain([c])[0] for c in crops]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_ghost_bn_needs_equal_chunks() -> None:
    norm = BatchNorm(3)
    norm.chunks = 2
    with pytest.raises(ValueError, match="equal chunks"):
        norm(torch.randn(5, 3))


def test_google_simclr_head_bn_in_every_layer_no_bias_in_the_last() -> None:
    head = projection_head(16, 8, mlp=True, batch_norm=True)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == len(norms) == 2 and all(m.bias is None for m in linears)
    assert isinstance(head[-1], nn.BatchNorm1d) and head[-1].bias is None
    assert head[-1].weight is not None and norms[0].bias is not None
    # The output of a fresh head: zero mean per feature (float64: rounding only, see F64).
    out = copy.deepcopy(head).double()(torch.randn(6, 16, dtype=torch.float64))
    torch.testing.assert_close(out.mean(0), torch.zeros(8, dtype=torch.float64), **F64)
    model = SimCLR(tiny_backbone(), feature_dim=8, head_batch_norm=True, bn_per_crop=True)
    assert "encoder.head.4.bias" not in model.state_dict()
    model([images(4, 0), images(4, 1)], torch.arange(4))[0].backward()



def test_a_linear_head_with_batch_norm_is_linear_then_bn() -> None:
    """``batch_norm`` on a linear head is not ignored: Linear without bias, then BN without
    shift, whose fresh output has zero mean per feature."""
    head = projection_head(16, 8, mlp=False, batch_norm=True)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d]
    assert head[0].bias is None and head[1].bias is None
    out = copy.deepcopy(head).double()(torch.randn(6, 16, dtype=torch.float64))
    torch.testing.assert_close(out.mean(0), torch.zeros(8, dtype=torch.float64), **F64)


@pytest.mark.parametrize("method", [InstDisc, MoCo])
def test_linear_head_methods_take_head_batch_norm(method) -> None:
    """InstDisc and MoCo v1 (linear heads) build that head and train through it."""
    model = method(tiny_backbone(), num_instances=64, feature_dim=8, mlp_head=False,
                   head_batch_norm=True)
    assert isinstance(model.encoder.head[1], nn.BatchNorm1d)
    crops = [images(4, 0)] if method is InstDisc else [images(4, 0), images(4, 1)]
    model(crops, torch.arange(4))[0].backward()

# ----------------------------------------------------------------- each option, one recipe
# model option: (augmentation's pipeline, views per image, schedule) of that method's paper.
RECIPES = {
    "pic": ("pic.data.transforms.simclr", 1, "pic.engine.schedules.Cosine"),
    "instdisc": ("pic.data.transforms.instdisc", 1, "pic.engine.schedules.Step"),
    "moco": ("pic.data.transforms.instdisc", 2, "pic.engine.schedules.Step"),
    "mocov2": ("pic.data.transforms.mocov2", 2, "pic.engine.schedules.Cosine"),
    "simclr": ("pic.data.transforms.simclr", 2, "pic.engine.schedules.Cosine"),
}


def views_of(cfg) -> list[int]:
    """Crop sizes the composed augmentation makes of one image."""
    from hydra.utils import instantiate
    from PIL import Image
    return [v.shape[-1] for v in instantiate(cfg.augmentation)(Image.new("RGB", (40, 40)))]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_model_option_selects_its_papers_augmentation(name: str) -> None:
    """PIC: one view per image per iteration (the paper's "1x"); MoCo v1: two InstDisc views."""
    target, views, schedule = RECIPES[name]
    cfg = compose_config(f"model={name}")
    assert (cfg.augmentation._target_, cfg.schedule._target_) == (target, schedule)
    assert views_of(cfg) == [cfg.data.image_size] * views


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_model_option_leaves_the_augmentation_choice_free(name: str) -> None:
    """A model option sets only model keys and default choices: any augmentation and view
    count chosen on the command line is what the run gets (PIC with 2 views, any with
    multi-crop)."""
    two = compose_config(f"model={name}", "augmentation=simclr", "augmentation.num_views=3")
    assert views_of(two) == [two.data.image_size] * 3
    crops = compose_config(f"model={name}", "augmentation=multicrop")
    assert views_of(crops) == [160, 96, 96, 96]


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_launch_every_method_writes_results(tmp_path: Path) -> None:
    """``launch.py model=X`` for each method (one Hydra multirun: one interpreter start), on
    small synthetic images: each point's evaluation and baselines take little time."""
    cmd = [sys.executable, "launch.py", "-m", "model=instdisc,moco,mocov2,simclr",
           "data=synthetic", "data.num_images=128", "data.num_val_images=48",
           "data.resolution=16", "data.image_size=16", "data.num_classes=4",
           "trainer.max_steps=2", "trainer.batch_size=64", "trainer.num_workers=0",
           "trainer.progress=false", "task.plot=false", "logger=none",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    targets = []
    for job in range(4):
        results = json.loads((tmp_path / str(job) / "results.json").read_text())
        assert results["steps"] == 2 and results["bad_steps"] == 0
        assert 0 <= results["knn_top1"] <= 100 and "knn_top1_random_init" in results
        targets.append(results["method"])
    assert targets == ["pic.models.instdisc.InstDisc", "pic.models.moco.MoCo",
                       "pic.models.moco.MoCo", "pic.models.simclr.SimCLR"]


def test_bn_after_the_head_spreads_the_features_at_init() -> None:
    """bench/init_similarity.py on the digits (InstDisc's linear head): without BN two images'
    features at init point nearly one way; BN centres them (README, "Small images")."""
    from bench.init_similarity import similarity

    common = ["model=instdisc", "backbone=resnet_tiny", "backbone.widths=[8,16]",
              "data.image_size=16"]
    plain, _ = similarity([*common, "model.head_batch_norm=false"], 64)
    centred, _ = similarity([*common, "model.head_batch_norm=true"], 64)
    assert plain > 0.5 and abs(centred) < 0.1, (plain, centred)

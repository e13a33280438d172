"""The losses against float64 references computed a different way: Python loops over rows,
math.exp/log and a hand-written log-sum-exp, no torch ops."""

import math

import numpy as np
import pytest
import torch

from pic.losses import cosine_logits, info_nce, instance_classification_loss, nce_loss, nt_xent

# ---------------------------------------------------------------- float64 references


def _rows(t: torch.Tensor) -> list[np.ndarray]:
    return [np.asarray(r, dtype=np.float64) for r in t.detach().double().tolist()]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(x * x for x in v))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def ref_instance_classification(features, weight, labels, tau) -> float:
    rows = [_unit(w) for w in _rows(weight)]
    total = 0.0
    for f, y in zip(_rows(features), labels.tolist(), strict=True):
        f = _unit(f)
        logits = [_dot(f, w) / tau for w in rows]
        total += _logsumexp(logits) - logits[y]
    return total / len(labels)


def _ref_negatives(negatives: torch.Tensor, b: int) -> list[list[np.ndarray]]:
    """Per-sample lists of negative rows, whatever the layout."""
    if negatives.ndim == 2:
        return [_rows(negatives)] * b
    return [_rows(n) for n in negatives]


def ref_info_nce(query, key, negatives, tau, positive_index: int = 0, exclude=None) -> float:
    """`positive_index` lets a test show that a label pointing elsewhere would be detected;
    `exclude` (B×K bool) drops negative j of sample b from the list."""
    qs, ks = _rows(query), _rows(key)
    total = 0.0
    for b, (q, k, negs) in enumerate(zip(qs, ks, _ref_negatives(negatives, len(qs)),
                                         strict=True)):
        if exclude is not None:
            negs = [n for j, n in enumerate(negs) if not exclude[b][j]]
        logits = [_dot(q, k) / tau] + [_dot(q, n) / tau for n in negs]
        total += _logsumexp(logits) - logits[positive_index]
    return total / len(qs)


def ref_nce(query, positive, negatives, tau, n_instances, z) -> float:
    """The paper's formula taken literally: P = exp(s/τ)/Z, h = P/(P + m·Pn)."""
    qs, ps = _rows(query), _rows(positive)
    total = 0.0
    for q, p, negs in zip(qs, ps, _ref_negatives(negatives, len(qs)), strict=True):
        m_pn = len(negs) / n_instances
        prob = math.exp(_dot(q, p) / tau) / z
        total -= math.log(prob / (prob + m_pn))
        for n in negs:
            prob = math.exp(_dot(q, n) / tau) / z
            total -= math.log(1.0 - prob / (prob + m_pn))
    return total / len(qs)


def ref_nt_xent(z1, z2, tau, include_self: bool = False) -> float:
    """`include_self` builds the classic bug, so tests can show it would be detected."""
    views = [_unit(v) for v in _rows(z1) + _rows(z2)]
    b = len(views) // 2
    total = 0.0
    for i, anchor in enumerate(views):
        partner = (i + b) % (2 * b)
        others = [j for j in range(2 * b) if include_self or j != i]
        logits = {j: _dot(anchor, views[j]) / tau for j in others}
        total += _logsumexp(list(logits.values())) - logits[partner]
    return total / (2 * b)


def monte_carlo_z(query, negatives, tau, n_instances) -> float:
    """Z ≈ N · mean exp(v_jᵀv/τ) over the sampled rows, as InstDisc estimates it."""
    vals = [
        math.exp(_dot(q, n) / tau)
        for q, negs in zip(_rows(query), _ref_negatives(negatives, query.shape[0]), strict=True)
        for n in negs
    ]
    return n_instances * sum(vals) / len(vals)


# ---------------------------------------------------------------- inputs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype=torch.float64, unit: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)
    if unit:
        x = x / x.norm(dim=-1, keepdim=True)
    return x.to(dtype)


def _close(value: torch.Tensor, expected: float, tol: float) -> None:
    assert value.ndim == 0
    assert abs(value.item() - expected) <= tol * max(1.0, abs(expected)), (value.item(), expected)


U32 = 2.0**-24  # float32 unit roundoff


def f32_error(d: int, tau: float, logit_weight: float, terms: int, value: float) -> float:
    """A worst-case bound on a float32 loss's error against exact arithmetic on the same inputs.

    One logit cos(a, b)/τ: normalising a and b (a sum of d squares and a division each) and
    their dot product (d products summed) err by at most (3d + 6)·u relative, |cos| <= 1, so
    by (3d + 6)·u/τ. The loss moves by at most ``logit_weight`` times that (the L1 norm of its
    gradient in the logits: 2 for a softmax cross-entropy, K + 1 for NCE's K + 1 log-terms), and
    its sums over ``terms`` exponentials and rows add ``terms``·u relative.
    """
    logit = (3 * d + 6) * U32 / tau
    return logit_weight * logit + (terms + 4) * U32 * max(1.0, abs(value))


def _close32(value: torch.Tensor, expected: float, bound: float) -> None:
    assert value.ndim == 0 and value.dtype == torch.float32
    assert abs(value.item() - expected) <= bound, (value.item(), expected, bound)


SHAPES = [(1, 3, 2), (4, 8, 16), (16, 32, 50), (7, 128, 300)]  # (B, D, C or K)


# ---------------------------------------------------------------- PIC


@pytest.mark.parametrize(("b", "d", "c"), SHAPES)
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_instance_classification_matches_reference(b, d, c, tau):
    features = _randn(b, d, seed=1) * 3.0  # any norm: normalised inside
    weight = _randn(c, d, seed=2) * 0.01
    labels = torch.randint(c, (b,), generator=_gen(3))
    loss = instance_classification_loss(features, weight, labels, tau)
    assert loss.dtype == torch.float64
    _close(loss, ref_instance_classification(features, weight, labels, tau), 1e-10)
    loss32 = instance_classification_loss(features.float(), weight.float(), labels, tau)
    expected = ref_instance_classification(features, weight, labels, tau)
    _close32(loss32, expected, f32_error(d, tau, 2, c + b, expected))


def test_cosine_logits_are_scale_invariant_cosines_over_tau():
    features, weight = _randn(5, 6, seed=4), _randn(9, 6, seed=5)
    logits = cosine_logits(features * 7.0, weight * 0.1, 0.5)
    assert logits.shape == (5, 9)
    for i, f in enumerate(_rows(features)):
        for j, w in enumerate(_rows(weight)):
            assert abs(logits[i, j].item() - _dot(_unit(f), _unit(w)) / 0.5) < 1e-12


def test_instance_classification_sign_and_label_are_checked():
    # Feature b equals classifier row y_b, all rows orthonormal: the correct loss is
    # log(1 + (C−1)·e^{−1/τ}); a flipped sign or a wrong label would give ≥ log(1 + e^{1/τ}).
    c, tau = 6, 0.2
    weight = torch.eye(c, dtype=torch.float64) * 5.0
    labels = torch.tensor([0, 3, 5])
    loss = instance_classification_loss(weight[labels] * 2.0, weight, labels, tau)
    _close(loss, math.log1p((c - 1) * math.exp(-1 / tau)), 1e-12)
    assert loss.item() < 0.1 < math.log1p(math.exp(1 / tau))


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize(("b", "d", "k"), SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_info_nce_matches_reference(b, d, k, per_sample):
    tau = 0.07
    query, key = _randn(b, d, seed=6, unit=True), _randn(b, d, seed=7, unit=True)
    shape = (b, k, d) if per_sample else (k, d)
    negatives = _randn(*shape, seed=8, unit=True)
    loss = info_nce(query, key, negatives, tau)
    _close(loss, ref_info_nce(query, key, negatives, tau), 1e-10)
    loss32 = info_nce(query.float(), key.float(), negatives.float(), tau)
    expected = ref_info_nce(query, key, negatives, tau)
    _close32(loss32, expected, f32_error(d, tau, 2, k + 1 + b, expected))


def test_info_nce_positive_is_at_index_zero():
    # Key close to the query, negatives far: a label that is not index 0 (or a flipped sign)
    # gives a very different loss, and the reference shows by how much.
    tau = 0.1
    query = _randn(4, 16, seed=9, unit=True)
    key = query + 0.05 * _randn(4, 16, seed=10)
    key = key / key.norm(dim=1, keepdim=True)
    negatives = _randn(32, 16, seed=11, unit=True)
    loss = info_nce(query, key, negatives, tau)
    right = ref_info_nce(query, key, negatives, tau)
    _close(loss, right, 1e-10)
    assert abs(ref_info_nce(query, key, negatives, tau, positive_index=1) - right) > 1.0
    flipped = info_nce(query, -key, negatives, tau)
    _close(flipped, ref_info_nce(query, -key, negatives, tau), 1e-10)
    assert flipped.item() - loss.item() > 1.0


@pytest.mark.parametrize("per_sample", [False, True])
def test_info_nce_excluded_negatives_are_left_out_of_the_sum(per_sample):
    tau = 0.1
    query, key = _randn(6, 16, seed=24, unit=True), _randn(6, 16, seed=25, unit=True)
    negatives = _randn(*((6, 10, 16) if per_sample else (10, 16)), seed=26, unit=True)
    exclude = torch.rand(6, 10, generator=torch.Generator().manual_seed(27)) < 0.4
    exclude[0] = True  # every negative of one sample out: its loss is 0 but the sum goes on
    query.requires_grad_()
    loss = info_nce(query, key, negatives, tau, exclude=exclude)
    expected = ref_info_nce(query, key, negatives, tau, exclude=exclude.tolist())
    _close(loss, expected, 1e-10)
    assert abs(expected - ref_info_nce(query, key, negatives, tau)) > 0.1  # the mask matters
    loss.backward()  # the -inf logits give zero gradient, not NaN
    assert query.grad.isfinite().all() and query.grad[0].abs().max() == 0
    with pytest.raises(ValueError, match="exclude must be B×K = 6×10"):
        info_nce(query, key, negatives, tau, exclude=exclude[:, :9])


def test_info_nce_shared_and_repeated_per_sample_negatives_agree():
    query, key = _randn(8, 32, seed=12, unit=True), _randn(8, 32, seed=13, unit=True)
    queue = _randn(64, 32, seed=14, unit=True)
    repeated = queue.unsqueeze(0).expand(8, -1, -1)
    shared = info_nce(query.float(), key.float(), queue.float(), 0.2)
    per_sample = info_nce(query.float(), key.float(), repeated.float(), 0.2)
    # Two float32 computations of one value: each within the bound of the exact one.
    _close32(shared, per_sample.item(), 2 * f32_error(32, 0.2, 2, 64 + 1 + 8, shared.item()))


# ---------------------------------------------------------------- NCE


@pytest.mark.parametrize(("b", "d", "k"), SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_nce_matches_paper_formula(b, d, k, per_sample):
    tau, n_instances = 0.07, 1000
    query, positive = _randn(b, d, seed=15, unit=True), _randn(b, d, seed=16, unit=True)
    negatives = _randn(*((b, k, d) if per_sample else (k, d)), seed=17, unit=True)
    z = monte_carlo_z(query, negatives, tau, n_instances)
    expected = ref_nce(query, positive, negatives, tau, n_instances, z)
    _close(nce_loss(query, positive, negatives, tau, n_instances, z), expected, 1e-10)
    loss32 = nce_loss(query.float(), positive.float(), negatives.float(), tau, n_instances, z)
    _close32(loss32, expected, f32_error(d, tau, k + 1, k + 1 + b, expected))


def test_nce_rewards_the_positive_and_penalises_noise():
    # Moving the positive towards the query lowers the loss; moving a noise row towards it
    # raises the loss. A sign error in either term would reverse one of these.
    tau, n_instances = 0.1, 500
    query = _randn(1, 8, seed=18, unit=True)
    negatives = _randn(16, 8, seed=19, unit=True)
    far = _randn(1, 8, seed=20, unit=True)
    z = monte_carlo_z(query, negatives, tau, n_instances)
    base = nce_loss(query, far, negatives, tau, n_instances, z)
    assert nce_loss(query, query, negatives, tau, n_instances, z) < base
    closer_noise = negatives.clone()
    closer_noise[0] = query[0]
    assert nce_loss(query, far, closer_noise, tau, n_instances, z) > base


def test_nce_shared_and_repeated_per_sample_negatives_agree():
    query, positive = _randn(8, 32, seed=21, unit=True), _randn(8, 32, seed=22, unit=True)
    queue = _randn(64, 32, seed=23, unit=True).float()
    args = (0.07, 10_000, 3.0e4)
    shared = nce_loss(query.float(), positive.float(), queue, *args)
    per_sample = nce_loss(query.float(), positive.float(), queue.expand(8, -1, -1), *args)
    _close32(shared, per_sample.item(), 2 * f32_error(32, 0.07, 65, 65 + 8, shared.item()))


def test_nce_is_finite_when_exp_overflows_float32():
    # s/τ = 1/0.01 = 100: exp overflows float32, the log-space form must not.
    query = _randn(4, 8, seed=24, unit=True).float()
    loss = nce_loss(query, query, query, 0.01, 1000, 1.0)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize(("b", "d"), [(2, 3), (4, 8), (16, 32), (9, 128)])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_reference(b, d, tau):
    z1, z2 = _randn(b, d, seed=25) * 4.0, _randn(b, d, seed=26) * 0.3
    _close(nt_xent(z1, z2, tau), ref_nt_xent(z1, z2, tau), 1e-10)
    loss32 = nt_xent(z1.float(), z2.float(), tau)
    expected = ref_nt_xent(z1, z2, tau)
    _close32(loss32, expected, f32_error(d, tau, 2, 4 * b, expected))


def test_nt_xent_excludes_self_similarity():
    # Both views equal, all images orthogonal: each anchor has positive cosine 1 and 2B−2
    # negatives of cosine 0, so the loss is log(1 + (2B−2)·e^{−1/τ}); counting the anchor's
    # similarity to itself would add ≈ log 2.
    b, tau = 4, 0.1
    views = torch.eye(b, 6, dtype=torch.float64) * 3.0
    loss = nt_xent(views, views, tau)
    _close(loss, math.log1p((2 * b - 2) * math.exp(-1 / tau)), 1e-12)
    assert ref_nt_xent(views, views, tau, include_self=True) - loss.item() > 0.5
    z1, z2 = _randn(b, 6, seed=27), _randn(b, 6, seed=28)
    buggy = ref_nt_xent(z1, z2, tau, include_self=True)
    assert abs(nt_xent(z1, z2, tau).item() - buggy) > 0.1


def test_nt_xent_pairs_row_b_of_z1_with_row_b_of_z2():
    # Swapping the rows of z2 breaks the pairing and must change the loss.
    z1 = _randn(6, 16, seed=29)
    z2 = z1 + 0.1 * _randn(6, 16, seed=30)
    paired = nt_xent(z1, z2, 0.1)
    shuffled = nt_xent(z1, z2.roll(1, dims=0), 0.1)
    _close(shuffled, ref_nt_xent(z1, z2.roll(1, dims=0), 0.1), 1e-10)
    assert shuffled.item() - paired.item() > 1.0


# ---------------------------------------------------------------- precision


def _calls(dtype: torch.dtype):
    """Each loss on inputs of `dtype`, with its float64 reference on the same (rounded) values."""
    b, d, k, tau, n = 8, 32, 40, 0.1, 1000
    f = _randn(b, d, seed=31, unit=True).to(dtype)
    g = _randn(b, d, seed=32, unit=True).to(dtype)
    w = _randn(k, d, seed=33, unit=True).to(dtype)
    labels = torch.randint(k, (b,), generator=_gen(34))
    z = monte_carlo_z(f, w, tau, n)
    return [
        (lambda: instance_classification_loss(f, w, labels, tau),
         ref_instance_classification(f, w, labels, tau)),
        (lambda: info_nce(f, g, w, tau), ref_info_nce(f, g, w, tau)),
        (lambda: nce_loss(f, g, w, tau, n, z), ref_nce(f, g, w, tau, n, z)),
        (lambda: nt_xent(f, g, tau), ref_nt_xent(f, g, tau)),
    ]  # fmt: skip


# The float32 error bounds of the four calls of _calls (B 8, D 32, K or C 40, τ 0.1).
_PRECISION_BOUNDS = [lambda v: f32_error(32, 0.1, 2, 40 + 8, v),
                     lambda v: f32_error(32, 0.1, 2, 41 + 8, v),
                     lambda v: f32_error(32, 0.1, 41, 41 + 8, v),
                     lambda v: f32_error(32, 0.1, 2, 4 * 8, v)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_losses(dtype):
    for (call, expected), bound in zip(_calls(dtype), _PRECISION_BOUNDS, strict=True):
        loss = call()
        _close32(loss, expected, bound(expected))


def test_autocast_does_not_lower_the_precision():
    # Under CPU bf16 autocast the matmuls would otherwise run in bf16 (~1e-2 error on logits/τ).
    for (call, expected), bound in zip(_calls(torch.float32), _PRECISION_BOUNDS, strict=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = call()
        _close32(loss, expected, bound(expected))


# ---------------------------------------------------------------- gradients


def test_gradients_match_finite_differences():
    b, d, k, tau = 3, 5, 4, 0.5
    inputs = [_randn(*s, seed=40 + i).requires_grad_() for i, s in enumerate([(b, d), (b, d)])]
    bank = _randn(b, k, d, seed=45).requires_grad_()
    queue = _randn(k, d, seed=46).requires_grad_()
    labels = torch.tensor([0, 3, 1])
    checks = [
        (lambda f, w: instance_classification_loss(f, w, labels, tau), (inputs[0], queue)),
        (lambda q, key, n: info_nce(q, key, n, tau), (*inputs, bank)),
        (lambda q, key, n: info_nce(q, key, n, tau), (*inputs, queue)),
        (lambda q, p, n: nce_loss(q, p, n, tau, 100, 7.0), (*inputs, bank)),
        (lambda a, c: nt_xent(a, c, tau), tuple(inputs)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args)


def test_gradients_are_finite_in_float32():
    f = _randn(16, 64, seed=50, unit=True).float().requires_grad_()
    g = _randn(16, 64, seed=51, unit=True).float().requires_grad_()
    w = torch.zeros(100, 64).normal_(0, 0.01, generator=_gen(52)).requires_grad_()
    labels = torch.randint(100, (16,), generator=_gen(53))
    losses = [
        instance_classification_loss(f, w, labels, 0.2),
        info_nce(f, g, w, 0.07),
        nce_loss(f, g, w, 0.07, 100, 50.0),
        nt_xent(f, g, 0.1),
    ]
    for loss in losses:
        for t in (f, g, w):
            t.grad = None
        loss.backward()
        grads = [t.grad for t in (f, g, w) if t.grad is not None]
        assert grads and all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


# ---------------------------------------------------------------- bad input


def _bad_calls():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.zeros(4, dtype=torch.long)
    return [
        (lambda: cosine_logits(x, torch.randn(10, 7), 0.2), "same D"),
        (lambda: cosine_logits(x[0], torch.randn(10, 8), 0.2), "B×D"),
        (lambda: instance_classification_loss(x, torch.randn(10, 8), labels[:3], 0.2), "labels"),
        (lambda: instance_classification_loss(x, torch.randn(10, 8), labels.float(), 0.2),
         "int64"),
        (lambda: instance_classification_loss(x, torch.randn(10, 8), labels, 0.0), "temperature"),
        (lambda: info_nce(x, y[:3], torch.randn(5, 8), 0.2), "query and key"),
        (lambda: info_nce(x, y, torch.randn(5, 7), 0.2), "negatives"),
        (lambda: info_nce(x, y, torch.randn(3, 5, 8), 0.2), "negatives"),
        (lambda: info_nce(x, y, torch.randn(0, 8), 0.2), "K >= 1"),
        (lambda: info_nce(x, y, torch.randn(5, 8), -1.0), "temperature"),
        (lambda: nce_loss(x, y, torch.randn(4, 5, 9), 0.2, 100, 1.0), "negatives"),
        (lambda: nce_loss(x, y, torch.randn(5, 8), 0.2, 0, 1.0), "num_instances"),
        (lambda: nce_loss(x, y, torch.randn(5, 8), 0.2, 100, 0.0), "z must"),
        (lambda: nce_loss(x, y, torch.randn(5, 8), 0.2, 100, math.inf), "z must"),
        (lambda: nt_xent(x, y[:, :5], 0.2), "z1 and z2"),
        (lambda: nt_xent(x[:1], y[:1], 0.2), "B >= 2"),
        (lambda: nt_xent(x, y, 0.0), "temperature"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_invalid_input_raises_a_clear_value_error(case):
    call, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()

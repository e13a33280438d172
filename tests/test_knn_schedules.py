"""kNN voting and learning-rate schedules against direct computations."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from pic.engine.knn import knn_predict
from pic.engine.schedules import Cosine, Step


def test_weighted_knn_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(50, 6, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    query = F.normalize(torch.randn(9, 6, generator=g), dim=1)
    k, t = 7, 0.1
    scores = knn_predict(train, labels, query, 4, k, t, chunk=4)
    for qi, q in enumerate(query.tolist()):
        sims = sorted(((sum(a * b for a, b in zip(q, row, strict=True)), i)
                       for i, row in enumerate(train.tolist())), reverse=True)[:k]
        expected = [0.0] * 4
        for sim, i in sims:
            expected[labels[i]] += math.exp(sim / t)
        # float32 cosine of unit 6-d rows: error ≤ ~6·2^-24 ≈ 4e-7 on any CPU's summation order;
        # exp(s/T) turns it into a relative error ≤ 4e-7 / T = 4e-6 at T 0.1.
        torch.testing.assert_close(scores[qi], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_cosine_warms_up_linearly_then_decays_to_final_lr():
    lr_at = Cosine(warmup_epochs=2, warmup_start_factor=0.01, final_lr=1e-6)(1.0, 100, 10)
    assert lr_at(0) == 0.01
    assert math.isclose(lr_at(10), 0.01 + 0.99 * 0.5)
    assert lr_at(20) == 1.0
    assert math.isclose(lr_at(60), 1e-6 + (1 - 1e-6) * 0.5)  # half-way through the decay
    assert math.isclose(lr_at(100), 1e-6)


def test_cosine_default_warmup_is_a_fortieth_of_the_run():
    lr_at = Cosine(warmup_epochs=None)(1.0, 400, 4)
    assert lr_at(9) < 1.0 and lr_at(10) == 1.0


def test_step_schedule_drops_at_milestones_in_epochs():
    lr_at = Step(milestones=[3, 5], gamma=0.1, warmup_epochs=0)(0.5, 80, 10)
    assert [lr_at(s) for s in (0, 29, 30, 49, 50)] == [0.5, 0.5, 0.5 * 0.1, 0.5 * 0.1,
                                                       0.5 * 0.1 * 0.1]

"""Sampler invariants: coverage, seeding, sharding on 2 ranks, exact mid-epoch resume, and the
sliding window's geometry (window W, stride S, overlap W - S, period N / S, reshuffle)."""

from __future__ import annotations

import math
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from pic.data.samplers import EpochSampler, SlidingWindowSampler, list_order, list_position


def epoch_of(sampler, epoch: int, start: int = 0) -> list[int]:
    sampler.set_epoch(epoch, start)
    return list(sampler)


# ---------------------------------------------------------------- epoch sampler


def test_epoch_sampler_is_a_permutation_each_epoch():
    s = EpochSampler(37, seed=3)
    orders = [epoch_of(s, e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(37))
        assert len(order) == len(s) == 37
    assert orders[0] != orders[1] != orders[2]
    assert s.passes_per_epoch == 1.0


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    epoch_of(a, 7)  # a's history must not matter
    assert epoch_of(a, 2) == epoch_of(b, 2)
    assert epoch_of(EpochSampler(50, seed=2), 2) != epoch_of(b, 2)


def test_epoch_sampler_two_ranks_disjoint_equal_length_cover():
    n = 41
    ranks = [EpochSampler(n, seed=0, rank=r, world_size=2) for r in range(2)]
    parts = [epoch_of(s, 4) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == n // 2 == len(ranks[0])
    assert not set(parts[0]) & set(parts[1])
    # Together they are the single-process order with the (odd) tail dropped, interleaved.
    whole = epoch_of(EpochSampler(n, seed=0), 4)
    assert [x for pair in zip(*parts, strict=True) for x in pair] == whole[: 2 * (n // 2)]


def test_epoch_sampler_resumes_mid_epoch_exactly():
    s = EpochSampler(30, seed=5, rank=1, world_size=2)
    full = epoch_of(s, 3)
    fresh = EpochSampler(30, seed=5, rank=1, world_size=2)
    assert epoch_of(fresh, 3, start=11) == full[11:]
    assert epoch_of(fresh, 3, start=len(full)) == []


def test_epoch_sampler_with_part_cache_draws_only_its_indices():
    n, world = 11, 3
    for rank in range(world):
        held = [i for i in range(n) if i % world == rank]
        s = EpochSampler(n, seed=0, rank=rank, world_size=world, indices=held)
        order = epoch_of(s, 1)
        assert len(order) == len(s) == n // world
        assert len(set(order)) == len(order) and set(order) <= set(held)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset_size=0), "dataset_size"),
        (dict(dataset_size=10, rank=2, world_size=2), "rank"),
        (dict(dataset_size=10, world_size=2, indices=[0, 2]), "holds 2 indices"),
        (dict(dataset_size=10, indices=list(range(9)) + [10]), "index 10"),
    ],
)
def test_epoch_sampler_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpochSampler(**kwargs)


def test_set_epoch_rejects_start_past_the_end():
    with pytest.raises(ValueError, match="start"):
        EpochSampler(10).set_epoch(0, start=11)


# ---------------------------------------------------------------- sliding window


def windows(sampler, count: int) -> list[list[int]]:
    return [epoch_of(sampler, t) for t in range(count)]


def test_window_has_w_distinct_images_and_consecutive_windows_share_w_minus_s():
    n, w, s = 100, 40, 10
    sampler = SlidingWindowSampler(n, seed=1, window_size=w, stride=s)
    assert len(sampler) == w and sampler.passes_per_epoch == w / n
    ws = windows(sampler, 25)  # 2.5 passes over the list, including wrap-arounds
    for t in range(len(ws) - 1):
        assert len(ws[t]) == len(set(ws[t])) == w
        assert len(set(ws[t]) & set(ws[t + 1])) == w - s


def test_window_slides_along_one_fixed_list():
    """Each image enters once per pass and stays exactly W/S consecutive windows; the windows
    repeat with period N/S; the entry order over a pass is a permutation of the dataset."""
    n, w, s = 60, 24, 6
    sampler = SlidingWindowSampler(n, seed=4, window_size=w, stride=s)
    period = n // s
    ws = [set(x) for x in windows(sampler, 3 * period)]
    assert ws[:period] == ws[period : 2 * period] == ws[2 * period :]
    entered = Counter()
    for t in range(period):
        for i in ws[t]:
            # number of consecutive windows from t on (cyclically) that contain image i
            run = 0
            while i in ws[t + run]:
                run += 1
            if i not in ws[t - 1]:
                entered[i] += 1
                assert run == w // s
    assert sorted(entered) == list(range(n)) and set(entered.values()) == {1}


def test_window_is_reshuffled_inside_by_epoch():
    n = 50
    sampler = SlidingWindowSampler(n, seed=0, window_size=n, stride=n)
    a, b = epoch_of(sampler, 0), epoch_of(sampler, 1)
    assert set(a) == set(b) == set(range(n)) and a != b


def test_sliding_window_order_depends_only_on_seed_and_epoch():
    kw = dict(window_size=30, stride=7)
    a = SlidingWindowSampler(90, seed=2, **kw)
    b = SlidingWindowSampler(90, seed=2, **kw)
    epoch_of(a, 9)
    assert epoch_of(a, 5) == epoch_of(b, 5)
    assert epoch_of(SlidingWindowSampler(90, seed=3, **kw), 5) != epoch_of(b, 5)


def test_reshuffle_changes_the_list_after_a_wrap_only():
    n, w, s = 40, 10, 10
    plain = SlidingWindowSampler(n, seed=0, window_size=w, stride=s)
    reshuf = SlidingWindowSampler(n, seed=0, window_size=w, stride=s, reshuffle=True)
    first_pass = [set(x) for x in windows(reshuf, 4)]
    assert first_pass == [set(x) for x in windows(plain, 4)]
    second_plain = [set(epoch_of(plain, t)) for t in range(4, 8)]
    second_reshuf = [set(epoch_of(reshuf, t)) for t in range(4, 8)]
    assert second_plain == first_pass  # no reshuffle: same windows again
    assert second_reshuf != first_pass  # reshuffle: a new partition of the dataset
    assert set().union(*second_reshuf) == set(range(n))


def test_window_and_stride_are_clipped_to_the_dataset():
    sampler = SlidingWindowSampler(20, seed=0, window_size=131072, stride=16384)
    assert sampler.window_size == 20 and sampler.stride == 20 and len(sampler) == 20
    assert sampler.passes_per_epoch == 1.0
    assert sorted(epoch_of(sampler, 3)) == list(range(20))


def test_sliding_window_two_ranks_cover_the_window_disjointly():
    n, w, s = 101, 40, 8
    single = SlidingWindowSampler(n, seed=6, window_size=w, stride=s)
    ranks = [SlidingWindowSampler(n, seed=6, rank=r, world_size=2, window_size=w, stride=s)
             for r in range(2)]
    for t in (0, 3, 12, 13):  # includes windows straddling the wrap (t*S + W > N)
        parts = [epoch_of(r, t) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == w // 2
        assert not set(parts[0]) & set(parts[1])
        assert set(parts[0]) | set(parts[1]) == set(epoch_of(single, t))


def test_sliding_window_odd_sizes_are_rounded_down_per_rank():
    ranks = [SlidingWindowSampler(50, rank=r, world_size=2, window_size=21, stride=5)
             for r in range(2)]
    assert ranks[0].window_size == 20 and ranks[0].stride == 4 and len(ranks[1]) == 10
    a, b = epoch_of(ranks[0], 1), epoch_of(ranks[1], 1)
    assert len(set(a) | set(b)) == 20


def test_sliding_window_resumes_mid_window_exactly():
    kw = dict(seed=1, rank=1, world_size=2, window_size=32, stride=8, reshuffle=True)
    full = epoch_of(SlidingWindowSampler(80, **kw), 11)
    fresh = SlidingWindowSampler(80, **kw)
    assert epoch_of(fresh, 11, start=5) == full[5:]


def test_sliding_window_with_part_cache_slides_over_its_own_indices():
    n, world, w, s = 64, 2, 16, 4
    for rank in range(world):
        held = [i for i in range(n) if i % world == rank]
        sampler = SlidingWindowSampler(n, rank=rank, world_size=world, indices=held,
                                       window_size=w, stride=s)
        ws = [set(x) for x in windows(sampler, 6)]
        assert all(len(x) == w // world and x <= set(held) for x in ws)
        assert all(len(ws[t] & ws[t + 1]) == (w - s) // world for t in range(5))


def test_total_images_seen_matches_epochs_times_n():
    """The trainer runs ceil(epochs / passes_per_epoch) sampler-epochs."""
    n, epochs = 1000, 3
    sampler = SlidingWindowSampler(n, window_size=256, stride=64)
    sampler_epochs = math.ceil(epochs / sampler.passes_per_epoch)
    seen = sampler_epochs * len(sampler)
    assert epochs * n <= seen < epochs * n + len(sampler)


def test_sliding_window_stride_smaller_than_world_is_an_error():
    with pytest.raises(ValueError, match="stride 1"):
        SlidingWindowSampler(10, world_size=2, window_size=4, stride=1)


# ---------------------------------------------------------------- the list's permutation


def test_window_cost_does_not_depend_on_n():
    """A window costs O(W): no allocation grows with N (the list is never materialised)."""
    w, s = 512, 128
    peaks = {}
    for n in (10**4, 10**7):
        sampler = SlidingWindowSampler(n, seed=1, window_size=w, stride=s)
        tracemalloc.start()
        order = epoch_of(sampler, 3)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(set(order)) == w
    # A few W-long int64 arrays (and the W Python ints of the list): < 256 bytes per image.
    assert peaks[10**7] < 256 * w, peaks
    assert peaks[10**7] < 2 * peaks[10**4], peaks


def test_windows_of_a_huge_dataset():
    n = 2**50 + 3  # no array of N could exist
    sampler = SlidingWindowSampler(n, seed=2, window_size=64, stride=16)
    a, b = epoch_of(sampler, 10**12), epoch_of(sampler, 10**12 + 1)
    assert len(set(a)) == 64 and len(set(a) & set(b)) == 48
    assert all(0 <= i < n for i in a)
    positions = list_position(2, n, np.asarray(sampler.window(10**12)))
    assert positions.tolist() == [10**12 * 16 + p for p in range(64)]


def reference_list(seed: int, size: int, cycle: int) -> list[int]:
    """The list by an explicit loop in Python integers: a 6-round Feistel network on the
    smallest even-bit domain >= size (round function splitmix64(side ^ key)), cycle-walking."""
    keys = np.random.SeedSequence([seed, 0, cycle]).generate_state(6, np.uint64).tolist()
    half = max(1, -(-(size - 1).bit_length() // 2))
    mask, word = (1 << half) - 1, (1 << 64) - 1

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & word
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & word
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & word
        return x ^ (x >> 31)

    def network(x: int) -> int:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (mix(right ^ key) & mask)
        return (left << half) | right

    out = []
    for position in range(size):
        x = network(position)
        while x >= size:
            x = network(x)
        out.append(x)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 17, 64, 65, 1000, 4099])
def test_list_order_is_a_bijection_with_its_inverse(size):
    for seed, cycle in ((0, 0), (7, 3)):
        positions = np.arange(size)
        order = list_order(seed, size, positions, cycle)
        assert order.tolist() == reference_list(seed, size, cycle)
        assert sorted(order.tolist()) == list(range(size))
        assert list_position(seed, size, order, cycle).tolist() == list(range(size))
        assert list_order(seed, size, list_position(seed, size, positions, cycle),
                          cycle).tolist() == list(range(size))
    with pytest.raises(IndexError, match=rf"outside \[0, {size}\)"):
        list_order(0, size, np.array([size]))


def test_list_order_is_uniform_over_seeds():
    """The image at each position is uniform over seeds (counts within 5 binomial sd)."""
    n, seeds = 10, 3000
    counts = np.zeros((n, n))
    for seed in range(seeds):
        counts[np.arange(n), list_order(seed, n, np.arange(n))] += 1
    expected = seeds / n
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected * (1 - 1 / n))

"""Accuracy regression: every method must still learn.

Each test runs one method's short fixed-seed fp32 pretraining on the embedded digits exactly as
``python bench/ssl.py --preset ci`` does (``launch.py`` in a subprocess, the preset's budget),
and asserts its kNN (and, where the run reports one, linear-probe) top-1 above a floor and above
the same network at random initialisation. The floors come from the seed band measured with the
bench (below): the lowest seed minus headroom, so that another seed's worth of numerical noise
(another CPU's rounding) does not fail the test, while a method that stops learning does.
"""

from __future__ import annotations

import pytest

from bench.ssl import PRESETS, common_overrides, execute, flatten, metric, plan

# Measured: python bench/ssl.py --preset ci --seeds 0 1 2 3 4 --out /tmp/bench_ci
# (FILLED IN BELOW FROM THE MEASUREMENT)
FLOORS: dict[str, dict[str, float]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(FLOORS))
def test_method_learns(label: str, tmp_path) -> None:
    ci = PRESETS["ci"]
    (run,) = plan({label: ci.methods[label]}, common_overrides(ci), [0], tmp_path)
    done = execute(run)
    flat = flatten(done["results"])
    for kind, floor in FLOORS[label].items():
        trained = metric(flat, done["eval"], kind, "trained")
        init = metric(flat, done["eval"], kind, "random_init")
        assert trained is not None and init is not None, f"{kind} missing from results.json"
        assert trained >= floor, f"{label}: {kind} top-1 {trained:.2f} < floor {floor}"
        assert trained > init, f"{label}: {kind} top-1 {trained:.2f} <= random init {init:.2f}"

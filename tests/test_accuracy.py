"""Accuracy regression: every method still learns.

Each test runs one method's short fixed-seed fp32 pretraining on the embedded digits exactly as
``python bench/ssl_methods.py --preset ci`` does (``launch.py`` in a subprocess, the preset's
budget, every default evaluation on) and asserts that its kNN-200 and probe top-1 clear a
floor, and that its kNN-200 beats the same network at random initialisation. A floor is the
lowest of the seeds measured with the bench minus headroom (below), so that another CPU's
rounding does not fail the test while a method that stops learning does.
"""

from __future__ import annotations

import pytest

from bench.ssl_methods import PRESETS, common_overrides, execute, flatten, metric, plan

# The lowest of seeds 0-2 (kNN-200 and probe top-1 on the 540 held-out digits), measured with
#   python bench/ssl_methods.py --preset ci --seeds 0 1 2
# on 2026-12-02 (AMD EPYC with avx512_bf16, fp32, shared 2-core machine; README, "The methods");
# MoCo v1/v2 again on 2026-12-07, after MoCo's own-key exclusion (the same kind of CPU).
SEED_MIN: dict[str, dict[str, float]] = {
    "PIC": {"knn200": 50.19, "probe": 92.59},
    "SimCLR": {"knn200": 52.41, "probe": 95.00},
    "MoCo v2": {"knn200": 48.52, "probe": 93.33},
    "MoCo v1": {"knn200": 43.70, "probe": 91.48},
    "InstDisc": {"knn200": 55.56, "probe": 87.96},
}
# Top-1 points below the lowest seed. Another CPU's rounding moves a run like another seed: the
# seed-0 InstDisc run under AVX2 dispatch (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
# scored kNN-200 52.04 where it scored 55.56 with AVX-512, 3.5 below the lowest seed.
HEADROOM = 6.0
# Beating the same network at random init is asserted on kNN-200, where every method gained at
# every seed (3.3-22.2 points). The probe did not (PIC -0.2 and MoCo v1 -0.9 at seed 0: at
# random init it already scores 90.6-92.8 on these digits, pixels 96.1): there the floor holds.
BEATS_INIT = ("knn200",)


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(SEED_MIN))
def test_method_learns(label: str, tmp_path) -> None:
    ci = PRESETS["ci"]
    (run,) = plan({label: ci.methods[label]},
                  common_overrides(ci, extra=["trainer.precision=fp32"]), [0], tmp_path)
    done = execute(run)
    flat = flatten(done["results"])
    for kind, lowest in SEED_MIN[label].items():
        trained = metric(flat, done["eval"], kind, "trained")
        init = metric(flat, done["eval"], kind, "random_init")
        assert trained is not None and init is not None, f"{kind} missing from results.json"
        floor = lowest - HEADROOM
        assert trained >= floor, f"{label}: {kind} top-1 {trained:.2f} < floor {floor:.2f}"
        if kind in BEATS_INIT:
            assert trained > init, f"{label}: {kind} top-1 {trained:.2f} <= random init {init:.2f}"

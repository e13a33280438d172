"""Resume is exact: k steps + stop + k more steps == 2k steps straight."""

from __future__ import annotations

import torch

from pic.engine.checkpoint import load_checkpoint
from pic.run import run_task

from .helpers import compose_config

SMALL = ["logger=none", "backbone.widths=[8,16]", "trainer.batch_size=128",
         "trainer.progress=false", "trainer.checkpoint_every=1000", "task.plot=false",
         "task.knn_random_init=false", "trainer.precision=fp32", "trainer.channels_last=false"]


def run(out_dir, steps: int, workers: int) -> dict:
    cfg = compose_config(*SMALL, f"output_dir={out_dir}", f"trainer.max_steps={steps}",
                         f"trainer.num_workers={workers}")
    run_task(cfg)
    return load_checkpoint(out_dir / "current.pth")


def assert_same_state(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][pid][name], value, rtol=0, atol=0)


def test_stop_and_resume_ends_with_identical_weights_and_optimizer_state(tmp_path):
    # 1,257 images / 128 per step = 9 steps per epoch: the stop is mid-epoch, the run crosses
    # an epoch boundary, and the resumed half uses loader workers (augmentations must not care).
    straight = run(tmp_path / "straight", 12, workers=0)
    run(tmp_path / "resumed", 6, workers=0)
    halfway = load_checkpoint(tmp_path / "resumed" / "current.pth")
    assert halfway["state"]["step"] == 6 and halfway["state"]["position"] == 6 * 128
    resumed = run(tmp_path / "resumed", 12, workers=2)
    assert resumed["state"]["step"] == straight["state"]["step"] == 12
    assert resumed["state"]["epoch"] == straight["state"]["epoch"] == 1
    assert_same_state(straight, resumed)
    # Guard against a vacuous pass: training did change the weights.
    fresh = run(tmp_path / "one", 1, workers=0)
    changed = [k for k, v in fresh["model"].items()
               if v.is_floating_point() and not torch.equal(v, straight["model"][k])]
    assert changed

"""bench/ssl_methods.py reuses a finished run only if it is the same run."""

from __future__ import annotations

import json
from pathlib import Path

from bench.ssl_methods import Run, claim, recipe, reusable


def test_a_finished_run_is_reused_only_for_the_same_overrides_and_config(
        tmp_path: Path) -> None:
    run = Run("PIC", ("experiment=small_pic", "data=folder", "data.root=/d"), 0, tmp_path)
    command, config = run.command(), recipe(run)
    record = tmp_path / "bench.json"
    assert reusable(record, command, config) is None  # nothing finished yet
    record.write_text(json.dumps({"command": command, "config": config, "results": {}}))
    reordered = [command[0], *reversed(command[1:])]
    assert reusable(record, reordered, config) is not None
    assert reusable(record, [*command, "optimizer.lr=1"], config) is None
    # An edited conf/ file: the same command composes another config.
    edited = recipe(Run("PIC", (*run.overrides, "model.temperature=0.5"), 0, tmp_path))
    assert edited != config and reusable(record, command, edited) is None
    # A record from before configs were recorded is not trusted.
    record.write_text(json.dumps({"command": command, "results": {}}))
    assert reusable(record, command, config) is None


def test_a_rerun_never_resumes_another_runs_checkpoint(tmp_path: Path) -> None:
    """A folder left by another recipe is moved aside (launch.py would resume its checkpoint
    as this run's); one left by an interrupted start of the same run is kept, to resume."""
    run_dir = tmp_path / "pic" / "seed0"
    run = Run("PIC", ("experiment=small_pic", "data=folder", "data.root=/d"), 0, run_dir)
    command, config = run.command(), recipe(run)
    run_dir.mkdir(parents=True)
    (run_dir / "current.pth").write_text("an older recipe's checkpoint")
    aside = claim(run_dir, command, config)
    assert aside is not None and (aside / "current.pth").is_file()
    assert not (run_dir / "current.pth").exists()
    (run_dir / "current.pth").write_text("this run's checkpoint, interrupted")
    assert claim(run_dir, command, config) is None
    assert (run_dir / "current.pth").is_file()
    assert claim(run_dir, command, config + "# edited\n") is not None

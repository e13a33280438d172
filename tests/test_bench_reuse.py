"""bench/ssl_methods.py reuses a finished run only if it is the same run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.ssl_methods import (
    PRESETS,
    ROOT,
    Run,
    claim,
    code_hash,
    common_overrides,
    recipe,
    reusable,
)


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


def test_an_edit_of_the_code_reruns_a_finished_run(tmp_path: Path) -> None:
    """The recipe carries the hash of src/ and launch.py: a fix in a loss makes the bench rerun
    the runs it would change (it reused them before, however stale); a README edit does not."""
    assert recipe(Run("PIC", ("model=pic",), 0, tmp_path)).endswith(f"# code {code_hash()}\n")
    (tmp_path / "src" / "pic" / "csrc").mkdir(parents=True)
    loss = tmp_path / "src" / "pic" / "losses.py"
    loss.write_text("def loss(): return 1\n")
    (tmp_path / "src" / "pic" / "csrc" / "rows.c").write_text("int rows;\n")
    (tmp_path / "launch.py").write_text("print()\n")
    hashes = [code_hash.__wrapped__(tmp_path)]
    (tmp_path / "README.md").write_text("a note\n")
    (tmp_path / "src" / "pic" / "_native.so").write_bytes(b"\x7fELF")  # a build output
    hashes.append(code_hash.__wrapped__(tmp_path))
    loss.write_text("def loss(): return 2\n")
    hashes.append(code_hash.__wrapped__(tmp_path))
    (tmp_path / "src" / "pic" / "csrc" / "rows.c").write_text("int rows = 1;\n")
    hashes.append(code_hash.__wrapped__(tmp_path))
    assert hashes[0] == hashes[1] and len(set(hashes[1:])) == 3
    assert code_hash() == code_hash.__wrapped__(ROOT)


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


def test_a_failed_run_is_reported_in_the_table_not_a_traceback(tmp_path: Path,
                                                               monkeypatch) -> None:
    """One method's failing run (here a missing data folder, in a real launch.py) no longer
    aborts the bench and loses the other methods' rows: the table keeps them, names the
    failure with its error line, and the bench exits 1."""
    from bench import ssl_methods

    real = ssl_methods.execute
    good = {"wall_s": 1.0, "cpu_s": 1.0, "eval": {"k": [20], "temperature": [0.07]},
            "results": {"knn_top1": 80.0, "probe_top1": 90.0, "num_instances": 10}}
    monkeypatch.setattr(ssl_methods, "execute",
                        lambda run, config: good if run.label == "Good" else real(run, config))
    with pytest.raises(SystemExit) as exit_:
        ssl_methods.main(["--method", "Good=model=pic", "--method",
                          f"Bad=data=folder data.root={tmp_path / 'nowhere'}", "--seeds", "0",
                          "--out", str(tmp_path / "bench")])
    assert exit_.value.code == 1
    text = (tmp_path / "bench" / "table.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| ")}
    assert "80.0" in rows["Good"] and "90.0" in rows["Good"] and "80.0" not in rows["Bad"]
    assert re.search(r"- Bad seed 0 failed \(exit 1\): FileNotFoundError: data=folder: "
                     rf"{re.escape(str(tmp_path / 'nowhere'))}/train is not a folder", text)


def test_the_small_recipe_presets_keep_each_recipe_batch() -> None:
    """`real` fixes the image budget (epochs), not the batch: small_pic runs at its own 64.
    `--batch-size` still fixes it for every run, and the digits presets keep theirs."""
    real = common_overrides(PRESETS["real"])
    assert "trainer.epochs=10" in real and not any("batch_size" in o for o in real)
    assert "trainer.batch_size=128" in common_overrides(PRESETS["real"], batch=128)
    assert "trainer.batch_size=256" in common_overrides(PRESETS["default"])

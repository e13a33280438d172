"""``python -m pic.report``: one row per run (a pretrain → linear run is one row), the paper's
numbers beside its rows, loss curves read from checkpoints, CSV and PNGs written, clear errors."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pic.engine.checkpoint import FORMAT, TrainState, atomic_save
from pic.report import find_runs, knn_curve, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, config: str, results: dict, history: list[tuple[int, float]]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "results.json").write_text(json.dumps(results))
    state = asdict(TrainState(step=history[-1][0], history=history))
    # A large tensor stands in for PIC's classifier: the report must not need it.
    atomic_save({"format": FORMAT, "model": {"w": torch.zeros(1000, 128)}, "state": state},
                run_dir / "current.pth")


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    history = [{"epoch": 1.0, "top1": 40.0, "top5": 70.0}, {"epoch": 2.0, "top1": 45.5,
                                                            "top5": 75.0}]
    write_run(root / "0_pic_200ep",
              "name: pic_200ep\nmodel:\n  _target_: pic.models.pic.PIC\n"
              "task:\n  _target_: pic.tasks.linear.LinearEval\n  pretrain_first: true\n",
              {"epochs": 200.0, "steps": 400, "train_time_s": 7200.0, "knn_top1": 50.0,
               "knn_top1_random_init": 20.0, "linear_top1": 45.5, "linear_top5": 75.0,
               "linear_best_top1": 45.5, "linear_history": history},
              [(100, 9.0), (400, 7.5)])
    write_run(root / "0_pic_200ep" / "linear", "name: pic_200ep\n",
              {"epochs": 2.0, "steps": 10, "linear_top1": 45.5, "linear_history": history},
              [(5, 2.0), (10, 1.5)])
    write_run(root / "1_simclr",
              "name: ${hydra:runtime.choices.model}\nmodel:\n  _target_: pic.models.simclr.SimCLR\n"
              "task:\n  _target_: pic.tasks.pretrain.Pretrain\n",
              {"epochs": 3.0, "steps": 30, "train_time_s": 36.0, "knn_top1": 90.0,
               "knn_top1_random_init": 85.0, "knn_top1_pixels": 97.5, "probe_top1": 93.0,
               "probe_top1_random_init": 92.0, "probe_top1_pixels": 96.0},
              [(10, 5.0), (30, 4.0)])
    write_run(root / "2_eval",
              "name: ${hydra:runtime.choices.model}\nmodel:\n  _target_: pic.models.pic.PIC\n"
              "task:\n  _target_: pic.tasks.linear.LinearEval\n  pretrain_first: false\n",
              {"epochs": 4.0, "steps": 8, "train_time_s": 3.0, "linear_top1": 30.0,
               "linear_top5": 60.0, "linear_best_top1": 31.0}, [(4, 2.5), (8, 2.0)])
    return root


def test_one_row_per_run_with_the_papers_numbers(sweep: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep)]) == 0
    with open(sweep / "report.csv", newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["0_pic_200ep", "1_simclr", "2_eval"]  # linear/ is its parent's

    pic = rows["0_pic_200ep"]
    assert (pic["name"], pic["method"], float(pic["epochs"]), float(pic["hours"])) == (
        "pic_200ep", "PIC", 200.0, 2.0)
    assert (float(pic["knn_top1"]), float(pic["knn_top1_random_init"])) == (50.0, 20.0)
    assert (float(pic["linear_top1"]), float(pic["linear_top5"])) == (45.5, 75.0)
    assert (float(pic["paper_top1"]), float(pic["paper_top5"])) == (68.6, 88.8)  # the notes

    simclr = rows["1_simclr"]  # an unresolvable default name falls back to the method
    assert (simclr["name"], simclr["method"], simclr["linear_top1"], simclr["paper_top1"]) == (
        "SimCLR", "SimCLR", "", "")
    # Every result beside its baselines: random init and raw pixels, kNN and probe.
    assert [float(simclr[k]) for k in ("knn_top1", "knn_top1_random_init", "knn_top1_pixels",
                                       "probe_top1", "probe_top1_random_init",
                                       "probe_top1_pixels")] == [90.0, 85.0, 97.5, 93.0, 92.0,
                                                                 96.0]
    assert pic["knn_top1_pixels"] == "" and pic["probe_top1"] == ""  # not measured: empty
    evaluation = rows["2_eval"]  # a linear evaluation alone: no pretraining length or method
    assert (evaluation["name"], evaluation["method"], evaluation["epochs"]) == ("2_eval", "", "")
    assert float(evaluation["linear_best_top1"]) == 31.0

    markdown = (sweep / "report.md").read_text()
    assert markdown in capsys.readouterr().out
    assert markdown.count("\n") == 2 + 3 and "| 0_pic_200ep | pic_200ep | PIC |" in markdown
    for kind in ("loss", "eval", "linear"):
        assert (sweep / f"report_{kind}.png").read_bytes()[:8] == PNG_MAGIC


def test_loss_curves_in_epochs_from_checkpoints(sweep: Path) -> None:
    runs = {run.path.name: run for run in find_runs(sweep)}
    # Pretraining: 400 steps were 200 epochs; its linear/ run: 10 steps were 2 epochs.
    assert runs["0_pic_200ep"].loss == [(50.0, 9.0), (200.0, 7.5)]
    assert runs["0_pic_200ep"].linear_loss == [(1.0, 2.0), (2.0, 1.5)]
    assert runs["2_eval"].loss == [] and runs["2_eval"].linear_loss == [(2.0, 2.5), (4.0, 2.0)]


def test_errors_name_the_directory_or_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} is not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert f"no results.json under {tmp_path}" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'run' / 'results.json'}: not valid JSON" in capsys.readouterr().err


def test_knn_curve_from_random_init_through_the_monitor_to_the_end() -> None:
    results = {"epochs": 30.0, "knn_top1": 60.0, "knn_top1_random_init": 20.0,
               "knn_history": [{"epoch": 10.0, "top1": 40.0, "top5": 70.0},
                               {"epoch": 20.0, "top1": 50.0, "top5": 80.0},
                               {"epoch": 30.0, "top1": 60.0, "top5": 90.0}]}
    assert knn_curve(results) == [(0.0, 20.0), (10.0, 40.0), (20.0, 50.0), (30.0, 60.0)]
    del results["knn_history"]
    assert knn_curve(results) == [(0.0, 20.0), (30.0, 60.0)]

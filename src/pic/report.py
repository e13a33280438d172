"""Report a run or a sweep: a table beside the paper's numbers, and plots.

    python -m pic.report outputs/2026-11-29/10-00-00_pic          # one run
    python -m pic.report multirun/2026-11-29/10-00-00             # a sweep (e.g. paper_table)

Writes ``DIR/report.md``, ``DIR/report.csv`` and three PNGs: ``report_loss.png`` (training loss
per run against epochs), ``report_eval.png`` (kNN top-1 from random init, through the kNN
monitor's ``knn_history`` when results have one, to the end of pretraining, with the raw pixels'
level dashed; linear top-1 per linear epoch) and ``report_linear.png`` (linear top-1 per run, the
paper's value beside it for the rows of its table). A run is a directory with a
``results.json``; the ``linear/`` directory of a pretrain → linear run belongs to its parent.
Loss curves come from each run's ``current.pth`` (memory-mapped: only the history is read).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from .collect import read_json, to_markdown, write_csv

# The seed's table (ImageNet-1k, ResNet-50, linear evaluation top-1 / top-5), keyed by the
# experiment that reproduces each row.
PAPER: dict[str, tuple[float, float]] = {
    "instdisc_200ep": (60.6, 82.6), "simclr_100ep": (64.7, 86.0), "mocov2_100ep": (64.6, 85.9),
    "pic_200ep": (68.6, 88.8), "instdisc_400ep": (62.7, 84.6), "simclr_200ep": (66.6, 87.3),
    "mocov2_200ep": (67.9, 88.1), "pic_400ep": (70.3, 89.8), "pic_1600ep": (70.8, 90.0),
}
# epochs and hours: pretraining (empty for a linear evaluation of an earlier run).
# Each result beside its baselines: the same network at random init, and the raw pixels.
RESULTS = ["knn_top1", "knn_top1_random_init", "knn_top1_pixels", "probe_top1",
           "probe_top1_random_init", "probe_top1_pixels", "linear_top1", "linear_top5",
           "linear_best_top1"]
COLUMNS = ["run", "name", "method", "epochs", "hours", *RESULTS, "paper_top1", "paper_top5"]


@dataclass
class Run:
    """One run directory: its results, name, method and training-loss histories."""

    path: Path
    results: dict[str, Any]
    name: str
    method: str
    loss: list[tuple[float, float]] = field(default_factory=list)  # (epoch, loss), pretraining
    linear_loss: list[tuple[float, float]] = field(default_factory=list)  # (epoch, loss)


def loss_history(run_dir: Path) -> list[tuple[float, float]]:
    """(epoch, loss) at the log points of ``run_dir/current.pth``; empty without a checkpoint."""
    path = run_dir / "current.pth"
    if not path.is_file():
        return []
    # mmap: the tensors (an N×128 classifier at ImageNet scale) stay on disk, unread.
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    state = ckpt.get("state", {}) if isinstance(ckpt, dict) else {}
    history = state.get("history", [])
    if not history:
        return []
    results = run_dir / "results.json"
    summary = read_json(results) if results.is_file() else {}
    steps, epochs = summary.get("steps"), summary.get("epochs")
    per_step = epochs / steps if steps and epochs else 1.0  # no summary yet: plot against steps
    return [(step * per_step, loss) for step, loss in history]


def _describe(run_dir: Path) -> tuple[str, str, bool]:
    """(name, method, whether the run is a linear evaluation only) from its config.yaml."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return run_dir.name, "", False
    cfg = OmegaConf.load(path)
    task = OmegaConf.select(cfg, "task", default={}) or {}
    linear_only = str(task.get("_target_", "")).endswith(".LinearEval") and not task.get(
        "pretrain_first", False)
    # A linear-only run's model group is not the one its checkpoint was trained with.
    method = "" if linear_only else str(
        OmegaConf.select(cfg, "model._target_", default="")).rsplit(".", 1)[-1]
    # The default name interpolates Hydra's choices, which cannot be resolved after the run.
    name = cfg.get("name") if not OmegaConf.is_interpolation(cfg, "name") else None
    return str(name or method or run_dir.name), method, linear_only


def find_runs(root: Path) -> list[Run]:
    """Every run under ``root`` (``root`` itself included), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = []
    for path in sorted(root.rglob("results.json")):
        run_dir = path.parent
        if run_dir.name == "linear" and (run_dir.parent / "results.json").is_file():
            continue  # the linear evaluation of its parent's pretraining
        name, method, linear_only = _describe(run_dir)
        own, linear = loss_history(run_dir), loss_history(run_dir / "linear")
        runs.append(Run(run_dir, read_json(path), name, method, [] if linear_only else own,
                        own if linear_only else linear))
    if not runs:
        raise FileNotFoundError(f"no results.json under {root}")
    return runs


def table(runs: list[Run], root: Path) -> list[dict[str, Any]]:
    """One row per run with :data:`COLUMNS`; missing values are empty strings."""
    rows = []
    for run in runs:
        r = run.results
        paper = PAPER.get(run.name, ("", ""))
        pretrained = "knn_top1" in r  # a linear-only run reports its linear loop's length
        hours = r["train_time_s"] / 3600 if pretrained else ""
        rows.append({"run": run.path.relative_to(root).as_posix() or ".", "name": run.name,
                     "method": run.method, "epochs": r["epochs"] if pretrained else "",
                     "hours": hours,
                     **{k: r.get(k, "") for k in RESULTS},
                     "paper_top1": paper[0], "paper_top5": paper[1]})
    return rows


def knn_curve(results: dict[str, Any]) -> list[tuple[float, float]]:
    """(pretraining epoch, kNN top-1): random init at 0, the kNN monitor's points
    (``knn_history``, rows ``{epoch, top1, top5}``) if recorded, and the end of the run."""
    points = [(0.0, results.get("knn_top1_random_init", float("nan")))]
    points += [(h["epoch"], h["top1"]) for h in results.get("knn_history", [])
               if h["epoch"] < results["epochs"]]
    return [*points, (results["epochs"], results["knn_top1"])]


def plot(runs: list[Run], prefix: Path) -> list[Path]:
    """The three PNGs of the report; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [Path(f"{prefix}_{kind}.png") for kind in ("loss", "eval", "linear")]

    fig, (ax_pre, ax_lin) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        for ax, history in ((ax_pre, run.loss), (ax_lin, run.linear_loss)):
            if history:
                ax.plot(*zip(*history, strict=True), label=run.name)
    ax_pre.set(xlabel="epoch", ylabel="training loss", title="pretraining")
    ax_lin.set(xlabel="epoch", ylabel="cross-entropy", title="linear classifier")
    _finish(fig, (ax_pre, ax_lin), paths[0])

    fig, (ax_knn, ax_lin) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        r = run.results
        if "knn_top1" in r:
            line, = ax_knn.plot(*zip(*knn_curve(r), strict=True), marker="o", label=run.name)
            if "knn_top1_pixels" in r:  # the raw pixels' kNN: the level features must beat
                ax_knn.axhline(r["knn_top1_pixels"], color=line.get_color(), linestyle="--",
                               label=f"{run.name}: raw pixels")
        history = r.get("linear_history", [])
        if history:
            ax_lin.plot([h["epoch"] for h in history], [h["top1"] for h in history], marker=".",
                        label=run.name)
    ax_knn.set(xlabel="pretraining epoch", ylabel="kNN top-1 (%)",
               title="kNN: random init → end of pretraining")
    ax_lin.set(xlabel="linear epoch", ylabel="val top-1 (%)", title="linear evaluation")
    _finish(fig, (ax_knn, ax_lin), paths[1])

    scored = [run for run in runs if "linear_top1" in run.results]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(scored) + 2), 4))
    xs = range(len(scored))
    ax.bar([x - 0.2 for x in xs], [run.results["linear_top1"] for run in scored], 0.4,
           label="ours")
    ax.bar([x + 0.2 for x in xs], [PAPER.get(run.name, (0.0,))[0] for run in scored], 0.4,
           label="paper")
    ax.set_xticks(list(xs), [run.name for run in scored], rotation=30, ha="right")
    ax.set(ylabel="linear top-1 (%)", title="linear evaluation per run")
    _finish(fig, (ax,), paths[2])
    return paths


def _finish(fig: Any, axes: tuple[Any, ...], path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pic.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a run directory or a sweep directory")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = table(runs, args.dir)
    prefix = args.dir / "report"
    markdown = to_markdown(COLUMNS, rows)
    Path(f"{prefix}.md").write_text(markdown)
    write_csv(Path(f"{prefix}.csv"), COLUMNS, rows)
    pngs = plot(runs, prefix)
    print(markdown + f"\n{len(rows)} runs; written {prefix}.md, {prefix}.csv, "
          + ", ".join(p.name for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

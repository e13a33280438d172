"""Collect a sweep: one table of every ``results.json`` under a directory.

    python -m pic.collect multirun/2026-11-29/13-00-00            # writes results.md + .csv
    python -m pic.collect multirun/... --metrics knn_top1,steps   # only these result columns

A row per run: its directory (relative to DIR), the command-line overrides whose values differ
between runs (from Hydra's ``.hydra/overrides.yaml``), the dataset's fingerprint and the code's
version (commit, ``+dirty`` when files were modified; see pic/provenance.py), then the run's
scalar results. Rows whose data or code differ are not comparable without thought: the two
columns say so.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .provenance import describe_code

Row = dict[str, Any]
PROVENANCE_KEYS = ("data_fingerprint", "code_commit", "code_dirty")  # shown as data and code


def _overrides(run_dir: Path) -> dict[str, str]:
    """``key=value`` overrides of a run; ``+``/``++`` prefixes dropped, Hydra's own keys too."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            out[key] = value
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is an error naming the file."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def collect(root: Path, metrics: list[str] | None = None) -> tuple[list[str], list[Row]]:
    """(columns, rows) for every ``results.json`` under ``root``, rows sorted by directory.

    Override columns are those whose value is not the same in every run; result columns are
    ``metrics`` or else every scalar key of any result (lists and dicts are left out); the
    ``data`` and ``code`` columns follow the overrides.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    paths = sorted(root.rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json under {root}")
    runs = []
    for path in paths:
        results = read_json(path)
        runs.append((path.parent, _overrides(path.parent), results))

    keys = sorted({k for _, overrides, _ in runs for k in overrides})
    varying = [k for k in keys if len({overrides.get(k) for _, overrides, _ in runs}) > 1]
    if metrics is None:
        metrics = sorted({k for _, _, results in runs for k, v in results.items()
                          if (isinstance(v, int | float | str | bool) or v is None)
                          and k not in PROVENANCE_KEYS})
    else:
        unknown = [m for m in metrics if all(m not in results for _, _, results in runs)]
        if unknown:
            raise KeyError(f"--metrics {','.join(unknown)}: in no results.json under {root}")
    # Results written before provenance was recorded have none: no column of "unknown"s then.
    origin = ["data", "code"] if any("data_fingerprint" in r for _, _, r in runs) else []
    rows = [{"run": run_dir.relative_to(root).as_posix() or ".",
             **{k: overrides.get(k, "") for k in varying},
             **dict(zip(origin, (results.get("data_fingerprint") or "unknown",
                                 describe_code(results)), strict=False)),
             **{m: results.get(m, "") for m in metrics}}
            for run_dir, overrides, results in runs]
    return ["run", *varying, *origin, *metrics], rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(columns: list[str], rows: list[Row]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: list[str], rows: list[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pic.collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a sweep (or any) directory holding runs")
    parser.add_argument("--metrics", help="comma-separated result keys (default: all scalars)")
    parser.add_argument("--out", type=Path, help="path prefix of the tables (default DIR/results)")
    args = parser.parse_args(argv)
    metrics = args.metrics.split(",") if args.metrics else None
    try:
        columns, rows = collect(args.dir, metrics)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    prefix = args.out or args.dir / "results"
    markdown = to_markdown(columns, rows)
    Path(f"{prefix}.md").write_text(markdown)
    write_csv(Path(f"{prefix}.csv"), columns, rows)
    print(markdown + f"\n{len(rows)} runs; written {prefix}.md and {prefix}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

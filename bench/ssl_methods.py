"""Every method × several seeds at one image budget: mean ± std of kNN and probe top-1, beside
the same network at random init and raw pixels.

Each run is ``launch.py`` in a subprocess (``--precision``, fp32 by default; ``logger=none``,
no plot, its own ``hydra.run.dir`` under ``--out``); the table is read from each run's
``results.json``. Runs that finished before with the same overrides, the same composed config
and the same code are reused (an edited experiment file, or an edit of src/ or launch.py,
reruns them), so an interrupted bench continues.

    python bench/ssl_methods.py [--preset default|small|ci|real|claims] [--seeds 0 1 2] [--epochs E]
                        [--batch-size B] [--method 'LABEL=OVERRIDES' ...] [--out DIR]
                        [--jobs 1] [--precision fp32|bf16|auto]
                        [-- HYDRA_OVERRIDES for every run, e.g. data=folder ...]

Presets (``--epochs``/``--batch-size`` override their budget): ``default``, the five methods
(``model=X``: PIC, SimCLR, MoCo v2, MoCo v1, InstDisc) on digits, 10 epochs at batch 256;
``small``, their small-image recipes (``experiment=small_X``) on digits for 60 epochs, the
MoCo queues at 256; ``ci``, short runs whose seed
band is to set CI accuracy floors; ``real``, the small recipes for 10 epochs of the 10k
Fashion-MNIST images (bench/make_real_data.py), and ``small_pic`` with two views (SimCLR's
crops per image); ``claims``, the paper's claims at small scale
on the 60k Fashion-MNIST images with the small-image recipes (10 epochs): PIC with the epoch
sampler vs the sliding window, one crop vs multi-crop, and PIC vs SimCLR vs MoCo v2 vs
InstDisc. ``--method 'LABEL=OVERRIDES'`` replaces the preset's list (repeat it; overrides split
as a shell would). The image budget is the same number of passes over the training set for
every method (views per image are its own; in ``small``, ``real`` and ``claims`` so is the
batch: ``small_simclr``'s is 256, the others' 64). Trailing overrides apply
to every run (``-- backbone=resnet_tiny``).

Columns: top-1 of weighted kNN (k = 20, 200) and of the linear probe, trained and for the same
network at random init (mean ± sample std over seeds), the per-seed gain, raw pixels (one row),
and each run's wall and CPU time (its own, loader workers included). The table is printed and
written to ``--out``/table.md; it covers this call's methods and seeds only, so a later call
with fewer replaces it: call again with every method and seed for the whole table (the
finished runs are reused, so that call only reads them).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

ROOT = HERE.parent
FASHION_GRAY = ["data=folder", "data.image_size=32",
                "data.mean=[0.286,0.286,0.286]", "data.std=[0.353,0.353,0.353]"]
FASHION_60K = (*FASHION_GRAY, "data.root=/work/data/fashion-mnist")
FASHION_10K = (*FASHION_GRAY, "data.root=/work/data/fashion-mnist-10k")
CI_EPOCHS, CI_BATCH = 2.0, 128
WINDOW_60K = "sampler.window_size=12288 sampler.stride=1536"
# Every run: no logging service, no t-SNE plot, no progress bar (the precision is --precision).
FIXED = ["logger=none", "task.plot=false", "trainer.progress=false"]

FIVE = {"PIC": "model=pic", "SimCLR": "model=simclr", "MoCo v2": "model=mocov2",
        "MoCo v1": "model=moco", "InstDisc": "model=instdisc"}
# The small-image recipes (conf/experiment/small_*.yaml).
SMALL = {label: f"experiment=small_{spec.removeprefix('model=')}" for label, spec in FIVE.items()}
# small_pic at SimCLR's crops per image: two views, rows at 0.25·√2 so a row turns per visit as
# with one view at 0.25 (it gets two gradients).
PIC_2_VIEWS = "experiment=small_pic augmentation.num_views=2 model.classifier_init_norm=0.354"


@dataclass(frozen=True)
class Preset:
    """Methods (label -> overrides) and the budget they share (batch None: each recipe's own;
    the image budget is the epochs)."""

    methods: dict[str, str]
    common: tuple[str, ...] = ()
    epochs: float = 10.0
    batch_size: int | None = 256


PRESETS = {
    "default": Preset(FIVE),
    # Short digits runs whose seed band is to set each method's CI accuracy floor.
    # No loader workers: the digits are in memory, and CI's 2 cores are busy enough.
    "ci": Preset(FIVE, ("trainer.num_workers=0",), epochs=CI_EPOCHS, batch_size=CI_BATCH),
    # The paper's claims at small scale: the small-image recipes on the 60k Fashion-MNIST
    # images for 10 epochs, the budget of the `real` runs. small_pic's window scaled to N as it
    # is to 10k (W ~ N/5, S = W/8): one pass of the list takes W/S = 8 epochs, so at fewer
    # epochs the window would never reach most images (at 2 epochs, a quarter of them).
    "claims": Preset({
        "PIC, sliding window": f"experiment=small_pic {WINDOW_60K}",
        "PIC, epoch sampler": "experiment=small_pic sampler=epoch",
        "PIC, multi-crop 1×32+3×16": f"experiment=small_pic {WINDOW_60K} augmentation=multicrop "
                                     "augmentation.groups=[{size:32,count:1,scale:[0.14,1.0]},"
                                     "{size:16,count:3,scale:[0.08,0.14]}]",
        "SimCLR": "experiment=small_simclr",
        "MoCo v2": "experiment=small_mocov2",
        "InstDisc": "experiment=small_instdisc",
    }, FASHION_60K, epochs=10.0, batch_size=None),
    # The small-image recipes on the digits, for 60 epochs: at 10, PIC's 1,257 rows are visited
    # too few times to learn (bench/pic_rows.py; README, "On the digits"). The MoCo queues
    # scaled to N (a fifth of the 1,257 images, where 4,096 holds each three times; README,
    # "MoCo's queue on small datasets").
    "small": Preset(SMALL | {label: f"{SMALL[label]} model.queue_size=256"
                             for label in ("MoCo v2", "MoCo v1")}, epochs=60.0, batch_size=None),
    # Issue 14's real-data goal: each small-image recipe, 10 epochs of 10k 32-px images.
    "real": Preset({"PIC": SMALL["PIC"], "PIC, 2 views": PIC_2_VIEWS, **SMALL},
                   FASHION_10K, epochs=10.0, batch_size=None),
}


@dataclass(frozen=True)
class Run:
    label: str
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "launch.py"), *self.overrides, *FIXED,
                f"seed={self.seed}", f"hydra.run.dir={self.run_dir}"]


@functools.cache
def code_hash(root: Path = ROOT) -> str:
    """SHA-256 of the code a run executes: every source file under ``root``/src (Python and the
    native extension's C; not build outputs) and ``root``/launch.py, names and contents. Edits to
    the README, the tests or bench/ leave it unchanged."""
    sources = sorted(p for p in (root / "src").rglob("*") if p.suffix in (".py", ".c", ".h"))
    digest = hashlib.sha256()
    for path in [*sources, root / "launch.py"]:
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def recipe(run: Run) -> str:
    """The config ``launch.py`` composes for the run (unresolved, Hydra's own node left out),
    then a comment line with :func:`code_hash`: a finished run is reused only while its conf/
    files and its code still say the same."""
    from omegaconf import OmegaConf

    from pic.config import compose_config

    tree = OmegaConf.to_container(compose_config(run.command()[2:], return_hydra_config=True))
    tree.pop("hydra")
    return f"{OmegaConf.to_yaml(tree)}# code {code_hash()}\n"


def reusable(record: Path, command: list[str], config: str) -> dict | None:
    """The finished run recorded in ``record`` if it is this one: the same overrides in any
    order (Hydra applies them by key) and the same composed config (an edited experiment file
    changes the run, whatever the command says)."""
    if not record.is_file():
        return None
    done = json.loads(record.read_text())
    same = sorted(done["command"][1:]) == sorted(command[1:]) and done.get("config") == config
    return done if same else None


def claim(run_dir: Path, command: list[str], config: str) -> Path | None:
    """Make ``run_dir`` this run's: a folder left by an interrupted start of the same run is
    kept (launch.py resumes it); any other (another recipe, or from before the bench recorded
    its starts) is moved aside, since launch.py would resume its checkpoint as this run's.
    Returns where it went, or None."""
    started, aside = run_dir / "bench-started.json", None
    if run_dir.exists() and reusable(started, command, config) is None:
        aside = next(path for n in range(1, 10**6) if not (
            path := run_dir.with_name(f"{run_dir.name}.replaced-{n}")).exists())
        run_dir.rename(aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"command": command, "config": config}))
    return aside


class RunFailed(RuntimeError):
    """A launch.py run exited with an error; the message names it and its error line."""


def last_error(log: Path) -> str:
    """The last line of ``log`` that names an exception (``SomeError: ...``), or ''."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return next((line.strip() for line in reversed(lines)
                 if re.match(r"\s*[\w.]+(Error|Exception): ", line)), "")


def attempt(run: Run, config: str) -> dict | RunFailed:
    """:func:`execute`, with a failed run returned instead of raised: the other runs of the
    bench go on, and the table reports the failure."""
    try:
        return execute(run, config)
    except RunFailed as failure:
        return failure


def execute(run: Run, config: str | None = None) -> dict:
    """Run (or reuse) one launch.py run; returns its results.json plus the bench's wall time.
    ``config``: :func:`recipe` of the run (computed here if not given)."""
    record = run.run_dir / "bench.json"
    command = run.command()
    config = recipe(run) if config is None else config
    if (done := reusable(record, command, config)) is not None:
        return done
    if (aside := claim(run.run_dir, command, config)) is not None:
        print(f"{run.label} seed {run.seed}: another run's folder moved to {aside}",
              file=sys.stderr)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    with open(run.run_dir / "bench.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4: this run's own CPU time (its loader workers included), whatever else runs.
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        log_path = run.run_dir / "bench.log"
        raise RunFailed(f"{run.label} seed {run.seed} failed (exit {code}): "
                        f"{last_error(log_path)} (see {log_path})")
    results = json.loads((run.run_dir / "results.json").read_text())
    done = {"command": command, "config": config, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "results": results,
            "eval": read_eval(run.run_dir)}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1, default=float))
    tmp.replace(record)
    return done


def read_eval(run_dir: Path) -> dict[str, list[float]]:
    """The run's `eval.k` and `eval.temperature` (each a number or a list) from config.yaml."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()).get("eval", {})
    as_list = {key: cfg.get(key) for key in ("k", "temperature")}
    return {key: [] if v is None else list(v) if isinstance(v, list) else [v]
            for key, v in as_list.items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """Nested results -> {'a.b': number}; lists (histories) are left out."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}".lower()
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def metric(flat: dict[str, float], evals: dict[str, list[float]], kind: str,
           baseline: str) -> float | None:
    """One top-1 number from a run's flattened results, found by what its key says, so that
    the bench reads any spelling (`knn_top1`, `eval.trained.knn.k200_t0.07.top1`, ...).

    kind: 'knn20', 'knn200' or 'probe'; baseline: 'trained', 'random_init' or 'pixels'.
    `evals`: the run's eval.k and eval.temperature lists. kNN at k prefers the key naming k and
    the first temperature; a key that names no k (`knn_top1`) is the first k's. Among several
    matches the shortest key wins (the flat summary key over a nested one).
    """
    def wanted(key: str) -> bool:
        if "top1" not in key or "history" in key:
            return False
        if ("random" in key) != (baseline == "random_init"):
            return False
        return ("pixel" in key) == (baseline == "pixels")

    keys = [k for k in flat if wanted(k)]
    if kind == "probe":
        keys = [k for k in keys if ("probe" in k or "linear" in k) and "knn" not in k]
    else:
        k = int(kind.removeprefix("knn"))
        keys = [key for key in keys if "knn" in key]
        numbered = [key for key in keys
                    if re.search(rf"(?<![0-9.]){k}(?![0-9])", key.replace("top1", ""))]
        if numbered and evals.get("temperature"):
            t = f"t{float(evals['temperature'][0]):g}"
            numbered = [key for key in numbered if re.search(rf"{re.escape(t)}(?![0-9])", key)]
        bare = [key for key in keys if not re.search(r"[0-9]", key.replace("top1", ""))]
        first_k = bool(evals.get("k")) and int(evals["k"][0]) == k
        keys = (bare if first_k else []) or numbered
    return flat[min(keys, key=len)] if keys else None


COLUMNS = [("knn20", "kNN-20"), ("knn200", "kNN-200"), ("probe", "probe")]


def summarise(runs: list[dict]) -> dict[str, list[float]]:
    """Per column and baseline, the values over a method's seeds (None where not reported)."""
    out: dict[str, list[float]] = {}
    for kind, _ in COLUMNS:
        for baseline in ("trained", "random_init", "pixels"):
            values = [metric(flatten(r["results"]), r["eval"], kind, baseline) for r in runs]
            out[f"{kind}/{baseline}"] = [v for v in values if v is not None]
        trained = [metric(flatten(r["results"]), r["eval"], kind, "trained") for r in runs]
        init = [metric(flatten(r["results"]), r["eval"], kind, "random_init") for r in runs]
        out[f"{kind}/gain"] = [a - b for a, b in zip(trained, init, strict=True)
                               if a is not None and b is not None]
    out["wall_s"] = [r["wall_s"] for r in runs]
    out["cpu_s"] = [r["cpu_s"] for r in runs if "cpu_s" in r]
    return out


def mean_std(values: list[float], digits: int = 1) -> str:
    """'m ± s' (sample std over seeds), 'm' for one value, '—' for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(summaries: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: a row per method (trained, random init, gain), then the raw-pixels row;
    columns that no run reports are left out."""
    head = ([name for _, name in COLUMNS] + [f"{name} at init" for _, name in COLUMNS]
            + [f"gain {name}" for _, name in COLUMNS] + ["wall s / run", "CPU s / run"])
    rows = {label: [mean_std(s[f"{k}/{b}"]) for b in ("trained", "random_init", "gain")
                    for k, _ in COLUMNS] + [mean_std(s["wall_s"], 0), mean_std(s["cpu_s"], 0)]
            for label, s in summaries.items()}
    pixels = [mean_std(next(([v] for s in summaries.values() for v in s[f"{k}/pixels"]), []))
              for k, _ in COLUMNS]
    rows["raw pixels"] = pixels + ["—"] * (len(head) - len(pixels))
    keep = [i for i in range(len(head)) if any(r[i] != "—" for r in rows.values())]
    lines = ["| method | " + " | ".join(head[i] for i in keep) + " |",
             "|---" + "|---:" * len(keep) + "|"]
    lines += [f"| {label} | " + " | ".join(r[i] for i in keep) + " |" for label, r in rows.items()]
    return "\n".join(lines)


def common_overrides(preset: Preset, epochs: float | None = None, batch: int | None = None,
                     extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The overrides every run of a preset shares: its data, the image budget, then `extra`."""
    epochs = preset.epochs if epochs is None else epochs
    batch = preset.batch_size if batch is None else batch
    sized = [] if batch is None else [f"trainer.batch_size={batch}"]
    return [*preset.common, f"trainer.epochs={epochs:g}", *sized, *extra]


def plan(methods: dict[str, str], common: list[str], seeds: list[int], out: Path) -> list[Run]:
    """One Run per method and seed; the run folder is named after the method and seed."""
    runs = []
    for label, overrides in methods.items():
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        args = (*common, *shlex.split(overrides))
        runs += [Run(label, args, seed, out / slug / f"seed{seed}") for seed in seeds]
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--method", action="append", default=[], metavar="LABEL=OVERRIDES")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_ssl"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="trainer.precision of every run (auto: bf16 where native)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    methods = dict(m.split("=", 1) for m in args.method) if args.method else preset.methods
    epochs = preset.epochs if args.epochs is None else args.epochs
    batch = preset.batch_size if args.batch_size is None else args.batch_size
    common = common_overrides(preset, epochs, batch,
                              [f"trainer.precision={args.precision}", *args.overrides])
    runs = plan(methods, common, args.seeds, args.out.resolve())
    configs = [recipe(run) for run in runs]  # Hydra's compose is not thread-safe
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(attempt, runs, configs))
    by_method: dict[str, list[dict]] = {run.label: [] for run in runs}
    failures = [str(o) for o in outcomes if isinstance(o, RunFailed)]
    for run, result in zip(runs, outcomes, strict=True):
        if not isinstance(result, RunFailed):
            by_method[run.label].append(result)
            print(f"{run.label} seed {run.seed}: {result['wall_s']:.0f} s, {run.run_dir}",
                  file=sys.stderr)
    done = [r for results in by_method.values() for r in results]
    n = done[0]["results"].get("num_instances") if done else "?"
    precisions = sorted({r["results"].get("precision", "?") for r in done})
    text = (f"{len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), {epochs:g} epochs"
            f" of {n} images at batch {batch or 'of each recipe'}, {'/'.join(precisions)};"
            f" common overrides: "
            f"`{' '.join(common)}`; bench wall time {time.perf_counter() - started:.0f} s\n\n"
            + table({label: summarise(r) for label, r in by_method.items()}))
    if failures:  # their rows average the seeds that finished ('—' where none did)
        text += "\n\nFailed runs, left out of their rows:\n" + "\n".join(
            f"- {f}" for f in failures)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

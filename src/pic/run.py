"""From a composed config to a finished task, wherever it runs."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import dist
from .config import check_config
from .engine import signals
from .engine.checkpoint import atomic_write_text
from .engine.rundir import use_run_dir

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Any:
    """Dispatch ``cfg`` through its ``cluster`` launcher; the task runs in :func:`run_task`."""
    task = run_task
    if HydraConfig.initialized():
        # Hydra's record of the run (conf/config.yaml sets hydra.output_subdir to null, so
        # Hydra writes none itself): written by the task once it holds the run directory, so
        # that a second launch into a busy directory cannot overwrite the first one's.
        task = functools.partial(run_task, hydra_record=hydra_record(cfg))
        if cfg.output_dir is None:
            # The run directory travels inside the config: spawned processes and SLURM jobs
            # have no Hydra context of their own.
            cfg.output_dir = HydraConfig.get().runtime.output_dir
    # Resolve now (${hydra:...}, ${now:...}, cross-references) so that the config means the same
    # in every process and job it is sent to.
    OmegaConf.resolve(cfg)
    check_config(cfg)  # values in their declared ranges, before anything starts
    return instantiate(cfg.cluster).launch(cfg, task)


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes to ``<run dir>/.hydra/`` (file name -> YAML): the composed config as
    the task receives it, Hydra's own config, and the command line's overrides."""
    hydra_cfg = HydraConfig.instance().cfg
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def run_task(cfg: DictConfig, handle_signals: bool | None = None,
             hydra_record: dict[str, str] | None = None) -> Any:
    """Run the task in this process (one rank of the job when distributed).

    With ``handle_signals``, SIGTERM, SIGINT and SIGUSR2 stop the run cleanly
    (:mod:`pic.engine.signals`): the trainer checkpoints the step it finishes, the task returns
    its partial summary and the process exits with ``128 + signum``. The default (None) is on,
    except in a submitit SLURM job, where :class:`pic.launch.slurm.SlurmJob` handles them.
    ``hydra_record`` (:func:`hydra_record`) goes to ``.hydra/`` once the directory is ours.
    """
    if handle_signals is None:
        handle_signals = os.environ.get("SUBMITIT_EXECUTOR") != "slurm"
    out_dir = Path(cfg.output_dir or Path.cwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    with use_run_dir(out_dir):  # one run per directory: a second one stops here
        if dist.is_main():
            if hydra_record:
                (out_dir / ".hydra").mkdir(exist_ok=True)
                for name, text in hydra_record.items():
                    atomic_write_text(text, out_dir / ".hydra" / name)
            OmegaConf.save(cfg, out_dir / "config.yaml")
        with signals.stop_on_signals() if handle_signals else contextlib.nullcontext():
            result = instantiate(cfg.task).run(cfg, out_dir)
            # Under SLURM the job's launcher reads the signal itself (checkpoint, then requeue).
            code = signals.exit_code() if handle_signals else None
    if code is not None:
        log.warning("stopped by a signal; %s/current.pth holds the last step: rerun the same "
                    "command to resume (exit code %d)", out_dir, code)
        raise SystemExit(code)
    return result

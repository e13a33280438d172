"""The one entry point: compose the config, dispatch to where it runs, run the task.

    python launch.py                                  # PIC on the embedded digits, this CPU
    python launch.py model=simclr trainer.epochs=50   # another method, another length
    python launch.py -m model.temperature=0.1,0.2     # a sweep (one run per value)
    python launch.py cluster=slurm cluster.nodes=2    # the same run on a SLURM cluster
    python launch.py -m model.temperature=0.1,0.2 cluster=slurm   # a sweep: one SLURM job array
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pic.config import register_schemas
from pic.launch.slurm import submit_queued
from pic.run import run

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> object:
    return run(cfg)


if __name__ == "__main__":
    main()
    # A SLURM sweep's points were queued while Hydra composed them; they go out as one array
    # now. (Hydra exits before this when any point fails to compose: nothing is submitted.)
    submit_queued()

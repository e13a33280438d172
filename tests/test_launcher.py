"""Local launcher: N DDP processes train exactly like one process with the same global batch.

What makes the two runs comparable: the global batch of each step is the same set of images
(rank r takes the global order's positions r, r + world, ...), DDP averages the ranks'
gradients of their per-rank mean losses (= the global mean), and nothing couples the samples
of a batch except the loss: the backbone below has no BatchNorm and the augmentation is the
deterministic evaluation transform (random augmentations are seeded per rank-local position,
so they differ between world sizes by design of the data pipeline, not of the launcher).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pic.collect import collect
from pic.collect import main as collect_main
from pic.dist import all_reduce_sum, get_rank, get_world_size, is_dist
from pic.dist.init import init_distributed
from pic.launch.local import Local
from pic.launch.slurm import Slurm, SlurmJob

ROOT = Path(__file__).resolve().parents[1]


class BNFreeNet(nn.Module):
    """B×3×H×W → B×32 with no batch statistics (two strided convolutions, global pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def write_test_options(conf: Path) -> None:
    """A BN-free backbone and a deterministic augmentation, as options of a searchpath dir."""
    (conf / "backbone").mkdir(parents=True)
    (conf / "augmentation").mkdir()
    (conf / "backbone" / "bn_free.yaml").write_text("_target_: tests.test_launcher.BNFreeNet\n")
    (conf / "augmentation" / "deterministic.yaml").write_text(
        "_target_: pic.data.transforms.eval_transform\n"
        "size: ${data.image_size}\nmean: ${data.mean}\nstd: ${data.std}\n")


def train(run_dir: Path, conf: Path, launcher: list[str], *overrides: str) -> dict:
    """Run launch.py (through ``launcher``) and return its checkpoint."""
    cmd = [*launcher, "launch.py", f"hydra.run.dir={run_dir}",
           f"hydra.searchpath=[file://{conf}]", "backbone=bn_free",
           "augmentation=deterministic", "logger=none", "trainer.batch_size=64",
           "trainer.max_steps=4", "trainer.log_every=1", "trainer.num_workers=0", "eval.k=5",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return torch.load(run_dir / "current.pth", weights_only=False)


@pytest.mark.slow
def test_two_local_processes_train_like_one(tmp_path):
    conf = tmp_path / "conf"
    write_test_options(conf)
    python = [sys.executable]
    one = train(tmp_path / "one", conf, python, "cluster.nproc_per_node=1")
    two = train(tmp_path / "two", conf, python, "cluster.nproc_per_node=2")
    # torchrun starts the processes itself; each must run in place and join the group.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    by_torchrun = train(tmp_path / "torchrun", conf, torchrun)

    results = [json.loads((tmp_path / d / "results.json").read_text())
               for d in ("one", "two", "torchrun")]
    assert [r["world_size"] for r in results] == [1, 2, 2]
    # The defaults ran in every process layout: kNN at random init and the summary plot.
    for d, r in zip(("one", "two", "torchrun"), results, strict=True):
        assert "knn_top1_random_init" in r and (tmp_path / d / "summary.png").is_file(), d
    assert one["state"]["step"] == two["state"]["step"] == by_torchrun["state"]["step"] == 4
    for other in (two, by_torchrun):
        assert one["model"].keys() == other["model"].keys()
        for name, weight in one["model"].items():
            torch.testing.assert_close(other["model"][name], weight, rtol=0, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
        # The logged loss of each step: the mean over the global batch, in both runs.
        losses = torch.tensor([loss for _, loss in one["state"]["history"]], dtype=torch.float64)
        other_losses = torch.tensor([loss for _, loss in other["state"]["history"]],
                                    dtype=torch.float64)
        torch.testing.assert_close(other_losses, losses, rtol=0, atol=1e-5)
    # The steps changed the model: equal weights are not those of an untrained network.
    assert losses[-1] != losses[0]


def test_without_launcher_variables_a_single_process_runs(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    device = init_distributed()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not is_dist() and get_world_size() == 1


def test_world_size_without_rendezvous_names_the_missing_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT, LOCAL_RANK not set"):
        init_distributed()


def test_local_rejects_zero_processes():
    with pytest.raises(ValueError, match="cluster.nproc_per_node=0"):
        Local(nproc_per_node=0)


def test_slurm_sbatch_parameters():
    params = Slurm(nodes=2, nproc_per_node=4, partition="gpu", mem_gb=64, qos="high",
                   additional_parameters={"exclusive": True}).sbatch_parameters("pic")
    assert params == {"job_name": "pic", "nodes": 2, "ntasks_per_node": 4, "cpus_per_task": 8,
                      "time": 1440, "partition": "gpu", "qos": "high", "mem": "64GB",
                      "gpus_per_node": 4, "additional_parameters": {"exclusive": True}}
    # A CPU partition: no GPU request at all, unset options left to the cluster.
    cpu = Slurm(nproc_per_node=2, gpus_per_node=0).sbatch_parameters("x")
    assert "gpus_per_node" not in cpu and "partition" not in cpu and "mem" not in cpu


def test_slurm_rejects_empty_allocations():
    with pytest.raises(ValueError, match="cluster.nodes=0"):
        Slurm(nodes=0)


def make_run(root: Path, name: str, overrides: list[str], results: dict) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "results.json").write_text(json.dumps(results))


def test_collect_tabulates_differing_overrides_and_scalar_results(tmp_path):
    make_run(tmp_path, "1_b", ["+sweeps=x", "model.temperature=0.2", "seed=1"],
             {"knn_top1": 91.5, "steps": 10, "history": [1, 2]})
    make_run(tmp_path, "0_a", ["+sweeps=x", "model.temperature=0.1", "hydra.verbose=true"],
             {"knn_top1": 90.25, "steps": 10, "method": "a|b"})

    columns, rows = collect(tmp_path)
    # +sweeps is the same everywhere; seed is set in one run only, so it differs.
    assert columns == ["run", "model.temperature", "seed", "knn_top1", "method", "steps"]
    assert rows == [
        {"run": "0_a", "model.temperature": "0.1", "seed": "", "knn_top1": 90.25,
         "method": "a|b", "steps": 10},
        {"run": "1_b", "model.temperature": "0.2", "seed": "1", "knn_top1": 91.5, "method": "",
         "steps": 10},
    ]

    assert collect_main([str(tmp_path), "--metrics", "knn_top1"]) == 0
    assert (tmp_path / "results.md").read_text().splitlines() == [
        "| run | model.temperature | seed | knn_top1 |", "|---|---|---|---|",
        "| 0_a | 0.1 |  | 90.25 |", "| 1_b | 0.2 | 1 | 91.5 |"]
    with open(tmp_path / "results.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [
            {"run": "0_a", "model.temperature": "0.1", "seed": "", "knn_top1": "90.25"},
            {"run": "1_b", "model.temperature": "0.2", "seed": "1", "knn_top1": "91.5"}]


def test_collect_errors_name_the_directory_or_file(tmp_path, capsys):
    assert collect_main([str(tmp_path)]) == 2
    assert f"no results.json under {tmp_path}" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"r/results.json: not valid JSON"):
        collect(tmp_path)


def rank_report(cfg) -> dict:
    """Run by every spawned process: who it is, a collective that needs the group, and how its
    own DataLoaders would start their workers."""
    total = all_reduce_sum(torch.tensor([float(get_rank() + 1)]))
    return {"rank": get_rank(), "world": get_world_size(), "sum": total.item(), "key": cfg.key,
            "start_method": multiprocessing.get_start_method()}


def test_local_spawns_a_process_group_and_returns_rank_zeros_result():
    cfg = OmegaConf.create({"key": "${other}", "other": "resolved"})
    result = Local(nproc_per_node=2).launch(cfg, rank_report)
    # The platform's default (fork on Linux), not the "spawn" a spawned child inherits, which
    # made every loader start its workers as fresh interpreters (most of the first DDP step).
    assert result == {"rank": 0, "world": 2, "sum": 3.0, "key": "resolved",
                      "start_method": multiprocessing.get_all_start_methods()[0]}


@pytest.mark.parametrize(("restarts", "requeued"), [(0, True), (1, True), (2, False)])
def test_slurm_job_requeues_at_most_max_requeue_times(monkeypatch, restarts, requeued):
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    job = SlurmJob({"key": 1}, rank_report, max_requeue=2)
    delayed = job.checkpoint()
    if requeued:
        # The same callable again: the requeued job finds its progress in current.pth.
        assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    else:
        assert delayed is None

"""The baselines' cache: a hit is not scored again, any change to what the scores depend on
(data, settings, code, weights) scores again; and one pass over the images serves every
encoder of an evaluation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from hydra.utils import instantiate

from pic.engine import baseline_cache
from pic.engine.baseline_cache import baseline_key, cached_scores, code_digest
from pic.engine.features import extract_features, extract_many, pixels
from pic.networks.resnet import TinyResNet
from pic.run import run_task
from pic.tasks.common import eval_splits

from .helpers import TinyImages, compose_config

CONTEXT = {"data": {"root": "a"}, "eval": {"k": [20]}, "network": {"widths": [4, 8]}}


class Scorer:
    """``compute`` for cached_scores: records which networks it was asked for."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, networks: dict[str, torch.nn.Module]) -> dict[str, dict]:
        self.calls.append(sorted(networks))
        torch.rand(3)  # as a loader's seed does
        return {name: {"knn": {"top1": float(len(self.calls))}} for name in networks}


def networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"random_init": TinyResNet([4, 8]), "pixels": pixels()}


def test_a_hit_is_not_scored_again_and_each_changed_key_scores_again(tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("PIC_CACHE_DIR", str(tmp_path))
    score = Scorer()
    nets, state = networks(), torch.get_rng_state()
    first = cached_scores(nets, CONTEXT, score)
    assert score.calls == [["pixels", "random_init"]]  # one call: one pass for both
    assert cached_scores(nets, CONTEXT, score) == first and len(score.calls) == 1
    # A miss and a hit leave the generator alike: training after draws the same numbers.
    assert torch.equal(torch.get_rng_state(), state)
    assert len(list((tmp_path / "baselines").glob("*.json"))) == 2

    cached_scores(networks(), {**CONTEXT, "eval": {"k": [200]}}, score)  # other settings
    assert score.calls[-1] == ["pixels", "random_init"]
    cached_scores(networks(), {**CONTEXT, "network": {"widths": [8, 8]}}, score)
    assert score.calls[-1] == ["random_init"]  # the pixels do not depend on the network
    nets = networks()
    with torch.no_grad():
        next(nets["random_init"].parameters())[0, 0, 0, 0] += 1e-3  # other initial weights
    cached_scores(nets, CONTEXT, score)
    assert score.calls[-1] == ["random_init"] and len(score.calls) == 4
    assert cached_scores(networks(), CONTEXT, score) == first  # the first entries still hold


def test_an_edit_of_the_evaluation_code_scores_again(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "pic"
    shutil.copytree(baseline_cache.PACKAGE, copy, ignore=shutil.ignore_patterns("*.so"))
    monkeypatch.setattr(baseline_cache, "PACKAGE", copy)
    code_digest.cache_clear()
    try:
        before = baseline_key("pixels", pixels(), CONTEXT)
        probe = copy / "engine" / "probe.py"
        probe.write_text(probe.read_text() + "\n# an edit\n")
        code_digest.cache_clear()
        assert baseline_key("pixels", pixels(), CONTEXT) != before
    finally:
        code_digest.cache_clear()


def test_off_and_damaged_entries_score_again(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("PIC_CACHE_DIR", "off")
    score = Scorer()
    cached_scores(networks(), CONTEXT, score)
    cached_scores(networks(), CONTEXT, score)
    assert len(score.calls) == 2
    monkeypatch.setenv("PIC_CACHE_DIR", str(tmp_path))
    cached_scores(networks(), CONTEXT, score)
    for entry in (tmp_path / "baselines").glob("*.json"):
        entry.write_text('{"scores": ')  # cut short
    with caplog.at_level(logging.WARNING):
        again = cached_scores(networks(), CONTEXT, score)
    assert score.calls[-1] == ["pixels", "random_init"] and "unreadable" in caplog.text
    assert again["pixels"]["knn"]["top1"] == 4.0


class CountingImages(TinyImages):
    reads = 0

    def __getitem__(self, i: int) -> dict:
        CountingImages.reads += 1
        return super().__getitem__(i)


def test_one_pass_serves_every_encoder() -> None:
    data = CountingImages(10, size=8)
    nets = networks()
    feats, labels = extract_many(nets, data, 4, torch.device("cpu"))
    assert CountingImages.reads == 10
    for name, net in nets.items():
        # The same batches, so the same arithmetic: bit-identical.
        alone, alone_labels = extract_features(net, data, 4, torch.device("cpu"))
        assert torch.equal(feats[name], alone)
        assert torch.equal(labels, alone_labels)


SMALL = ["data=synthetic", "data.num_images=64", "data.num_val_images=32", "data.resolution=16",
         "data.image_size=16", "data.num_classes=4", "backbone.widths=[8,16]",
         "trainer.batch_size=32", "trainer.max_steps=1", "trainer.num_workers=0",
         "trainer.progress=false", "logger=none", "task.plot=false"]


def test_a_second_run_reads_both_baselines_a_new_seed_scores_random_init(
        tmp_path: Path, monkeypatch, caplog) -> None:
    """The default task's baselines (random init and pixels, kNN and probe) in a fresh cache."""
    monkeypatch.setenv("PIC_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="pic"):
        runs = [run_task(compose_config(*SMALL, f"seed={seed}", f"output_dir={tmp_path / str(i)}"))
                for i, seed in enumerate((0, 0, 1))]
    hits = [r.getMessage() for r in caplog.records if "from the cache" in r.getMessage()]
    assert [h.split(":")[0] for h in hits] == ["baseline random_init", "baseline pixels",
                                               "baseline pixels"]
    for key in ("knn_top1", "probe_top1", "knn_top5"):
        assert runs[1][f"{key}_pixels"] == runs[0][f"{key}_pixels"] == runs[2][f"{key}_pixels"]
        assert runs[1][f"{key}_random_init"] == runs[0][f"{key}_random_init"]
    assert runs[0]["eval"]["random_init"] == runs[1]["eval"]["random_init"]
    # What the cache holds is what this evaluation computes now.
    cfg = compose_config(*SMALL)
    bank, val = eval_splits(instantiate(cfg.data))
    scores = instantiate(cfg.eval).score(*extract_features(pixels(), bank, 16, torch.device("cpu")),
                                         *extract_features(pixels(), val, 16, torch.device("cpu")),
                                         4)
    assert runs[1]["eval"]["pixels"]["knn"] == scores  # pixels and kNN: exact whatever batch

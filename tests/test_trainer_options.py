"""The trainer's speed options reach the model, keep resume exact, and the step benchmark runs.

A tiny convolutional PIC (one 3×3 conv + BN) trained by the real Trainer on random 8 px images.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import pic.engine.checkpoint as checkpoint_module
from pic.data.samplers import EpochSampler
from pic.engine.checkpoint import load_checkpoint
from pic.engine.optim import sgd
from pic.engine.precision import Hardware, choose_precision
from pic.engine.schedules import Cosine
from pic.engine.trainer import Trainer, progress_line, resolve_device
from pic.logging.loggers import NoLogger
from pic.models.instdisc import InstDisc
from pic.models.pic import PIC
from pic.run import run_task

from .helpers import ROOT, TinyImages, compose_config

N = 32


class ConvBackbone(nn.Module):
    """B×3×H×W → B×8; records the dtype and layout of every batch it receives."""

    out_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.seen: list[tuple[torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.seen.append((y.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return torch.relu(self.bn(y)).mean(dim=(2, 3))


class RecordingLogger(NoLogger):
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def tiny_pic() -> PIC:
    torch.manual_seed(0)
    return PIC(ConvBackbone(), N, feature_dim=8, mlp_head=False, classifier_init_norm=1.0)


def fit(model: nn.Module, out_dir: Path, max_steps: int, logger=None, data=None,
        **trainer_kw) -> dict:
    kw = dict(epochs=10, batch_size=8, max_steps=max_steps, num_workers=0, device="cpu",
              progress=False) | trainer_kw
    trainer = Trainer(**kw)
    return trainer.fit(model, data or TinyImages(N, size=8), EpochSampler(N, seed=0),
                       sgd(model, 8, lr=0.5), Cosine(), out_dir, logger or NoLogger(), seed=0)


# ---------------------------------------------------------------------- options reach the model
@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_weights_and_every_batch(tmp_path: Path,
                                                      channels_last: bool) -> None:
    model = tiny_pic()
    fit(model, tmp_path, 3, channels_last=channels_last)
    weight = model.backbone.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert [layout for _, layout in model.backbone.seen] == [channels_last] * 3


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32),
                                                  ("bf16", torch.bfloat16),
                                                  ("fp16", torch.float16)])
def test_precision_sets_the_autocast_dtype_and_fp16_scales_the_loss(
        tmp_path: Path, precision: str, dtype: torch.dtype) -> None:
    model = tiny_pic()
    trainer = Trainer(precision=precision, device="cpu")
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    summary = fit(model, tmp_path, 3, precision=precision)
    assert [d for d, _ in model.backbone.seen] == [dtype] * 3
    assert summary["steps"] == 3
    scaler = load_checkpoint(tmp_path / "current.pth")["scaler"]
    assert (scaler != {}) == (precision == "fp16")  # the loss scale is checkpointed with fp16


def test_an_unknown_precision_is_one_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"trainer.precision='fp8'.*bf16"):
        Trainer(precision="fp8")


def test_compile_compiles_the_backbone_in_place_and_keeps_checkpoint_keys() -> None:
    model = tiny_pic()
    keys = list(model.state_dict())
    Trainer(compile=False, device="cpu").prepare(model)
    assert model.backbone._compiled_call_impl is None
    Trainer(compile=True, device="cpu").prepare(model)
    assert model.backbone._compiled_call_impl is not None
    assert model.encoder._compiled_call_impl is None  # only the backbone
    assert list(model.state_dict()) == keys


def test_cudnn_benchmark_is_set_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Trainer(cudnn_benchmark=True, device="cpu").prepare(tiny_pic())
    assert torch.backends.cudnn.benchmark is False
    trainer = Trainer(cudnn_benchmark=True, device="cpu")
    trainer.device = torch.device("cuda", 0)  # prepare() only reads the device type
    trainer.prepare(tiny_pic())
    assert torch.backends.cudnn.benchmark is True
    trainer.cudnn_benchmark = False
    trainer.prepare(tiny_pic())
    assert torch.backends.cudnn.benchmark is False


def test_config_defaults_turn_the_cpu_and_gpu_options_on() -> None:
    cfg = compose_config()
    assert cfg.trainer.precision == "auto"
    trainer = instantiate(cfg.trainer)
    auto, _ = choose_precision("auto", Hardware.probe(trainer.device))
    assert (trainer.precision, trainer.channels_last, trainer.compile,
            trainer.cudnn_benchmark) == (auto, True, False, True)
    cfg = compose_config("trainer.precision=fp16", "trainer.compile=true",
                         "trainer.channels_last=false", "trainer.cudnn_benchmark=false")
    trainer = instantiate(cfg.trainer)
    assert (trainer.precision, trainer.channels_last, trainer.compile,
            trainer.cudnn_benchmark) == ("fp16", False, True, False)


# ---------------------------------------------------------------------- precision=auto
ZEN4 = Hardware("cpu", "CPU", cpu_capability="AVX512", mkldnn_bf16=True, bf16_units=True)
ZEN2 = Hardware("cpu", "CPU", cpu_capability="AVX2", mkldnn_bf16=False, bf16_units=False)
# AVX-512 without BF16 units (Skylake-SP): oneDNN accepts bf16 but emulates it.
SKYLAKE = Hardware("cpu", "CPU", cpu_capability="AVX512", mkldnn_bf16=True, bf16_units=False)
# This session's CPU forced down to AVX2 kernels: the units exist but nothing uses them.
FORCED_AVX2 = Hardware("cpu", "CPU", cpu_capability="AVX2", mkldnn_bf16=False, bf16_units=True)
A100 = Hardware("cuda", "NVIDIA A100", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100", cuda_bf16=False)


@pytest.mark.parametrize(("hardware", "expected"), [
    (ZEN4, "bf16"), (ZEN2, "fp32"), (SKYLAKE, "fp32"), (FORCED_AVX2, "fp32"),
    (A100, "bf16"), (V100, "fp16"), (Hardware("mps", "Apple"), "fp32")])
def test_auto_chooses_bf16_only_where_native_and_says_why(hardware: Hardware,
                                                          expected: str) -> None:
    precision, reason = choose_precision("auto", hardware)
    assert precision == expected
    assert reason.startswith("auto: ") and hardware.describe_bf16() in reason


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hardware", [ZEN4, ZEN2, V100])
def test_an_explicit_precision_is_kept_on_any_hardware(requested: str,
                                                       hardware: Hardware) -> None:
    assert choose_precision(requested, hardware)[0] == requested


def test_forcing_the_cpu_dispatch_down_to_avx2_makes_auto_choose_fp32() -> None:
    """The emulation of an AVX2-only CPU (issue 12) must be seen by the probe."""
    code = ("import torch; from pic.engine.precision import Hardware, choose_precision; "
            "print(choose_precision('auto', Hardware.probe(torch.device('cpu')))[0])")
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "fp32"


def test_explicit_bf16_without_native_support_warns_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls, device: ZEN2))
    with caplog.at_level(logging.INFO, logger="pic.engine.trainer"):
        summary = fit(tiny_pic(), tmp_path, 3, precision="bf16")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "~10x slower" in warnings[0].getMessage()
    assert summary["precision"] == "bf16"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pic.engine.trainer"):
        fit(tiny_pic(), tmp_path / "auto", 3, precision="auto")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("precision fp32: auto: no native bf16" in r.getMessage() for r in caplog.records)


def test_the_default_run_states_its_precision_in_results_json(tmp_path: Path) -> None:
    cfg = compose_config("logger=none", "backbone.widths=[8,16]", "trainer.batch_size=128",
                         "trainer.progress=false", "task.plot=false", "task.knn_random_init=false",
                         "trainer.max_steps=1", f"output_dir={tmp_path}")
    run_task(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    expected = choose_precision("auto", Hardware.probe(resolve_device("auto")))
    assert (results["precision"], results["precision_reason"]) == expected


# ---------------------------------------------------------------------- behaviour kept
def test_resume_is_exact_with_bf16_and_channels_last(tmp_path: Path) -> None:
    kw = dict(precision="bf16", channels_last=True)
    straight = tiny_pic()
    fit(straight, tmp_path / "straight", 7, **kw)
    fit(tiny_pic(), tmp_path / "resumed", 3, **kw)
    resumed = tiny_pic()
    summary = fit(resumed, tmp_path / "resumed", 7, **kw)
    assert summary["steps"] == 7 and summary["steps_this_attempt"] == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.classifier.weight, tiny_pic().classifier.weight)


class NoisyImages(TinyImages):
    """TinyImages with noise drawn from the global generator: an augmentation's draws."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        return item | {"crops": [item["crops"][0] + torch.rand(3, 8, 8)]}


def test_a_run_is_identical_for_any_number_of_loader_workers(tmp_path: Path) -> None:
    # InstDisc draws its negatives from the global generator of the main process; making the
    # items there (0 workers) must leave that generator as worker processes do.
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = InstDisc(ConvBackbone(), N, feature_dim=8, num_negatives=4)
        Trainer(epochs=10, batch_size=8, max_steps=6, num_workers=workers, device="cpu",
                progress=False).fit(model, NoisyImages(N, size=8), EpochSampler(N, seed=0),
                                    sgd(model, 8, lr=0.5), Cosine(), tmp_path / str(workers),
                                    NoLogger(), seed=0)
        states.append(load_checkpoint(tmp_path / str(workers) / "current.pth"))
    for key, value in states[0]["model"].items():
        assert torch.equal(states[1]["model"][key], value), key
    assert torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"])


# Step 0 is saved before training starts, so that a job preempted early keeps its W&B run id.
@pytest.mark.parametrize(("max_steps", "every", "saved_at"), [(10, 5, [0, 5, 10]),
                                                               (10, 4, [0, 4, 8, 10]),
                                                               (10, 100, [0, 10])])
def test_each_checkpoint_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         max_steps: int, every: int, saved_at: list[int]) -> None:
    saves: list[int] = []
    save = checkpoint_module.atomic_save
    monkeypatch.setattr(checkpoint_module, "atomic_save",
                        lambda obj, path: (saves.append(obj["state"]["step"]), save(obj, path)))
    fit(tiny_pic(), tmp_path, max_steps, checkpoint_every=every)
    assert saves == saved_at
    saves.clear()
    fit(tiny_pic(), tmp_path, max_steps, checkpoint_every=every)  # finished: nothing to redo
    assert saves == []


def test_logged_metrics_are_window_means(tmp_path: Path) -> None:
    model, losses = tiny_pic(), []
    forward = model.forward

    def recording_forward(crops, index):
        loss, metrics = forward(crops, index)
        losses.append(float(loss.detach()))
        return loss, metrics

    model.forward = recording_forward  # type: ignore[method-assign]
    logger = RecordingLogger()
    fit(model, tmp_path, 7, logger=logger, log_every=3)
    # Log points: every 3 steps, the end of the epoch (4 steps of 8) and the last step (7);
    # each averages the losses of its window.
    assert [step for step, _ in logger.logged] == [3, 4, 6, 7]
    windows = [(0, 3), (3, 4), (4, 6), (6, 7)]
    for (step, out), (lo, hi) in zip(logger.logged, windows, strict=True):
        expected = math.fsum(losses[lo:hi]) / (hi - lo)
        # The trainer sums the n float32 losses in order and divides: each of the n - 1
        # additions and the division rounds once, by at most u = 2^-24 (losses are positive).
        assert out["loss"] == pytest.approx(expected, rel=(hi - lo) * 2**-24 * 1.01), step
        assert out["grad_norm"] > 0 and math.isfinite(out["grad_norm"])


def test_every_log_point_writes_one_plain_progress_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = RecordingLogger()
    with caplog.at_level(logging.INFO, logger="pic.engine.trainer"):
        fit(tiny_pic(), tmp_path, 7, logger=logger, log_every=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == len(logger.logged) == 4
    pattern = (r"step (\d+)/7  epoch (\d+\.\d\d)  loss (\d+\.\d{4})  lr \S+  "
               r"(\d+\.\d) img/s  ETA (\d+:\d\d:\d\d)")
    for line, (step, out) in zip(lines, logger.logged, strict=True):
        match = re.fullmatch(pattern, line)
        assert match, line
        # Printed with 2 and 4 decimals: off by at most half of the last printed digit.
        assert int(match[1]) == step and float(match[2]) == pytest.approx(step / 4, abs=0.005)
        assert float(match[3]) == pytest.approx(out["loss"], abs=5e-5)
    assert lines[-1].endswith("ETA 0:00:00")  # nothing left after the last step


def test_progress_line_eta_is_the_remaining_steps_at_the_window_speed() -> None:
    out = {"epoch": 1.0, "loss": 2.0, "lr": 0.1, "images_per_s": 64.0}
    # 100 steps of 32 images at 64 images/s: 50 s.
    assert progress_line(out, 900, 1000, 32).endswith("64.0 img/s  ETA 0:00:50")
    assert progress_line(out | {"images_per_s": 0.0}, 1, 2, 32).endswith("ETA ?")


@pytest.mark.parametrize("tty", [True, False])
def test_the_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    bar = Trainer(device="cpu", progress=True)._progress_bar(0, 5)
    assert (bar is not None) == tty
    if bar is not None:
        bar.close()
    assert Trainer(device="cpu", progress=False)._progress_bar(0, 5) is None


def test_a_stop_request_ends_the_run_after_the_step_in_progress(tmp_path: Path) -> None:
    model = tiny_pic()
    trainer = Trainer(epochs=10, batch_size=8, max_steps=20, num_workers=0, device="cpu",
                      progress=False, log_every=100, checkpoint_every=100)
    forward = model.forward

    def requesting_forward(crops, index):  # a request arriving during the 4th step
        trainer.stop_requested = trainer.stop_requested or len(model.backbone.seen) == 3
        return forward(crops, index)

    model.forward = requesting_forward  # type: ignore[method-assign]
    summary = trainer.fit(model, TinyImages(N, size=8), EpochSampler(N, seed=0),
                          sgd(model, 8, lr=0.5), Cosine(), tmp_path, NoLogger(), seed=0)
    assert (summary["steps"], summary["completed"], summary["stopped_by"]) == (
        4, False, "stop request")
    assert load_checkpoint(tmp_path / "current.pth")["state"]["step"] == 4


# ---------------------------------------------------------------------- compile, benchmark
class Float64Images(TinyImages):
    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        return item | {"crops": [item["crops"][0].double()]}


@pytest.mark.slow
def test_a_compiled_backbone_trains_like_the_eager_one(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A private kernel cache: torch reuses kernels compiled under another ATEN_CPU_CAPABILITY
    # from its shared cache, and they compute garbage (NaN here, with avx2 after an AVX-512 run).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager, compiled, reference = tiny_pic(), tiny_pic(), tiny_pic().double()
    fit(eager, tmp_path / "eager", 3)
    fit(compiled, tmp_path / "compiled", 3, compile=True)
    fit(reference, tmp_path / "float64", 3, data=Float64Images(N, size=8))
    for (name, a), b, r in zip(eager.state_dict().items(), compiled.state_dict().values(),
                               reference.state_dict().values(), strict=True):
        if not r.is_floating_point():
            continue
        # Compiled float32 reorders the reductions: its error against float64 is of the order
        # of eager float32's, plus up to n·u·|value| for a reordered sum of n terms (u = 2^-24;
        # n = 512, the longest: BatchNorm over 8 images × 8×8 px).
        bound = 2 * (a.double() - r).abs().max() + 512 * 2**-24 * r.abs().max()
        assert (b.double() - r).abs().max() <= bound, name


def load_bench():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--quick"], ["--quick", "--options"]])
def test_the_step_benchmark_runs(args: list[str], capsys: pytest.CaptureFixture) -> None:
    load_bench().main(args)
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 3, table  # header + one row per method or option


def test_the_ddp_wrap_uses_no_deprecated_argument(tmp_path: Path) -> None:
    """torch 2.14 deprecates DDP's broadcast_buffers (a FutureWarning at every run's start)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            net = Trainer(device="cpu", num_workers=0)._wrap(nn.Linear(2, 2))
        assert isinstance(net, nn.parallel.DistributedDataParallel)
    finally:
        torch.distributed.destroy_process_group()

"""Stable long runs: a non-finite loss or gradient never reaches the weights.

Non-finite values are injected on chosen steps into a tiny method run by the real Trainer.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pic.data.samplers import EpochSampler
from pic.engine.checkpoint import load_checkpoint
from pic.engine.health import DivergenceError
from pic.engine.optim import sgd
from pic.engine.schedules import Cosine
from pic.engine.trainer import NonFiniteError, Trainer
from pic.logging.loggers import NoLogger
from pic.losses import instance_classification_loss
from pic.models.base import Method
from pic.models.instdisc import InstDisc
from pic.models.pic import PIC

from .helpers import TinyImages


class TinyBackbone(nn.Sequential):
    out_dim = 8

    def __init__(self) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 8))


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss, a bad gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full_like(grad, math.inf)


class Flaky(Method):
    """Regresses features to 1; a NaN loss on ``nan_loss`` calls, an infinite gradient on
    ``inf_grad`` calls. Records the parameters seen by every call."""

    def __init__(self, nan_loss: set[int], inf_grad: set[int]) -> None:
        super().__init__(TinyBackbone(), feature_dim=4, mlp_head=False)
        self.nan_loss, self.inf_grad = nan_loss, inf_grad
        self.calls = 0
        self.seen: list[list[torch.Tensor]] = []

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.seen.append([p.detach().clone() for p in self.parameters()])
        out = self.encoder(crops)[0]
        if self.calls in self.inf_grad:
            out = _InfGrad.apply(out)
        loss = ((out - 1) ** 2).mean()
        if self.calls in self.nan_loss:
            loss = loss * math.nan
        self.calls += 1
        return loss, {"loss": loss.detach()}


def fit(model: nn.Module, out_dir: Path, max_steps: int, **trainer_kw) -> dict:
    torch.manual_seed(0)
    trainer = Trainer(epochs=10, batch_size=8, max_steps=max_steps, num_workers=0,
                      device="cpu", progress=False, **trainer_kw)
    return trainer.fit(model, TinyImages(32), EpochSampler(32, seed=0), sgd(model, 8, lr=0.5),
                       Cosine(), out_dir, NoLogger(), seed=0)


def test_bad_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    model = Flaky(nan_loss={3, 8}, inf_grad={7})
    summary = fit(model, tmp_path, 12)
    assert summary["bad_steps"] == 3 and summary["steps"] == 12
    for step in range(11):  # parameters seen by call step+1 vs call step
        same = all(torch.equal(a, b) for a, b in
                   zip(model.seen[step], model.seen[step + 1], strict=True))
        assert same == (step in {3, 7, 8}), step
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_a_run_of_bad_steps_stops_and_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = Flaky(nan_loss=set(range(7, 100)), inf_grad=set())
    # Steps 7, 8, 9 are tolerated (max 3), step 10 stops; the checkpoint due at step 10 falls
    # in the bad streak and is not written: current.pth stays at step 5, the last good one.
    with pytest.raises(NonFiniteError, match=r"4 consecutive steps up to step 10 .*Likely "
                                             r"causes.*current\.pth is intact"):
        fit(model, tmp_path, 30, max_bad_steps=3, checkpoint_every=5)
    ckpt = load_checkpoint(tmp_path / "current.pth")
    assert ckpt["state"]["step"] == 5 and ckpt["state"]["bad_steps"] == 0
    fresh = Flaky(set(), set())
    fresh.load_state_dict(ckpt["model"])
    good = model.seen[5]  # the parameters after step 5
    for p, q in zip(fresh.parameters(), good, strict=True):
        assert torch.equal(p, q) and torch.isfinite(p).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".current")] == []


class BNFlaky(Method):
    """A BatchNorm backbone (running statistics change in every forward); the loss is NaN
    on ``nan_loss`` calls. Records the whole state (parameters and buffers) each call sees."""

    def __init__(self, nan_loss: set[int]) -> None:
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.ReLU())
        backbone.out_dim = 8
        super().__init__(backbone, feature_dim=4, mlp_head=False)
        self.nan_loss, self.calls = nan_loss, 0
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, crops, index):
        self.seen.append({k: v.clone() for k, v in self.state_dict().items()})
        loss = ((self.encoder(crops)[0] - 1) ** 2).mean()
        if self.calls in self.nan_loss:
            loss = loss * math.nan
        self.calls += 1
        return loss, {"loss": loss.detach()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("precision", "hint"), [("fp32", "size, or corrupt"),
                                               ("bf16", "bf16 rounding (try trainer."
                                                        "precision=fp32)")])
def test_the_hint_names_the_precision_in_use(tmp_path: Path, precision: str, hint: str) -> None:
    """A bf16 or fp32 run is never told to try bf16 against fp16 overflow."""
    with pytest.raises(NonFiniteError) as stopped:
        fit(Flaky(nan_loss=set(range(9)), inf_grad=set()), tmp_path, 8, max_bad_steps=1,
            precision=precision)
    assert hint in str(stopped.value) and "fp16" not in str(stopped.value)


def test_a_skipped_step_leaves_every_tensor_untouched(tmp_path: Path) -> None:
    model = BNFlaky(nan_loss={3, 4, 8})
    assert len(model.forward_state()) == 3  # running mean, variance and count
    fit(model, tmp_path, 10)
    for step in range(9):  # the state seen by call step+1 vs call step
        assert _same(model.seen[step], model.seen[step + 1]) == (step in {3, 4, 8}), step


def test_the_checkpoint_after_a_bad_streak_is_the_last_good_state(tmp_path: Path) -> None:
    model = BNFlaky(nan_loss=set(range(7, 100)))
    with pytest.raises(NonFiniteError):
        fit(model, tmp_path, 30, max_bad_steps=3, checkpoint_every=5)
    saved = load_checkpoint(tmp_path / "current.pth")["model"]
    assert _same(saved, model.seen[5])  # after step 5, BN statistics included
    assert _same(model.state_dict(), model.seen[7])  # skipped steps 7..10 changed nothing


class BadAfterStep(Flaky):
    """Finite losses, but ``after_step`` corrupts a tensor: ``what`` = a bank row (checked
    at save) or a BN statistic (checked at every log point)."""

    def __init__(self, at: int, what: str) -> None:
        super().__init__(set(), set())
        self.register_buffer("bank", torch.zeros(4, 2))
        self.norm = nn.BatchNorm1d(2)
        self.at, self.what, self.steps = at, what, 0

    def after_step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            target = self.bank if self.what == "bank" else self.norm.running_var
            target[0] = math.inf


def test_a_non_finite_state_is_never_checkpointed(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"step 5: not checkpointing, tensor bank holds NaN "
                                              r"or inf; .*current.pth \(step 0\) is intact"):
        fit(BadAfterStep(at=3, what="bank"), tmp_path, 30, checkpoint_every=5, log_every=50)
    ckpt = load_checkpoint(tmp_path / "current.pth")
    assert ckpt["state"]["step"] == 0


def test_non_finite_forward_state_stops_at_the_next_log_point(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"training diverged at step 8: norm.running_var "
                                              r"holds NaN or inf"):
        fit(BadAfterStep(at=6, what="norm"), tmp_path, 30, checkpoint_every=100, log_every=4)


class Scripted(Flaky):
    """Reports a scripted loss (a curve that learns, then falls back to chance)."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__(set(), set())
        self.curve = curve

    def forward(self, crops, index):
        loss, _ = super().forward(crops, index)
        value = torch.tensor(self.curve[min(self.calls - 1, len(self.curve) - 1)])
        return loss * 0 + value, {"loss": value}


def test_a_loss_back_at_chance_stops_naming_the_step(tmp_path: Path) -> None:
    curve = [7.0] * 2 + [5.0] * 2 + [3.0] * 2 + [7.0] * 20  # log windows of 2 steps
    with pytest.raises(DivergenceError, match=r"training diverged at step 12: the loss fell "
                                              r"from 7 .* to 3, then came back to 7"):
        fit(Scripted(curve), tmp_path, 30, log_every=2)


class ScriptedWithHint(Scripted):
    def divergence_hint(self) -> str:
        return "this method's own cause, "


def test_a_divergence_names_the_methods_own_cause_first(tmp_path: Path) -> None:
    curve = [7.0] * 2 + [5.0] * 2 + [3.0] * 2 + [7.0] * 20
    with pytest.raises(DivergenceError, match=r"Likely causes: this method's own cause, a "
                                              r"learning rate too high"):
        fit(ScriptedWithHint(curve), tmp_path, 30, log_every=2)


class FlakyWithHint(Flaky):
    divergence_hint = ScriptedWithHint.divergence_hint


class BadAfterStepWithHint(BadAfterStep):
    divergence_hint = ScriptedWithHint.divergence_hint


def test_skipped_steps_and_a_refused_checkpoint_name_the_methods_own_cause(tmp_path: Path
                                                                           ) -> None:
    """The other two errors of a run gone non-finite list the same causes as the divergence."""
    causes = r"Likely causes: this method's own cause, a learning rate too high"
    with pytest.raises(NonFiniteError, match=rf"{causes} for this batch size, or corrupt input"):
        fit(FlakyWithHint(nan_loss=set(range(3, 100)), inf_grad=set()), tmp_path / "a", 30,
            max_bad_steps=3)
    with pytest.raises(DivergenceError, match=rf"\(step 0\) is intact\. {causes}"):
        fit(BadAfterStepWithHint(at=3, what="bank"), tmp_path / "b", 30, checkpoint_every=5,
            log_every=50)


def test_instdisc_names_nce_z_as_a_cause_of_divergence() -> None:
    """NCE's Z is estimated once: the DivergenceError names it and its value (softmax: none)."""
    torch.manual_seed(0)
    crops, index = [torch.randn(4, 3, 8, 8)], torch.arange(4)
    nce = InstDisc(TinyBackbone(), num_instances=16, feature_dim=8, num_negatives=5, loss="nce")
    nce(crops, index)
    z = re.escape(f"{float(nce.z):.3g}")
    assert re.fullmatch(rf"NCE's normaliser Z \({z}\), estimated once at the first step "
                        r".*model.loss=softmax.*, ", nce.divergence_hint())
    softmax = InstDisc(TinyBackbone(), num_instances=16, feature_dim=8, loss="softmax")
    assert softmax.divergence_hint() == ""


def test_sampled_pic_classifier_ignores_skipped_steps(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = PIC(TinyBackbone(), 32, feature_dim=16, mlp_head=False, classifier_init_norm=1.0,
                num_negatives=6, negative_sampling="uniform")
    forward, calls = PIC.forward, []

    def flaky_forward(self, crops, index):
        loss, metrics = forward(self, crops, index)
        calls.append(len(calls))
        return (loss * math.nan if len(calls) in (3, 4) else loss), metrics

    monkeypatch.setattr(PIC, "forward", flaky_forward)
    summary = fit(model, tmp_path, 10)
    clf = model.classifier
    assert summary["bad_steps"] == 2 and clf.t == 8  # the classifier counts applied updates
    assert torch.isfinite(clf.weight).all() and torch.isfinite(clf.momentum_buffer).all()
    maps = clf.correction  # the composed correction maps a skipped step must not have moved
    assert all(torch.isfinite(x).all() for x in (maps.q, maps.P, maps.M))


def reference_loss(f: torch.Tensor, w: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Mean cross-entropy of cosine logits, float64 Python loops."""
    total = 0.0
    for b in range(f.shape[0]):
        fb = [float(v) for v in f[b]]
        logits = []
        for j in range(w.shape[0]):
            wj = [float(v) for v in w[j]]
            dot = sum(x * z for x, z in zip(fb, wj, strict=True))
            norm = math.sqrt(sum(x * x for x in fb)) * math.sqrt(sum(z * z for z in wj))
            logits.append(dot / norm / tau)
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[int(y[b])]
    return total / f.shape[0]


def fp32_loss_tolerance(dim: int, tau: float, reference: float) -> float:
    """How far a float32 cosine-softmax cross-entropy may be from its float64 value, from the
    inputs the float64 reference also used. Each logit is cos/τ: the dot product and the two
    norms of D-vectors round at most (D + 4) times (unit roundoff u = 2^-24 each, on |cos| <= 1),
    so a logit is off by at most (D + 4)·u/τ; the loss, logsumexp minus one logit, by twice
    that, plus a few roundings of the loss itself (exp, log, the mean)."""
    u = 2.0**-24
    return 2 * (dim + 4) * u / tau + 8 * u * abs(reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_and_loss_are_fp32_under_autocast(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 8, generator=g).to(dtype)
    w = torch.randn(6, 8, generator=g)
    y = torch.tensor([0, 5, 2, 2])
    tau = 0.01  # logits up to 100: exp overflows fp16 and loses all precision in bf16
    with torch.autocast("cpu", dtype=dtype):
        loss = instance_classification_loss(f, w, y, tau)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    reference = reference_loss(f, w, y, tau)
    assert loss.item() == pytest.approx(reference, abs=fp32_loss_tolerance(8, tau, reference))


def test_pic_loss_is_fp32_in_a_bf16_model() -> None:
    torch.manual_seed(0)
    model = PIC(TinyBackbone(), 32, feature_dim=16, mlp_head=True, temperature=0.01)
    crops = [torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4), torch.randn(8, 3, 2, 2)]
    index = torch.arange(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(crops, index)
        features = model.encoder(crops)
    assert features[0].dtype == torch.bfloat16  # the encoder does run in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    w = model.classifier.weight.detach()
    large = torch.cat(features[:2]).detach()
    expected = (2 * reference_loss(large, w, index.repeat(2), 0.01)
                + reference_loss(features[2].detach(), w, index, 0.01)) / 3
    assert loss.item() == pytest.approx(expected, abs=fp32_loss_tolerance(16, 0.01, expected))


def test_sampled_classifier_rows_take_the_unscaled_fp16_gradient(tmp_path: Path) -> None:
    """Under fp16 (autocast + loss scaling, as precision=auto picks on V100/T4) the sampled
    classifier's rows move exactly as with the loss unscaled: the scale (a power of two; 2^8,
    as 2^16 overflows this tiny network's fp16 backward) divides their fp32 gradient exactly."""
    rows = []
    for scaled in (True, False):
        torch.manual_seed(0)
        model = PIC(TinyBackbone(), 32, feature_dim=16, num_negatives=4)
        trainer = Trainer(precision="fp16", device="cpu", num_workers=0, progress=False)
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)
        optimizer = sgd(model, 8, lr=0.5)
        model.attach(optimizer, trainer.scaler)
        before = model.classifier.current()[0]
        batch = {"crops": [torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))],
                 "index": torch.arange(8)}
        finite, _, metrics = trainer.train_step(model, model, optimizer, batch, 0.5)
        assert finite and metrics["loss"].dtype == torch.float32
        assert trainer.scaler.get_scale() == (2.0**8 if scaled else 1.0)
        rows.append(model.classifier.current()[0])
    assert not torch.equal(rows[0][:8], before[:8])  # the step's rows moved
    assert torch.equal(rows[0], rows[1])

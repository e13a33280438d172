"""``python -m pic.export``: the backbone of a checkpoint, loaded strictly by torchvision's own
ResNets, computes what the platform's backbone computes; backbones without a torchvision twin
are refused with a message naming why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import nn

from pic.config import config_dict
from pic.engine.checkpoint import FORMAT, atomic_save
from pic.export import export, main, torchvision_model
from pic.models.simclr import SimCLR
from pic.tasks.linear import LinearProbe

from .helpers import ROOT, compose_config


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics (convolutions keep their random
    init), so that a key mapped to the wrong layer, or a zero-initialised gamma hiding a block,
    changes the output; scales stay moderate so that 50 layers neither vanish nor overflow."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=gen) * 0.4 + 0.3)
                module.bias.normal_(0, 0.1, generator=gen)
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return net


def pretrain_checkpoint(path: Path, backbone: str) -> nn.Module:
    """A SimCLR pretraining checkpoint of ``backbone=...`` in the platform's format, with the
    composed config the trainer stores; returns the (randomised) backbone."""
    cfg = compose_config(f"backbone={backbone}", "model=simclr", "logger=none")
    model = SimCLR(randomise(instantiate(cfg.backbone)), feature_dim=8)
    atomic_save({"format": FORMAT, "model": model.state_dict(), "config": config_dict(cfg)}, path)
    return model.backbone.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_strictly_into_torchvision(tmp_path: Path, arch: str) -> None:
    ours = pretrain_checkpoint(tmp_path / "current.pth", arch)
    # channels_last weights (the trainer's default layout) are written in the plain layout.
    ours.to(memory_format=torch.channels_last)
    main([str(tmp_path / "current.pth"), str(tmp_path / "out.pth")])
    state = torch.load(tmp_path / "out.pth", weights_only=True)
    assert all(v.is_contiguous() for v in state.values())

    theirs = getattr(torchvision.models, arch)()
    theirs.load_state_dict(state)  # strict: no missing or unexpected key
    assert torch.equal(theirs.fc.weight, torch.zeros(1000, ours.out_dim))
    assert torch.equal(theirs.fc.bias, torch.zeros(1000))
    theirs.fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(images), ours(images))


def test_export_of_a_linear_checkpoint_keeps_its_classifier(tmp_path: Path) -> None:
    cfg = compose_config("backbone=resnet18", "task=linear", "logger=none")
    probe = LinearProbe(randomise(instantiate(cfg.backbone)), 10, torch.zeros(1, dtype=torch.long))
    nn.init.normal_(probe.fc.weight)
    atomic_save({"format": FORMAT, "model": probe.state_dict(), "config": config_dict(cfg)},
                tmp_path / "current.pth")
    export(tmp_path / "current.pth", tmp_path / "out.pth")
    theirs = torchvision.models.resnet18(num_classes=10)
    theirs.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True))
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(images), probe.eval().logits(images))
    with pytest.raises(ValueError, match="trained classifier for 10 classes"):
        export(tmp_path / "current.pth", tmp_path / "x.pth", num_classes=1000)


def test_export_without_fc_and_by_command_line(tmp_path: Path) -> None:
    ours = pretrain_checkpoint(tmp_path / "current.pth", "resnet18")
    done = subprocess.run([sys.executable, "-m", "pic.export", str(tmp_path / "current.pth"),
                           str(tmp_path / "out.pth"), "--no-fc"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision resnet18 state_dict" in done.stdout and "no fc" in done.stdout
    state = torch.load(tmp_path / "out.pth", weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    theirs = torchvision.models.resnet18()
    theirs.fc = nn.Identity()
    theirs.load_state_dict(state)
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(images), ours(images))


def test_small_stem_is_refused_unless_asked_for(tmp_path: Path) -> None:
    ours = pretrain_checkpoint(tmp_path / "current.pth", "resnet18_small")
    (tmp_path / "out.pth").write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match=r"3×3 stem and no max-pool .* --small-stem"):
        export(tmp_path / "current.pth", tmp_path / "out.pth")
    assert (tmp_path / "out.pth").read_bytes() == b"an earlier export"
    with pytest.raises(SystemExit, match="--small-stem"):
        main([str(tmp_path / "current.pth"), str(tmp_path / "out.pth")])

    export(tmp_path / "current.pth", tmp_path / "out.pth", small_stem=True)
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "out.pth"))
    theirs = torchvision_model("resnet18", 1000, small_stem=True)
    theirs.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True))
    theirs.fc = nn.Identity()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(images), ours(images))


def test_errors_name_the_file(tmp_path: Path) -> None:
    pretrain_checkpoint(tmp_path / "tiny.pth", "resnet_tiny")
    with pytest.raises(ValueError, match="tiny.pth: .*no torchvision counterpart"):
        export(tmp_path / "tiny.pth", tmp_path / "out.pth")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="foreign.pth is not a checkpoint of this platform"):
        export(tmp_path / "foreign.pth", tmp_path / "out.pth")
    pretrain_checkpoint(tmp_path / "r18.pth", "resnet18")
    with pytest.raises(ValueError, match="r18.pth: its weights do not load into .*resnet34"):
        export(tmp_path / "r18.pth", tmp_path / "out.pth", arch="resnet34")
    with pytest.raises(ValueError, match="overwrite its own checkpoint"):
        export(tmp_path / "r18.pth", tmp_path / "r18.pth")
    assert not (tmp_path / "out.pth").exists()

"""``python -m pic.export RUN/current.pth OUT.pth``: a checkpoint's backbone as a plain
torchvision ResNet ``state_dict``.

``OUT.pth`` is a dict of tensors (``torch.load(OUT, weights_only=True)`` reads it) with
torchvision's key names, checked before it is written by loading it strictly into
``torchvision.models.<arch>()``. Its ``fc`` is the trained linear classifier when the
checkpoint is one of ``task=linear``, otherwise zeros (``--num-classes``, default 1000): a
pretraining run has no classifier, and a zero layer is one that nobody can mistake for a trained
one. ``--no-fc`` leaves ``fc`` out (timm's ``num_classes=0``, detectron2).

``backbone=resnet*_small`` (3×3/1 stem, no max-pool) has no torchvision twin: it is refused
unless ``--small-stem`` is given, which writes torchvision's key names for a model whose
``conv1`` is ``Conv2d(3, C, 3, 1, 1, bias=False)`` and whose ``maxpool`` is ``Identity()``.
``backbone=resnet_tiny`` has no torchvision counterpart at all and is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .engine.checkpoint import atomic_save, backbone_state, load_checkpoint

State = dict[str, torch.Tensor]


def _weights(ckpt: dict[str, Any], path: Path) -> tuple[State, State]:
    """(backbone weights, trained classifier or {}) of a pretraining or ``task=linear``
    checkpoint; keys relative to the backbone module (``net.conv1.weight``, ...)."""
    model = ckpt["model"]
    if any(k.startswith("encoder.backbone.") for k in model):
        return backbone_state(ckpt), {}
    if "fc.weight" in model and any(k.startswith("backbone.") for k in model):
        backbone = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
        return backbone, {k[len("fc."):]: v for k, v in model.items() if k.startswith("fc.")}
    raise ValueError(f"{path}: no backbone weights (neither encoder.backbone.* of a pretraining "
                     "run nor backbone.* of task=linear)")


def _check_torchvision(state: State, backbone_cfg: dict[str, Any], path: Path,
                       small_stem: bool) -> None:
    """Refuse backbones without a torchvision twin, naming what differs."""
    if not all(k.startswith("net.") for k in state):
        raise ValueError(
            f"{path}: its backbone ({backbone_cfg.get('_target_', 'not a torchvision ResNet')}, "
            "e.g. backbone=resnet_tiny) has no torchvision counterpart; only backbone=resnet18, "
            "resnet50 (and their _small variants with --small-stem) can be exported")
    if state["net.conv1.weight"].shape[-1] != 7 and not small_stem:
        raise ValueError(
            f"{path}: its backbone has a {state['net.conv1.weight'].shape[-1]}×"
            f"{state['net.conv1.weight'].shape[-1]} stem and no max-pool (a backbone=*_small "
            "option), which torchvision's ResNets do not have: torchvision.models."
            f"{backbone_cfg.get('arch', '<arch>')}() cannot load it. Pass --small-stem to write "
            "it under torchvision's key names for a model with conv1 = Conv2d(3, C, 3, 1, 1, "
            "bias=False) and maxpool = Identity() (see README, Export)")


def torchvision_model(arch: str, num_classes: int | None, small_stem: bool = False) -> nn.Module:
    """The torchvision network an export loads into: ``fc`` is ``Identity`` when
    ``num_classes`` is None; ``small_stem`` swaps in the 3×3/1 stem without max-pool."""
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes or 1000)
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    if num_classes is None:
        net.fc = nn.Identity()
    return net


def export_state(ckpt: dict[str, Any], path: Path, fc: bool = True,
                 num_classes: int | None = None, small_stem: bool = False,
                 arch: str | None = None) -> tuple[State, str]:
    """The torchvision ``state_dict`` of checkpoint ``ckpt`` (read from ``path``) and its arch.

    Raises ``ValueError`` naming the file for a backbone that is not a torchvision ResNet, an
    arch that does not fit the weights, or a ``num_classes`` that contradicts a trained fc.
    """
    backbone, head = _weights(ckpt, path)
    backbone_cfg = (ckpt.get("config") or {}).get("backbone") or {}
    _check_torchvision(backbone, backbone_cfg, path, small_stem)
    arch = arch or backbone_cfg.get("arch")
    if not arch:
        raise ValueError(f"{path}: its config does not name the backbone's arch; pass --arch")
    state = {k[len("net."):]: v.contiguous() for k, v in backbone.items()}
    if fc and head and num_classes not in (None, head["weight"].shape[0]):
        raise ValueError(f"--num-classes {num_classes}: {path} holds a trained classifier for "
                         f"{head['weight'].shape[0]} classes")
    classes = (head["weight"].shape[0] if head else num_classes or 1000) if fc else None
    try:
        net = torchvision_model(arch, classes, small_stem)
        if fc:
            head = head or {"weight": torch.zeros(classes, net.fc.in_features),
                            "bias": torch.zeros(classes)}
            state.update({f"fc.{k}": v.contiguous() for k, v in head.items()})
        net.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: its weights do not load into torchvision.models.{arch}(): "
                         f"{err}") from err
    return state, arch


def export(src: str | Path, dst: str | Path, **options: Any) -> str:
    """Write the torchvision ``state_dict`` of checkpoint ``src`` to ``dst`` (atomically) and
    return a one-line description. ``options``: those of :func:`export_state`."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the export would overwrite its own checkpoint; choose another "
                         "output path")
    state, arch = export_state(load_checkpoint(src), src, **options)
    atomic_save(state, dst)
    head = (f"fc {tuple(state['fc.weight'].shape)}" if "fc.weight" in state else "no fc")
    return f"wrote {dst}: torchvision {arch} state_dict, {len(state)} tensors, {head}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pic.export", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a current.pth of task=pretrain or task=linear")
    parser.add_argument("output", help="where to write the torchvision state_dict")
    parser.add_argument("--no-fc", action="store_true", help="leave the fc layer out")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="rows of the zero fc of a pretraining checkpoint (default 1000)")
    parser.add_argument("--small-stem", action="store_true",
                        help="export a backbone=*_small (3x3 stem, no max-pool) anyway")
    parser.add_argument("--arch", default=None, help="torchvision arch, if the config lacks it")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.output, fc=not args.no_fc,
                     num_classes=args.num_classes, small_stem=args.small_stem, arch=args.arch))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

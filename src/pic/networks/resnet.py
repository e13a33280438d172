"""Backbones: torchvision ResNets, their small-image variant, and a CPU-sized ResNet.

Every backbone maps B×3×H×W images to B×``out_dim`` pooled features (no classifier).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock


def _zero_init_last_bn(model: nn.Module) -> None:
    """Each residual branch starts as identity (last BN gamma = 0), as in the PIC paper."""
    for module in model.modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


class ResNet(nn.Module):
    """A torchvision ResNet without its fc layer.

    ``small_images`` replaces the 7×7/2 stem and max-pool by a 3×3/1 stem (CIFAR-style), for
    inputs of 32–96 px.
    """

    def __init__(self, arch: str = "resnet50", small_images: bool = False,
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        if arch not in torchvision.models.list_models(torchvision.models):
            raise ValueError(f"backbone.arch={arch!r} is not a torchvision model")
        net = torchvision.models.get_model(arch, weights=None)
        if small_images:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        if zero_init_residual:
            _zero_init_last_bn(net)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyResNet(nn.Module):
    """A ResNet small enough to train in minutes on a laptop CPU (28–64 px inputs).

    3×3 stem, no max-pool, one basic block per stage (stride 2 after the first), global pool.
    """

    def __init__(self, widths: list[int] | None = None, zero_init_residual: bool = True) -> None:
        super().__init__()
        widths = widths or [32, 64, 128]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != width:
                down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False),
                                     nn.BatchNorm2d(width))
            blocks.append(BasicBlock(in_ch, width, stride, down))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            _zero_init_last_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)

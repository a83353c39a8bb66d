"""Backbones: torchvision ResNets (optionally with a small-image stem) and a small fast ConvNet.

Every backbone maps images ``(B, C, H, W)`` to pooled features ``(B, out_dim)`` and exposes its
intermediate stages through :meth:`Backbone.forward_stages` (feature taps for layer-wise probes and
feature-map pictures). Weights are always randomly initialised: nothing is downloaded.

The small-image stem (He et al. 2016, CIFAR variant as used by SimCLR and solo-learn) replaces the
7x7/2 conv1 and the max-pool with a 3x3/1 conv, so 32 px images keep enough spatial resolution; it is
the default for images of at most 64 px.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

BACKBONES = ("resnet18", "resnet50", "convnet")


class Backbone(nn.Module):
    """Base: ``stages`` is an ``nn.ModuleList`` applied in order; features are global-average pooled."""

    out_dim: int
    stage_names: list[str]
    stage_dims: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList()

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class ResNet(Backbone):
    """torchvision ResNet without its classifier; stages: stem, layer1..layer4."""

    def __init__(self, name: str, small_stem: bool, in_chans: int = 3) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        if small_stem:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stages.append(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool))
        self.stages.extend([net.layer1, net.layer2, net.layer3, net.layer4])
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "layer4"]
        expansion = 4 if name == "resnet50" else 1
        self.stage_dims = [64] + [c * expansion for c in (64, 128, 256, 512)]
        self.out_dim = self.stage_dims[-1]


class ConvNet(Backbone):
    """A small, fast VGG-style ConvNet for CPU work: 4 stages of conv-BN-ReLU x2, the first three
    followed by 2x2 max-pooling; widths 32-64-128-256 (x ``width``)."""

    def __init__(self, in_chans: int = 3, width: int = 1) -> None:
        super().__init__()
        dims = [32 * width, 64 * width, 128 * width, 256 * width]
        c = in_chans
        for i, d in enumerate(dims):
            layers: list[nn.Module] = [
                nn.Conv2d(c, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
                nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            ]
            if i < len(dims) - 1:
                layers.append(nn.MaxPool2d(2))
            self.stages.append(nn.Sequential(*layers))
            c = d
        self.stage_names = [f"block{i + 1}" for i in range(len(dims))]
        self.stage_dims = dims
        self.out_dim = dims[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_backbone(name: str, image_size: int = 32, small_stem: bool | None = None,
                   in_chans: int = 3) -> Backbone:
    """Build a randomly initialised backbone. ``small_stem=None`` picks it for images <= 64 px."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    if name == "convnet":
        return ConvNet(in_chans=in_chans)
    if small_stem is None:
        small_stem = image_size <= 64
    return ResNet(name, small_stem=small_stem, in_chans=in_chans)


def backbone_spec(name: str, image_size: int, small_stem: bool | None, in_chans: int = 3) -> dict:
    """What is needed to rebuild the same architecture (stored in checkpoints and exports)."""
    if small_stem is None and name != "convnet":
        small_stem = image_size <= 64
    return {"name": name, "image_size": image_size, "small_stem": bool(small_stem), "in_chans": in_chans}

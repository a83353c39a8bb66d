"""Heads that sit on a backbone's features: projector/predictor MLPs and classifiers on the pooled
features, and the context methods' fc6 on the last feature map (:class:`MapFC`).

Usable on their own: ``MLP(512, 2048, 128)`` is SimCLR's projection head ``g(.)``.
"""

from __future__ import annotations

import torch.nn as nn


class MLP(nn.Sequential):
    """``num_layers`` linear layers; hidden ones are followed by BatchNorm1d + ReLU.

    SimCLR (Chen et al. 2020, Sec. 2.1) uses a 2-layer MLP ``W2 relu(W1 h)``; BatchNorm in the hidden
    layer follows the reference implementation. ``last_bn`` adds a BatchNorm1d (no affine) on the
    output, as SimCLR v2 / MoCo v3 do.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 last_bn: bool = False) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)


class MapFC(nn.Sequential):
    """fc6 of the context-based methods' towers (Doersch et al. 2015, Noroozi & Favaro 2016): a fully
    connected layer, then BatchNorm + ReLU. With ``grid = 0`` it reads the backbone's pooled features
    ``(N, channels)``; with ``grid = g`` the last feature map ``(N, channels, H, W)``, average-pooled to
    g x g and flattened, as the papers' fc6 reads pool5 (2x2x256 for a 64 px tile in AlexNet's jigsaw
    tower): it then sees *where* in the map a feature is, so the convolutional stages need not fold
    positions into their channels. Output ``(N, out_dim)``."""

    def __init__(self, channels: int, grid: int, out_dim: int) -> None:
        flat = [nn.AdaptiveAvgPool2d(grid), nn.Flatten(1)] if grid else []
        super().__init__(*flat, nn.Linear(channels * max(grid, 1) ** 2, out_dim, bias=False),
                         nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


class LinearClassifier(nn.Linear):
    """A linear classifier on pooled features (pretext classifiers and linear probes)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)

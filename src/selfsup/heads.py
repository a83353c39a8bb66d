"""Heads that sit on a backbone's pooled features: projector/predictor MLPs and classifiers.

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


class LinearClassifier(nn.Linear):
    """A linear classifier on pooled features (pretext classifiers and linear probes)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)

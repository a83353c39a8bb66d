"""Barlow Twins: make the cross-correlation of two views' embeddings the identity
(Zbontar, Jing, Misra, LeCun & Deny, ICML 2021).

Algorithm 1 of the paper::

    for x in loader:
        y_a, y_b = augment(x)                # two randomly augmented views (BYOL's, asymmetric)
        z_a, z_b = f(y_a), f(y_b)            # backbone + projector, N x D
        z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)   # normalise along the batch
        z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
        c = z_a_norm.T @ z_b_norm / N        # cross-correlation matrix, D x D (Eq. 2)
        c_diff = (c - eye(D)).pow(2)
        off_diagonal(c_diff).mul_(lambda)    # weigh the redundancy-reduction term
        loss = c_diff.sum()                  # Eq. 1
        loss.backward(); optimizer.step()

The projector is an MLP with BatchNorm + ReLU on its hidden layers (3 layers of 8192 in the paper;
2048 here, as solo-learn's CIFAR recipe). Each view is its own forward pass. ``scale_loss`` multiplies
the loss (1 in the paper; solo-learn's CIFAR recipe uses 0.1). Views: as BYOL, see
:func:`selfsup.data.views.two_views`. Features for downstream tasks are the backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.views import two_views
from ..heads import MLP
from ..monitor import normalized_std
from ..losses import barlow_twins_loss, cross_correlation
from ..distributed import gather
from .base import Method, TwoViewFigures


class BarlowTwins(TwoViewFigures, Method):
    name = "barlow_twins"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "Barlow Twins (Zbontar et al. 2021): cross-correlation of the two views' embeddings -> identity"
    views_per_image = 2

    @dataclass
    class Params:
        proj_hidden_dim: int = 2048  # paper (ImageNet): 8192-8192-8192
        proj_dim: int = 2048
        proj_layers: int = 3
        lambd: float = 0.0051  # weight of the off-diagonal (redundancy-reduction) term, Eq. 1
        scale_loss: float = 1.0
        view2_blur_p: float | None = None  # None: as aug.blur_p (paper: 1.0 view 1, 0.1 view 2)
        view2_solarize_p: float | None = 0.2  # paper: 0.0 view 1 (aug), 0.2 view 2

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers)

    def prepare(self, images, generator):
        return self.fmt(two_views(images, self.cfg.aug, generator,
                                         self.hp.view2_blur_p, self.hp.view2_solarize_p))

    def training_step(self, x):
        x1, x2 = x.chunk(2)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        z1, z2 = gather(z1), gather(z2)  # distributed: C is computed over the global batch (identity otherwise)
        loss = self.hp.scale_loss * barlow_twins_loss(z1, z2, self.hp.lambd)
        with torch.no_grad():  # mean of C_ii: how invariant the embedding dimensions are (1 is perfect)
            diag = torch.diagonal(cross_correlation(z1, z2)).mean()
        return {"loss": loss, "c_diag": diag, "z_std": normalized_std(z1)}

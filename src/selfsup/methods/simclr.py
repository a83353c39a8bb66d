"""SimCLR: contrast two augmented views of each image against the rest of the batch
(Chen, Kornblith, Norouzi & Hinton, ICML 2020).

Algorithm 1 of the paper::

    for minibatch x:
        x1, x2 = t(x), t'(x)                 # two random augmentations per image
        z1, z2 = g(f(x1)), g(f(x2))          # encoder f, projection MLP g
        loss = NT-Xent(z1, z2; temperature)  # Eq. 1, every other view in the batch is a negative

Features for downstream tasks are ``f(x)``, before the projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.views import two_views
from ..heads import MLP
from ..losses import nt_xent
from .base import Method, TwoViewFigures


class SimCLR(TwoViewFigures, Method):
    name = "simclr"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "SimCLR (Chen et al. 2020): two views, projection MLP, NT-Xent contrastive loss"
    views_per_image = 2

    @dataclass
    class Params:
        temperature: float = 0.2
        proj_hidden_dim: int = 2048
        proj_dim: int = 128

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.projector = MLP(self.backbone.out_dim, self.hp.proj_hidden_dim, self.hp.proj_dim)

    def prepare(self, images, generator):
        return self.fmt(two_views(images, self.cfg.aug, generator))

    def training_step(self, x):
        z1, z2 = self.projector(self.backbone(x)).float().chunk(2)
        loss = nt_xent(z1, z2, self.hp.temperature)
        with torch.no_grad():  # does each view find its partner among the other 2N-1 views?
            z = F.normalize(torch.cat([z1, z2]), dim=1)
            sim = z @ z.t()
            sim.fill_diagonal_(float("-inf"))
            n = z1.shape[0]
            partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            acc = (sim.argmax(1) == partner).float().mean()
        return {"loss": loss, "pretext_acc": acc}

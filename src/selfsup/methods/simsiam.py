"""SimSiam: a Siamese network with a predictor and stop-gradient, no negatives, no momentum encoder
(Chen & He, CVPR 2021).

Algorithm 1 of the paper::

    for x in loader:
        x1, x2 = aug(x), aug(x)              # random augmentation
        z1, z2 = f(x1), f(x2)                # projections: backbone + projection MLP, n-by-d
        p1, p2 = h(z1), h(z2)                # predictions, n-by-d
        L = D(p1, z2)/2 + D(p2, z1)/2        # loss, Eq. 4
        L.backward(); update(f, h)

    def D(p, z):                             # negative cosine similarity, Eq. 1
        z = z.detach()                       # stop gradient
        return -(normalize(p) * normalize(z)).sum(dim=1).mean()

f's projection MLP has BatchNorm on every layer, including its output (no ReLU at the output; 3 layers
on ImageNet, 2 in the paper's CIFAR experiments and the CIFAR preset); h is a 2-layer bottleneck MLP
(hidden d/4) with BatchNorm on its hidden layer only. Each view is its own forward pass (BatchNorm
statistics per view), as in the reference code.

Fixed predictor learning rate (Sec. 4.2, Table 1c): with ``fix_pred_lr`` the predictor's parameter
groups carry ``fixed_lr=True``, and the training loop's schedule (``Trainer.set_lr``) keeps them at
their base rate while the rest follows warm-up + cosine (without it: the paper's Table 1 baseline,
67.7% vs 68.1%).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.views import two_views
from ..heads import MLP
from ..losses import simsiam_loss
from ..monitor import normalized_std
from .base import Method, TwoViewFigures


class SimSiam(TwoViewFigures, Method):
    name = "simsiam"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "SimSiam (Chen & He 2021): predictor + stop-gradient on a shared encoder, negative cosine"
    views_per_image = 2

    @dataclass
    class Params:
        proj_hidden_dim: int = 2048
        proj_dim: int = 2048  # d
        proj_layers: int = 3  # 3 in the paper on ImageNet, 2 in its CIFAR experiments (the CIFAR preset)
        pred_hidden_dim: int = 512  # bottleneck d/4
        fix_pred_lr: bool = True  # mark the predictor's groups fixed_lr=True (see module docstring)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers,
                             last_bn=True)
        self.predictor = MLP(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim)

    def prepare(self, images, generator):
        return self.fmt(two_views(images, self.cfg.aug, generator))

    def training_step(self, x):
        x1, x2 = x.chunk(2)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, z2) / 2 + simsiam_loss(p2, z1) / 2  # stop-gradient on z inside
        return {"loss": loss, "z_std": normalized_std(z1)}

    def param_groups(self) -> list[dict]:
        """The base groups for encoder + projector; with ``fix_pred_lr`` the predictor's parameters go
        in two more groups of their own (decayed / not) flagged ``fixed_lr=True``."""
        if not self.hp.fix_pred_lr:
            return super().param_groups()
        pred = {id(p) for p in self.predictor.parameters()}
        groups: dict[tuple[bool, bool], list] = {(a, b): [] for a in (False, True) for b in (False, True)}
        for p in self.parameters():
            if p.requires_grad:
                groups[(id(p) in pred, p.ndim <= 1)].append(p)
        no_decay = {"weight_decay": 0.0, "lars_exclude": True}
        return [{"params": groups[(False, False)]}, {"params": groups[(False, True)], **no_decay},
                {"params": groups[(True, False)], "fixed_lr": True},
                {"params": groups[(True, True)], **no_decay, "fixed_lr": True}]

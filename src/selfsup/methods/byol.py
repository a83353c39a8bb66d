"""BYOL: an online network predicts a slowly moving target network's projection of another view
(Grill et al., NeurIPS 2020).

Algorithm 1 of the paper (symmetrised loss, Eq. 2)::

    for minibatch x:
        x1, x2 = t(x), t'(x)                          # asymmetric augmentations (Table 6)
        p1, p2 = q(g(f(x1))), q(g(f(x2)))             # online: encoder f, projector g, predictor q
        z1', z2' = g'(f'(x1)), g'(f'(x2))             # target: EMA copies f', g' (no gradient)
        loss = byol_loss(p1, sg(z2')) + byol_loss(p2, sg(z1'))   # 2 - 2 cos, Eq. 2
        loss.backward(); optimizer.step()             # online network only
        tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2   # tau_base for the run's length K

        f', g' = tau * (f', g') + (1 - tau) * (f, g)  # after_step (ema_update)

``tau_base`` follows the run's length: the recipe's 0.99 is for 1000 CIFAR epochs, and a shorter run
starts lower (:func:`selfsup.ema.run_momentum`, after the BYOL repository's presets, which lower it to
0.97 for 40-epoch runs); ``params.momentum_ref_steps=0`` keeps 0.99 at any length.

Each view is its own forward pass (BatchNorm statistics per view) and the target runs in training
mode (batch statistics), as in the reference implementation. Features for downstream tasks are
``f(x)``.

Asymmetric augmentations: the run has one ``aug`` config; it describes view 1. View 2 uses the same
settings except the blur and solarization probabilities ``params.view2_blur_p`` and
``params.view2_solarize_p`` when these are set (BYOL Table 6: blur 1.0 / 0.1, solarize 0.0 / 0.2).
:func:`selfsup.data.views.two_views` makes them; Barlow Twins and VICReg use BYOL's augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.views import two_views
from ..ema import cosine_momentum, ema_update, frozen_copy, run_momentum
from ..heads import MLP
from ..monitor import normalized_std
from ..losses import byol_loss
from .base import Method, TwoViewFigures


class BYOL(TwoViewFigures, Method):
    name = "byol"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "BYOL (Grill et al. 2020): online predictor regresses an EMA target's projection, no negatives"
    views_per_image = 2

    @dataclass
    class Params:
        # paper (ImageNet): projector 4096 -> 256, predictor 4096 -> 256; 2048 hidden for 32-96 px
        proj_hidden_dim: int = 2048
        proj_dim: int = 256
        pred_hidden_dim: int = 2048
        base_momentum: float = 0.99  # tau_base (paper: 0.996 on ImageNet; 0.99 for CIFAR-sized data)
        final_momentum: float = 1.0
        momentum_ref_steps: int = 195_000  # the run length base_momentum is for (solo-learn CIFAR: 1000
        # epochs x 195 steps); shorter runs start lower (ema.run_momentum); 0: base_momentum at any length
        view2_blur_p: float | None = None  # None: as aug.blur_p
        view2_solarize_p: float | None = 0.2  # paper: 0.0 for view 1 (aug), 0.2 for view 2

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.predictor = MLP(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim)
        # target network: a copy of the online encoder + projector, in the state_dict (checkpointed)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)

    def prepare(self, images, generator):
        return self.fmt(two_views(images, self.cfg.aug, generator,
                                         self.hp.view2_blur_p, self.hp.view2_solarize_p))

    def training_step(self, x):
        x1, x2 = x.chunk(2)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "z_std": normalized_std(z1)}

    def after_step(self, step, total_steps):
        base = run_momentum(self.hp.base_momentum, total_steps, self.hp.momentum_ref_steps)
        tau = cosine_momentum(step, total_steps, base, self.hp.final_momentum)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)

"""VICReg: variance-invariance-covariance regularisation of two views' embeddings
(Bardes, Ponce & LeCun, ICLR 2022).

Algorithm 1 of the paper::

    for x in loader:
        x_a, x_b = augment(x)                # two randomly augmented views (BYOL's, asymmetric)
        z_a, z_b = f(x_a), f(x_b)            # backbone + expander, N x D
        sim_loss = mse_loss(z_a, z_b)        # invariance, Eq. 5
        std_z_a = sqrt(z_a.var(dim=0) + 1e-04)
        std_loss = mean(relu(1 - std_z_a)) + mean(relu(1 - std_z_b))            # variance, Eq. 1-2
        cov_z_a = (z_a - z_a.mean(0)).T @ (z_a - z_a.mean(0)) / (N - 1)
        cov_loss = off_diagonal(cov_z_a).pow_(2).sum() / D + (same for z_b)      # covariance, Eq. 3-4
        loss = 25 * sim_loss + 25 * std_loss + 1 * cov_loss                     # Eq. 6
        loss.backward(); optimizer.step()

The expander (projector) is an MLP with BatchNorm + ReLU on its hidden layers (3 layers of 8192 in the
paper; 2048 here, as solo-learn's CIFAR recipe). Each view is its own forward pass. The logged parts
are unweighted. Views: as BYOL, see :func:`selfsup.data.views.two_views`. Features for
downstream tasks are the backbone's.

Multi-crop (``n_local`` > 0; not in the paper, which uses two views): ``n_local`` small crops of
``local_scale`` of each image at ``local_size`` px (default 2/3 of the training views' side: 16 px beside
24 px views) are added, each paired with both large views and regularised like them
(:func:`selfsup.losses.vicreg_multicrop_loss`); cheaper pixels per view, more views per image. In a
5-minute CIFAR-10 run (``--recipe fast_vicreg``: airbench, 24 px views) 2 crops of 16 px made each step
1.6x dearer and gave kNN 0.543 / linear 0.590 against 0.572 / 0.617 without them
(benchmarks/results/fast_vicreg_multicrop_5m.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.views import local_crops, two_views
from ..heads import MLP
from ..monitor import normalized_std
from ..losses import vicreg_loss, vicreg_multicrop_loss
from ..distributed import gather
from .base import Method, TwoViewFigures


class VICReg(TwoViewFigures, Method):
    name = "vicreg"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "VICReg (Bardes et al. 2022): invariance + variance hinge + covariance penalty on embeddings"
    views_per_image = 2

    @dataclass
    class Params:
        proj_hidden_dim: int = 2048  # paper (ImageNet): 8192-8192-8192
        proj_dim: int = 2048
        proj_layers: int = 3
        sim_weight: float = 25.0  # lambda
        var_weight: float = 25.0  # mu
        cov_weight: float = 1.0  # nu
        view2_blur_p: float | None = None  # None: as aug.blur_p (paper: 1.0 view 1, 0.1 view 2)
        view2_solarize_p: float | None = 0.2  # paper: 0.0 view 1 (aug), 0.2 view 2
        n_local: int = 0  # small crops per image besides the two views (0: the paper's two views)
        local_size: int | None = None  # their side in px; None: 2/3 of the training views' (16 px at 24 px)
        local_scale: tuple[float, float] = (0.05, 0.2)  # their area fraction of the image

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.n_local < 0:
            from ..config import ConfigError

            raise ConfigError(f"params.n_local must be >= 0, got {hp.n_local}")
        self.views_per_image = 2 + hp.n_local
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers)

    def prepare(self, images, generator):
        views = self.fmt(two_views(images, self.cfg.aug, generator, self.hp.view2_blur_p, self.hp.view2_solarize_p))
        if not self.hp.n_local:
            return views
        size = self.hp.local_size or max(8, self.cfg.aug.size * 2 // 3 // 4 * 4)
        return views, self.fmt(local_crops(images, self.cfg.aug, generator, self.hp.n_local, self.hp.local_scale, size))

    def training_step(self, x):
        x, loc = x if isinstance(x, tuple) else (x, None)
        x1, x2 = x.chunk(2)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        z1, z2 = gather(z1), gather(z2)  # distributed: variance and covariance over the global batch
        hp = self.hp
        if loc is None:
            loss, parts = vicreg_loss(z1, z2, hp.sim_weight, hp.var_weight, hp.cov_weight)
        else:  # one pass for all the small crops, as the official multi-crop forward
            zl = [gather(z) for z in self.projector(self.backbone(loc)).chunk(hp.n_local)]
            loss, parts = vicreg_multicrop_loss([z1, z2, *zl], 2, hp.sim_weight, hp.var_weight, hp.cov_weight)
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}, "z_std": normalized_std(z1)}

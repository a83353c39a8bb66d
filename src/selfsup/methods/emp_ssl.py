"""EMP-SSL: many small patches of each image, their total coding rate and their invariance to the
image's mean embedding (Tong, Chen, Ma & LeCun, "EMP-SSL: Towards Self-Supervised Learning in One
Training Epoch", arXiv:2304.03977, 2023; reference code github.com/tsb0601/EMP-SSL).

Algorithm (Sec. 3 of the paper, ``main.py`` / ``loss.py`` of the reference code)::

    for x in loader:                                   # B images
        x_1..x_n = n patches of each image             # crops of 25% of the image, upsampled, augmented
        z_i = normalize(g(f(x_i)))                     # backbone f, projector g (4096 -> 4096 -> 1024)
        zbar = mean_i z_i                              # each image's mean embedding (not detached)
        R(Z) = 1/2 logdet(I + d / (B eps) Z^T Z)       # total coding rate of a batch of embeddings
        loss = - 1/n sum_i R(Z_i) - 200 * 1/n sum_i mean_b cos(z_ib, zbar_b)
        loss.backward(); optimizer.step()

Evaluation (the paper's "bag of features"): an image's feature is the mean of its patches' features.
Here the backbone is evaluated as :class:`selfsup.backbones.CropBag`: the mean of its pooled features
over ``eval_crops`` fixed crops of the same scale (``eval_crops=0``: the plain backbone on the whole
image, as every other method).

Departures from the reference, and why:

* Evaluated layer: the reference averages its 4,096-d ``pre_feature`` layer (the projector's first
  layer, after BN + ReLU) over 128 patches drawn with the training augmentation; here the backbone's
  pooled features, as for every method, over ``eval_crops`` (16) fixed crops with flips and no colour
  operations, so that features are deterministic.
* Patches: ``n_patches`` (20, the README's commands; 100 the code's default, 200 in the paper's
  tables) crops of exactly 25% of the image (``RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1,
  1))``), resized to ``patch_size`` (default: the image size, as the reference; smaller is cheaper).
* Projector widths ``proj_hidden_dim`` / ``proj_dim`` (4096 / 1024 in the reference) are parameters;
  the preset says what it uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import CropBag, backbone_spec
from ..config import ConfigError
from ..data.views import augment
from ..heads import MLP
from ..losses import emp_ssl_loss
from .base import Method


class EMPSSL(Method):
    name = "emp_ssl"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = ("EMP-SSL (Tong et al. 2023): many small patches per image, total coding rate + invariance "
               "to the image's mean embedding; evaluated as a bag of crops")

    @dataclass
    class Params:
        n_patches: int = 20  # patches per image (reference README: 20; its tables: 200)
        patch_scale: float = 0.25  # area of a patch, fraction of the image (reference: exactly 0.25)
        patch_size: int = 0  # side the patches are resized to; 0: the image size (reference: 32 at 32 px)
        proj_hidden_dim: int = 4096  # reference: pre_feature 512 -> 4096, then 4096 -> 4096 -> 1024
        proj_dim: int = 1024
        sim_weight: float = 200.0  # lambda, the invariance term's weight (reference: --patch_sim 200)
        tcr_weight: float = 1.0
        eps: float = 0.2  # coding-rate precision (the reference's --eps; the paper's eps^2)
        eval_crops: int = 16  # evaluated as the mean over this many fixed crops (0: the whole image)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.n_patches < 2 or not 0 < hp.patch_scale <= 1 or hp.eval_crops < 0 or hp.eps <= 0:
            raise ConfigError("emp_ssl: params.n_patches >= 2, params.patch_scale in (0, 1], params.eval_crops >= 0 "
                              "and params.eps > 0")
        self.views_per_image = hp.n_patches
        self.patch_size = hp.patch_size or cfg.data.image_size
        # the reference's pre_feature (Linear + BN + ReLU) and projection (Linear + BN + ReLU + Linear)
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=3)
        if hp.eval_crops:
            self.bag_options = {"inner": cfg.model.backbone, "n": hp.eval_crops, "scale": hp.patch_scale,
                                "size": self.patch_size, "seed": 0}
            self.bag = CropBag(self.backbone, **{k: v for k, v in self.bag_options.items() if k != "inner"})
            self.eval_backbone = "bag"  # evaluation, export and the health checks use the bag

    def backbone_spec(self) -> dict:
        if not self.hp.eval_crops:
            return super().backbone_spec()
        spec = backbone_spec("crop_bag", self.cfg.data.image_size, self.cfg.model.small_stem, 3, self.bag_options)
        spec["small_stem"] = backbone_spec(self.cfg.model.backbone, self.cfg.data.image_size,
                                           self.cfg.model.small_stem)["small_stem"]
        spec["input"] = "rgb"
        spec["weights"] = "bag"
        return spec

    def _patch_aug(self):
        return dataclasses.replace(self.cfg.aug, crop_scale=(self.hp.patch_scale, self.hp.patch_scale),
                                   crop_ratio=(1.0, 1.0), size=self.patch_size)

    def prepare(self, images, generator):
        """``n_patches`` augmented patches of each image, patch-major: ``x[i * B + b]`` is patch ``i`` of
        image ``b``."""
        cfg = self._patch_aug()
        return self.fmt(torch.cat([augment(images, cfg, generator) for _ in range(self.hp.n_patches)]))

    def training_step(self, x):
        n = self.hp.n_patches
        z = F.normalize(self.projector(self.backbone(x)).float(), dim=1)
        loss, parts = emp_ssl_loss(z.view(n, -1, z.shape[1]), self.hp.sim_weight, self.hp.tcr_weight, self.hp.eps)
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        """``patches.png``: 6 images and 8 of the patches the method makes of each (one row per image),
        each patch titled with the cosine of its embedding to the image's mean embedding."""
        from ..figures import image_grid, sample_batch, unnormalize

        images = sample_batch(data, 6, device)
        n = min(8, self.hp.n_patches)
        cfg = self._patch_aug()
        g = torch.Generator(device=images.device).manual_seed(0)
        patches = torch.stack([augment(images, cfg, g) for _ in range(n)], dim=1)  # (6, n, 3, s, s)
        z = F.normalize(self.projector(self.backbone(self.fmt(patches.flatten(0, 1)))).float(), dim=1).view(6, n, -1)
        cos = F.cosine_similarity(z, z.mean(1, keepdim=True).expand_as(z), dim=-1)
        rows = [unnormalize(p, self.cfg.aug) for p in patches]
        titles = [f"image {i}" for i in range(6)]
        path = image_grid(rows, Path(out_dir) / "patches.png", row_titles=titles,
                          col_titles=[" ".join(f"{float(c):.2f}" for c in cos[:, j]) for j in range(n)],
                          title=f"EMP-SSL: {n} of the {self.hp.n_patches} patches of each image; column titles: "
                                "cosine of each patch's embedding to its image's mean, top to bottom")
        return [path]

"""RotNet: predict the rotation applied to an image (Gidaris, Singh & Komodakis, ICLR 2018).

Algorithm (Sec. 3 of the paper; all four rotations of every image are in the batch)::

    x = augment(images)                  # light random crop + flip
    x_r, y = rotate_all(x)               # 4B images; y[i] = k, the number of 90-degree turns
    loss = cross_entropy(head(f(x_r)), y)

The pseudo label ``k`` means ``torch.rot90(x, k, dims=(2, 3))`` (counter-clockwise quarter turns).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.views import augment, eval_view
from ..figures import image_grid, sample_batch, unnormalize
from ..heads import MLP, LinearClassifier
from .base import Method


def rotate_all(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four rotations of every image: ``out[k*B + i] = rot90(x[i], k)``, label ``k``."""
    b = x.shape[0]
    out = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(b)
    return out, labels


class Rotation(Method):
    name = "rotation"
    family = "context-based"
    summary = "RotNet (Gidaris et al. 2018): 4-way classification of the rotation 0/90/180/270 applied"
    views_per_image = 4

    @dataclass
    class Params:
        head_hidden_dim: int = 0  # 0: a linear classifier on pooled features; >0: a 2-layer MLP

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d = self.backbone.out_dim
        h = self.hp.head_hidden_dim
        self.head = MLP(d, h, 4) if h > 0 else LinearClassifier(d, 4)

    def prepare(self, images, generator):
        x = augment(images, self.cfg.aug, generator)
        x, y = rotate_all(x)
        return self.fmt(x), y

    def training_step(self, batch):
        x, y = batch
        logits = self.head(self.backbone(x)).float()
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "pretext_acc": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        """``rotations.png``: 8 sample images (evaluation view) at each of the 4 rotations, one row per
        rotation, each titled with the rotation the network predicts for it and how many it gets right."""
        x = eval_view(sample_batch(data, 8, device), self.cfg.aug)
        xr, y = rotate_all(x)
        pred = self.head(self.backbone(self.fmt(xr))).float().argmax(1).view(4, -1).cpu()
        rows = [unnormalize(r, self.cfg.aug) for r in xr.reshape(4, -1, *xr.shape[1:])]
        titles = [f"rotated {90 * k}\N{DEGREE SIGN}\n{int((pred[k] == k).sum())}/{pred.shape[1]} right" for k in range(4)]
        cols = [" ".join(f"{90 * int(p)}" for p in pred[:, j]) for j in range(pred.shape[1])]
        return [image_grid(rows, Path(out_dir) / "rotations.png", row_titles=titles, col_titles=cols,
                           title="Rotation: each image at 0/90/180/270 degrees; column titles: the predicted "
                                 "rotations, top to bottom")]

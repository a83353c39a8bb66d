"""MoCo v3: a momentum encoder's keys from the same batch, no queue, a predictor on the query side
(Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021,
arXiv 2104.02057).

Algorithm 1 of the paper::

    # f_q: backbone + projector + predictor; f_k: momentum backbone + projector
    for x in loader:
        x1, x2 = aug(x), aug(x)                 # two random views
        q1, q2 = f_q(x1), f_q(x2)               # queries: [N, C] each
        k1, k2 = f_k(x1), f_k(x2)               # keys: [N, C] each, no gradient
        loss = ctr(q1, k2) + ctr(q2, k1)        # symmetrized
        loss.backward(); update(f_q)            # optimizer on f_q only
        f_k = m * f_k + (1 - m) * f_q           # momentum update (after_step)

    def ctr(q, k):
        logits = mm(q, k.t())                   # [N, N] pairs; L2-normalised q, k
        labels = range(N)                       # positives are in the diagonal
        return 2 * tau * CrossEntropyLoss(logits / tau, labels)

(:func:`selfsup.losses.moco_v3_loss`). The keys of the *batch* are the negatives (no queue). In
distributed training every process contrasts its local queries with the keys of the global batch
(all-gathered; the keys get no gradient) and the positive of local query ``i`` is global key
``rank * n + i``, as in the official code.

Architecture (the official code): projector = ``Linear-BN-ReLU`` x (L-1) + ``Linear-BN`` (no
affine) with L = 2 for ResNets and 3 for ViTs; predictor = ``Linear-BN-ReLU-Linear`` (plus a last
BN for ViTs). The momentum encoder is a copy of backbone + projector, moved by EMA with a momentum
following a cosine from ``base_momentum`` 0.99 to ``final_momentum`` 1 (the paper's default,
``--moco-m-cos``); 0.99 is for long runs, a run shorter than ``momentum_ref_steps`` starts lower
(:func:`selfsup.ema.run_momentum`). For ViT backbones the patch projection is a fixed random layer (Sec. 4.2, "a
simple trick": it stabilises training; ``params.fixed_patch_embed``). Each view is its own forward
pass (BN statistics per view), as in the reference implementation. Features for downstream tasks
are the backbone's.

Defaults and scaling: the paper trains ResNet-50 on ImageNet with hidden 4096, output 256,
tau = 1.0, m = 0.99, LARS lr 0.6 per 256 images (100 epochs), wd 1e-6, batch 4096; ViTs with
tau = 0.2, AdamW lr 1.5e-4 per 256, wd 0.1, 40 warm-up epochs. For 32-96 px images (solo-learn's
CIFAR recipe) hidden 2048, output 256, tau = 0.2, LARS lr 0.3, wd 1e-6 and BYOL's asymmetric
augmentations (view 2 solarized with p = 0.2). With ``model.backbone=vit_tiny`` use the paper's ViT
optimizer: ``optim.name=adamw optim.lr=1.5e-4 optim.weight_decay=0.1``.

The loss is scaled by ``2 tau`` as in the official code (this makes the gradient magnitude
independent of tau); its minimum is therefore 0 and a random encoder gives about
``2 * 2 tau * log N`` for the symmetrised pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones import ViT
from ..data.views import two_views
from ..ema import cosine_momentum, ema_update, frozen_copy, run_momentum
from ..heads import MLP
from ..losses import moco_v3_loss
from .base import Method, TwoViewFigures


class MoCoV3(TwoViewFigures, Method):
    name = "moco_v3"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "MoCo v3 (Chen, Xie & He 2021): momentum encoder, in-batch keys (no queue), predictor, InfoNCE"
    views_per_image = 2

    @dataclass
    class Params:
        temperature: float = 0.2  # tau (paper: 1.0 ResNet, 0.2 ViT; solo-learn CIFAR: 0.2)
        proj_hidden_dim: int = 2048  # paper: 4096 (ImageNet); 2048 for 32-96 px
        proj_dim: int = 256  # C, the output of projector and predictor
        pred_hidden_dim: int = 2048  # paper: 4096
        proj_layers: int = 0  # 0: the paper's choice, 2 for ConvNets/ResNets, 3 for ViTs
        base_momentum: float = 0.99  # m at step 0 (paper: 0.99, ResNet and ViT, batch 4096)
        final_momentum: float = 1.0  # m at the last step (cosine schedule, paper's --moco-m-cos)
        momentum_ref_steps: int = 195_000  # the run length base_momentum is for (solo-learn CIFAR: 1000
        # epochs x 195 steps); shorter runs start lower (ema.run_momentum); 0: base_momentum at any length
        fixed_patch_embed: bool = True  # ViT only: frozen random patch projection (paper Sec. 4.2)
        view2_blur_p: float | None = None  # None: as aug.blur_p (BYOL's asymmetric views, see byol.py)
        view2_solarize_p: float | None = 0.2  # paper (BYOL's augmentations): 0.0 view 1, 0.2 view 2

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.temperature <= 0 or hp.proj_layers < 0 or hp.proj_layers == 1:
            from ..config import ConfigError

            raise ConfigError(f"moco_v3 needs params.temperature > 0 and params.proj_layers 0 (auto) or >= 2, got "
                              f"{hp.temperature} and {hp.proj_layers}")
        vit = isinstance(self.backbone, ViT)
        if vit and hp.fixed_patch_embed:
            self.backbone.conv_proj.requires_grad_(False)  # random patch projection, never trained
        layers = hp.proj_layers or (3 if vit else 2)
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=layers, last_bn=True)
        self.predictor = MLP(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim, num_layers=2, last_bn=vit)
        # momentum encoder: a copy of backbone + projector, moved by EMA only; in the state_dict
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)

    def prepare(self, images, generator):
        return self.fmt(two_views(images, self.cfg.aug, generator, self.hp.view2_blur_p, self.hp.view2_solarize_p))

    def training_step(self, x):
        x1, x2 = x.chunk(2)
        q1 = self.predictor(self.projector(self.backbone(x1))).float()
        q2 = self.predictor(self.projector(self.backbone(x2))).float()
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1)).float()
            k2 = self.momentum_projector(self.momentum_backbone(x2)).float()
        tau = self.hp.temperature
        loss = moco_v3_loss(q1, k2, tau) + moco_v3_loss(q2, k1, tau)
        with torch.no_grad():  # does each query pick its own key among the (local) batch's keys?
            hits = []
            for q, k in ((q1, k2), (q2, k1)):
                sim = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t()
                hits.append(sim.argmax(1) == torch.arange(q.shape[0], device=q.device))
            acc = torch.cat(hits).float().mean()
        return {"loss": loss, "pretext_acc": acc}

    def momentum(self, step: int, total_steps: int) -> float:
        base = run_momentum(self.hp.base_momentum, total_steps, self.hp.momentum_ref_steps)
        return cosine_momentum(step, total_steps, base, self.hp.final_momentum)

    def after_step(self, step, total_steps):
        m = self.momentum(step, total_steps)
        ema_update(self.momentum_backbone, self.backbone, m)
        ema_update(self.momentum_projector, self.projector, m)

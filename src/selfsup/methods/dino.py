"""DINO: self-distillation with no labels, a student matching a momentum teacher's centred, sharpened
output (Caron, Touvron, Misra, Jegou, Mairal, Bojanowski & Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, arXiv 2104.14294).

Algorithm 1 of the paper, with multi-crop and the schedules of the official code::

    gt.params = gs.params                             # teacher g_t: a copy of the student g_s
    for x in loader:
        x_1, x_2, x_3 .. x_V = multi_crop(x)          # 2 global crops + V-2 small local crops
        s = gs(x_1 .. x_V)                            # student: backbone + DINO head, all crops
        t = gt(x_1, x_2)                              # teacher: the global crops only, no gradient
        loss = 1/(2(V-1)) sum_{a=1,2} sum_{v != a} H(t_a, s_v)                  # dino_loss
            # H(t, s) = -softmax((t - C) / tau_t) . log softmax(s / tau_s)
        loss.backward()
        if step < freeze_last_layer_frac * steps: last_layer.grad = None    # the run's first 1%
        update(gs)                                    # optimizer step on the student only
        gt.params = l * gt.params + (1 - l) * gs.params    # after_step, l: cosine 0.996 -> 1
        C = m * C + (1 - m) * mean(t_1, t_2)          # after_step, m = 0.9, batch mean all-reduced

The DINO head (Sec. 3.1 and the official ``DINOHead``) is a 3-layer MLP (hidden 2048, GELU) to a
256-d bottleneck, L2-normalised, then a weight-normalised linear layer without bias to ``out_dim``
outputs (its weight norm ``g`` fixed to 1: ``norm_last_layer``). Centering (C, momentum 0.9) keeps
one output dimension from dominating; sharpening (the teacher temperature tau_t, warmed up linearly
from 0.04 to 0.07, with the student at tau_s = 0.1) keeps the teacher from going uniform: together
they avoid collapse. The loss is :func:`selfsup.losses.dino_loss`.

BatchNorm in the head: the paper's head has none (``use_bn_in_head``, an option of the official
code). Here it is on by default for the convnet / ResNet backbones: their pooled post-ReLU features
share a large mean direction, so without it the head maps every image to nearly the same output at
initialisation, centring then leaves the teacher uniform, and the tiny 16 px test runs collapsed to a
uniform teacher (entropy log K) with both AdamW and LARS. ViTs (LayerNorm'd class token) get the
paper's head without BatchNorm.

Distributed training: the loss of each sample depends only on that sample and the centre, so the
processes' mean loss is the global batch's; the centre update all-reduces the teacher outputs' sum,
so every process keeps the same centre, the mean over the global batch (tested).

Defaults: the paper (ImageNet, ViT-S/16) uses out_dim 65536, 2 x 224 + 8-10 x 96 px crops with
scales (0.4, 1) / (0.05, 0.4) (ResNet-50: 0.14), teacher temperature 0.04 -> 0.07 over 30 epochs,
the last layer frozen for the first epoch, AdamW with weight decay 0.04 -> 0.4 and gradient clipping
3.0. Scaled for 32-96 px images (as solo-learn's CIFAR recipe): ``out_dim = 4096`` (65536 / 16),
6 local crops at :func:`selfsup.data.views.multi_crop`'s default size (3/7 of the image as 96/224: 12
px at 32 px), a constant weight decay (the trainer has no weight-decay schedule) and no gradient
clipping; the CIFAR preset has 1024 outputs and 2 local crops, measured better in 5-minute runs (its
comment). The paper's epoch schedules become fractions of the run, applied per step, so that they
fit a run of any length (a 30-epoch warm-up is all of a short run): the teacher temperature reaches
``teacher_temp`` after ``warmup_teacher_temp_frac`` of the run (paper: 30 of 100 epochs; the official
code steps it once per epoch), the last layer is frozen for ``freeze_last_layer_frac`` (1 of 100
epochs), and the teacher's momentum starts lower in runs shorter than ``momentum_ref_steps``
(:func:`selfsup.ema.run_momentum`; 0.996 is the paper's for 100 ImageNet epochs). Works with the
convnet / ResNet backbones (pooled features) and the ViTs (class token; there
use ``optim.name=adamw optim.lr=5e-4 optim.weight_decay=0.04``). Features for downstream tasks
(evaluation, export, the health checks) are the teacher backbone's, as the paper evaluates them (its
``eval_knn.py`` loads ``checkpoint_key=teacher``; Sec. 5.2: the teacher is better throughout training).
In a 5-minute CIFAR-10 run they are even: kNN 0.403 for the teacher, 0.407 for the student
(``benchmarks/stage_knn.py --teacher``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import VITS
from ..distributed import is_distributed, world_size
from ..ema import cosine_momentum, ema_update, frozen_copy, run_momentum
from ..figures import sample_images
from ..losses import dino_loss
from ..monitor import normalized_std
from ..runtime import embed
from .base import Method, MultiCropViews
from .swav import members_grid


class DINOHead(nn.Module):
    """MLP (``n_layers`` linear layers, GELU) -> bottleneck -> L2 norm -> weight-normalised linear layer
    (``w = g v / ||v||`` per output, no bias; ``g`` fixed to 1 when ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(max(n_layers, 1) - 1):
            layers += [nn.Linear(d, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # the last layer's direction v (initialised as nn.Linear's weight) and norm g
        self.last_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())
        self.last_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1)
        with torch.autocast(x.device.type, enabled=False):  # cosines / 0.04: keep the logits in float32
            v, g = self.last_v, self.last_g
            if freeze_last_layer:  # no gradient reaches the last layer (the official cancel_gradients_last_layer)
                v, g = v.detach(), (g.detach() if g is not None else None)
            w = F.normalize(v.float(), dim=1)
            if g is not None:
                w = w * g.float()
            return x @ w.t()


class DINO(MultiCropViews, Method):
    name = "dino"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "DINO (Caron et al. 2021): student matches a momentum teacher's centred, sharpened output"
    views_per_image = 8  # encoder inputs per image with the default multi-crop: 2 global + 6 local
    eval_backbone = "teacher_backbone"  # evaluated, exported, health-checked: the teacher (paper, Sec. 5.2)

    @dataclass
    class Params:
        out_dim: int = 4096  # K outputs (paper: 65536 on ImageNet; 65536 / 16 for CIFAR-sized data)
        hidden_dim: int = 2048  # head MLP width (paper)
        bottleneck_dim: int = 256  # L2-normalised bottleneck before the last layer (paper)
        n_layers: int = 3  # linear layers of the head MLP before the last layer (paper: 3)
        use_bn_in_head: bool | None = None  # BatchNorm in the head MLP; None: for conv backbones, not ViTs
        norm_last_layer: bool = True  # fix the last layer's weight norm g to 1 (paper: on, for stability)
        student_temp: float = 0.1  # tau_s
        teacher_temp: float = 0.07  # tau_t after the warm-up (paper: 0.04 -> 0.07)
        warmup_teacher_temp: float = 0.04  # tau_t at the start
        warmup_teacher_temp_frac: float = 0.3  # linear warm-up of tau_t over this fraction of the run
        # (paper: 30 of 100 epochs)
        center_momentum: float = 0.9  # m of the centre's EMA (paper)
        base_momentum: float = 0.996  # teacher EMA lambda, cosine to final_momentum (paper: 0.996 -> 1)
        final_momentum: float = 1.0
        momentum_ref_steps: int = 125_100  # the run length base_momentum is for (paper: 100 ImageNet epochs
        # x 1251 steps); shorter runs start lower (ema.run_momentum); 0: base_momentum at any length
        freeze_last_layer_frac: float = 0.01  # the last layer gets no update for this fraction of the
        # run (paper: 1 of 100 epochs)
        n_local: int = 6  # small crops per image (paper: 8-10 x 96 px with 2 x 224 px)
        local_size: int | None = None  # px; None: multi_crop's 3/7 of the image size (12 px at 32 px)
        global_scale: tuple[float, float] = (0.4, 1.0)  # crop area fractions (paper's ViT defaults)
        local_scale: tuple[float, float] = (0.05, 0.4)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.out_dim < 2 or hp.student_temp <= 0 or hp.teacher_temp <= 0 or hp.warmup_teacher_temp <= 0 \
                or hp.n_local < 0 or not 0 <= hp.center_momentum <= 1:
            from ..config import ConfigError

            raise ConfigError(f"dino needs out_dim >= 2, positive temperatures, n_local >= 0 and center_momentum in "
                              f"[0, 1]; got {hp.out_dim}, {hp.student_temp}/{hp.warmup_teacher_temp}/"
                              f"{hp.teacher_temp}, {hp.n_local} and {hp.center_momentum}")
        use_bn = hp.use_bn_in_head if hp.use_bn_in_head is not None else cfg.model.backbone not in VITS
        self.head = DINOHead(self.backbone.out_dim, hp.out_dim, hp.hidden_dim, hp.bottleneck_dim, hp.n_layers,
                             use_bn, hp.norm_last_layer)
        # the teacher: a copy of the student, moved by EMA only; it and the centre are in the
        # state_dict, so a checkpoint resumes them exactly
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, hp.out_dim))
        self._step, self._total = 0, 0  # set by on_epoch_start (also on resume) and after_step
        self._batch_center: torch.Tensor | None = None  # this step's teacher mean, applied by after_step

    def on_epoch_start(self, run, epoch):
        self._step, self._total = run.step, run.total_steps

    def progress(self) -> float:
        """The fraction of the run done at the current step (0 outside a trainer)."""
        return self._step / self._total if self._total else 0.0

    def teacher_temp(self) -> float:
        hp = self.hp
        if hp.warmup_teacher_temp_frac <= 0:
            return hp.teacher_temp
        f = min(1.0, self.progress() / hp.warmup_teacher_temp_frac)
        return hp.warmup_teacher_temp + f * (hp.teacher_temp - hp.warmup_teacher_temp)

    def training_step(self, batch):
        glob, loc = batch
        n = glob.shape[0] // 2
        h = self.backbone(glob)
        if loc is not None:  # one pass per resolution, as the official MultiCropWrapper
            h = torch.cat([h, self.backbone(loc)])
        student = self.head(h, freeze_last_layer=self.progress() < self.hp.freeze_last_layer_frac)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(glob)).float()  # (2n, K): global crops only
        tau_t = self.teacher_temp()
        s, t = student.view(-1, n, student.shape[-1]), teacher.view(2, n, -1)
        loss = dino_loss(s, t, self.center, self.hp.student_temp, tau_t)
        with torch.no_grad():
            self._batch_center = self.batch_center(teacher)
            pt = F.softmax((teacher - self.center) / tau_t, dim=-1)
            entropy = -(pt * torch.log(pt.clamp_min(1e-12))).sum(-1).mean()  # log K: uniform; 0: one-hot
            mean_pt = pt.mean(0)  # 0: every image on the same output (one-hot collapse); log K at most
            mean_entropy = -(mean_pt * torch.log(mean_pt.clamp_min(1e-12))).sum()
            target, pred = t.argmax(-1), s.argmax(-1)  # does the student's other crop pick the teacher's output?
            acc = torch.stack([(pred[v] == target[a]).float().mean() for a in range(2) for v in range(s.shape[0])
                               if v != a]).mean()
        # DINO's Fig. 7 collapse monitors: the teacher's entropy, and KL(teacher || student) = loss - entropy
        # (0 when the student copies the teacher, as after a collapse to a constant output)
        return {"loss": loss, "kl": loss.detach() - entropy, "teacher_entropy": entropy,
                "teacher_mean_entropy": mean_entropy, "pretext_acc": acc, "teacher_temp": torch.tensor(tau_t),
                "h_std": normalized_std(h[:n])}

    @staticmethod
    @torch.no_grad()
    def batch_center(teacher: torch.Tensor) -> torch.Tensor:
        """The mean teacher output over the global batch (1, K): the sum all-reduced over processes, as
        the official ``update_center``."""
        total = teacher.float().sum(dim=0, keepdim=True)
        if is_distributed():
            import torch.distributed as dist

            dist.all_reduce(total)
        return total / (teacher.shape[0] * world_size())

    @torch.no_grad()
    def after_step(self, step, total_steps):
        self._step = step + 1
        self._total = total_steps
        base = run_momentum(self.hp.base_momentum, total_steps, self.hp.momentum_ref_steps)
        lam = cosine_momentum(step, total_steps, base, self.hp.final_momentum)
        ema_update(self.teacher_backbone, self.backbone, lam)
        ema_update(self.teacher_head, self.head, lam)
        if self._batch_center is not None:
            m = self.hp.center_momentum
            self.center.mul_(m).add_(self._batch_center.to(self.center.dtype), alpha=1 - m)
            self._batch_center = None

    @torch.no_grad()
    def teacher_assign(self, images: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
        """The teacher's argmax output of each uint8 NHWC image's deterministic view, on the CPU."""
        return embed(self.teacher_backbone, images, self.cfg.aug, device, self.cfg.train.precision, batch_size,
                     head=lambda f: (self.teacher_head(f).float() - self.center).argmax(1))

    def figures(self, data, out_dir: Path, device) -> list[Path]:
        """``teacher_outputs.png``: images grouped by the argmax of the centred teacher output (most used first)."""
        images = sample_images(data, 512)
        labels = self.teacher_assign(images, device)
        return [members_grid(images, labels, self.hp.out_dim, out_dir / "teacher_outputs.png",
                             f"DINO: images by the argmax of the centred teacher output (of {self.hp.out_dim})")]

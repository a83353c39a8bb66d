"""SwAV: online clustering, predicting the cluster code of one crop from another crop of the same image
(Caron, Misra, Mairal, Goyal, Bojanowski & Joulin, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020, arXiv 2006.09882).

Algorithm 1 of the paper with multi-crop (Sec. 3.2) and the details of the official code::

    C = normalize(C)                                  # K prototypes, unit vectors (kept so: after_step)
    for minibatch x:
        x_1, x_2, x_3 .. x_V = multi_crop(x)          # 2 global crops + V-2 small local crops
        z_v = normalize(g(f(x_v)))                    # backbone f, projection MLP g, L2-normalised
        s_v = z_v C^T                                 # prototype scores, (V, B, K)
        with no_grad:                                 # codes for the global crops only (Eq. 3)
            q_a = sinkhorn([queue_a C^T; s_a], eps=0.05, 3 iterations)[-B:]     for a = 1, 2
        loss = 1/2 sum_a 1/(V-1) sum_{v != a} -sum_k q_a log softmax(s_v / 0.1)  # swapped prediction, Eq. 4
        loss.backward()
        if step < freeze_prototypes_frac * steps: C.grad = None   # prototypes fixed at the start
        optimizer.step()
        C = normalize(C)                              # after_step
        queue_a = [z_a; queue_a][:L]                  # after_step, from queue_start_frac of the run on

The codes ``q`` (:func:`selfsup.losses.sinkhorn`) are soft assignments of the batch to the prototypes
with equal mass per prototype (equipartition, which prevents the trivial solution where all images
fall in one cluster); they get no gradient. The loss is :func:`selfsup.losses.swav_loss`.
Distributed training: Sinkhorn's sums over the batch are all-reduced so its ``B`` is the global batch,
exactly as in the official ``distributed_sinkhorn`` (2 processes x B == 1 process x 2B, tested).

Defaults: the paper (ImageNet, 224 px) uses 3000 prototypes, a 2048 -> 128 projection head,
temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, 2 x 224 + 6 x 96 px crops with crop scales
(0.14, 1) and (0.05, 0.14), prototypes frozen for the first 5005 iterations (batch 4096) and a queue of
3840 embeddings from epoch 15 when the batch is below 4096. Scaled for 32-96 px images:

* multi-crop ``2 x size + 4 x local`` (``n_local = 4``); the local crops are
  :func:`selfsup.data.views.multi_crop`'s default size, 3/7 of the global one as 96/224 is (12 px for
  32 px CIFAR images, 40 px at 96 px), set ``local_size`` to change it;
* ``queue_length = 0`` (no queue): SwAV's queue helps when the batch is small *relative to the
  number of prototypes over many epochs*; for the docs' CIFAR runs (batch 128-256, 1-200 epochs) it is
  off. Set e.g. ``queue_length=3840`` for long runs at batch 256 (it starts at ``queue_start_frac``). The queue holds
  the global batch's embeddings (gathered across processes, so every process keeps the same queue
  and a checkpoint resumes it exactly); each process adds its share of the queue's rows to
  Sinkhorn, whose all-reduced sums then cover the whole queue once. It is used once full, as in the
  official code;
* the prototypes are frozen for a fraction of the run, ``freeze_prototypes_frac = 0.002`` (solo-learn's
  CIFAR recipe: 2 of 1000 epochs; the paper's 5005 iterations are 2% of its 800-epoch runs), so a
  short run is not spent with fixed prototypes (a constant 300 steps were 77% of a 1-epoch run).

Features for downstream tasks are ``f(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import gather, rank, world_size
from ..figures import image_grid, sample_images
from ..heads import MLP
from ..losses import sinkhorn, swav_loss
from ..monitor import normalized_std
from ..runtime import embed
from .base import Method, MultiCropViews


class SwAV(MultiCropViews, Method):
    name = "swav"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "SwAV (Caron et al. 2020): Sinkhorn cluster codes of one crop predicted from the other crops"
    views_per_image = 6  # encoder inputs per image with the default multi-crop: 2 global + 4 local

    @dataclass
    class Params:
        num_prototypes: int = 3000  # K (paper: 3000 on ImageNet; solo-learn's CIFAR recipe also 3000)
        proj_hidden_dim: int = 2048  # projection head 2048 -> 128 (paper)
        proj_dim: int = 128
        proj_last_bn: bool = False  # BatchNorm (no affine) on the projection's output, before the L2
        # normalisation (not in the paper; SimCLR v2 / MoCo v3 have it): centres the embeddings over the batch.
        # In a 5-minute CIFAR-10 run they stay spread (z_std 0.085) but the codes stay uniform (loss 7.99 of
        # log 3000 = 8.01) and the features lose: 0.333 / 0.390 (benchmarks/results/swav_5m_fp32.md)
        temperature: float = 0.1  # of the softmax over prototype scores in the swapped prediction
        epsilon: float = 0.05  # entropy weight of the Sinkhorn codes (smaller: sharper codes)
        sinkhorn_iterations: int = 3
        n_local: int = 4  # small crops per image (paper: 6 x 96 px with 2 x 224 px)
        local_size: int | None = None  # px; None: multi_crop's 3/7 of the image size (12 px at 32 px)
        global_scale: tuple[float, float] = (0.14, 1.0)  # crop area fractions (paper)
        local_scale: tuple[float, float] = (0.05, 0.14)
        queue_length: int = 0  # embeddings kept per global crop for Sinkhorn (0: no queue; paper 3840)
        queue_start_frac: float = 0.05  # the queue fills from this fraction of the run on, and is used once
        # full (solo-learn CIFAR: epoch 50 of 1000; paper: 15 of 800 epochs)
        freeze_prototypes_frac: float = 0.002  # fraction of the run with the prototypes fixed (solo-learn
        # CIFAR: 2 of 1000 epochs; paper: 5005 of about 250k iterations, 0.02)
        hard_codes: bool = False  # predict the one-hot argmax of each Sinkhorn code instead of the soft code
        # (one of the SwAV repository README's workarounds for a loss stuck at log K; in a 5-minute CIFAR-10
        # run it collapsed the features to an effective rank of 7: benchmarks/results/swav_5m_fp32.md)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.num_prototypes < 2 or hp.temperature <= 0 or hp.epsilon <= 0 or hp.n_local < 0 or hp.queue_length < 0:
            from ..config import ConfigError

            raise ConfigError(f"swav needs num_prototypes >= 2, temperature > 0, epsilon > 0, n_local >= 0 and "
                              f"queue_length >= 0; got {hp.num_prototypes}, {hp.temperature}, {hp.epsilon}, "
                              f"{hp.n_local} and {hp.queue_length}")
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, last_bn=hp.proj_last_bn)
        self.prototypes = nn.Linear(hp.proj_dim, hp.num_prototypes, bias=False)
        self.normalize_prototypes()
        # the queue: the last queue_length embeddings of each global crop (newest first) and how many
        # rows hold embeddings yet; buffers, so a resumed run continues with the same queue
        self.register_buffer("queue", torch.zeros(2, hp.queue_length, hp.proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self._step, self._total = 0, 0  # set by on_epoch_start (also on resume) and after_step
        self._new_z: torch.Tensor | None = None  # this step's global embeddings, enqueued by after_step

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def on_epoch_start(self, run, epoch):
        self._step, self._total = run.step, run.total_steps

    def prototypes_frozen(self) -> bool:
        """During the first ``freeze_prototypes_frac`` of the run (never outside a trainer)."""
        return self._step < round(self.hp.freeze_prototypes_frac * self._total)

    def rehearse(self) -> None:
        """Time budget rehearsal: a full queue (of zeros; the plan restores the real one), so that the
        planned steps cost what Sinkhorn over queue + batch costs (measured: 2.3x a step without the
        queue at batch 128, 3,840 rows, 3,000 prototypes, 2 CPU threads)."""
        if self.hp.queue_length > 0:
            self.queue_count.fill_(self.hp.queue_length)

    def queue_in_use(self) -> bool:
        """The queue enters Sinkhorn once it is full (one host read of the fill count per step)."""
        return self.hp.queue_length > 0 and bool(self.queue_count >= self.hp.queue_length)

    def training_step(self, batch):
        glob, loc = batch
        n = glob.shape[0] // 2
        h = self.backbone(glob)
        if loc is not None:  # one pass per resolution, as the official multi-res forward
            h = torch.cat([h, self.backbone(loc)])
        z = F.normalize(self.projector(h).float(), dim=1)  # (V n, D), view-major
        with torch.autocast(z.device.type, enabled=False):
            c = self.prototypes.weight.float()
            if self.prototypes_frozen():
                c = c.detach()  # no gradient: the optimizer leaves the prototypes as they are
            scores = (z @ c.t()).view(-1, n, c.shape[0])  # (V, n, K)
            codes = []
            with torch.no_grad():
                queue = self.queue_in_use()
                share = self.hp.queue_length // world_size()  # this process's rows of the (global) queue
                for a in range(2):
                    s = scores[a].detach()
                    if queue:
                        q_rows = self.queue[a, rank() * share:(rank() + 1) * share]
                        s = torch.cat([q_rows @ c.detach().t(), s])
                    codes.append(sinkhorn(s, self.hp.epsilon, self.hp.sinkhorn_iterations)[-n:])
            codes = torch.stack(codes)
            if self.hp.hard_codes:  # each global crop's most likely prototype, as a one-hot target
                codes = F.one_hot(codes.argmax(-1), codes.shape[-1]).to(codes.dtype)
            loss = swav_loss(scores, codes, self.hp.temperature)
        self._new_z = z[:2 * n].detach().view(2, n, -1)
        with torch.no_grad():  # does every other crop's prediction pick the code's prototype?
            target = codes.argmax(-1)
            pred = scores.argmax(-1)
            hits = [(pred[v] == target[a]).float().mean() for a in range(2) for v in range(scores.shape[0]) if v != a]
            acc = torch.stack(hits).mean()
        return {"loss": loss, "pretext_acc": acc, "z_std": normalized_std(z[:n])}

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """Put ``z`` (2, N, D) at the front of the queue, dropping its N oldest rows."""
        L = self.hp.queue_length
        new = z[:, :L].to(self.queue.dtype)
        self.queue.copy_(torch.cat([new, self.queue[:, :L - new.shape[1]]], dim=1))
        self.queue_count.copy_(torch.clamp(self.queue_count + new.shape[1], max=L))

    def after_step(self, step, total_steps):
        self._step, self._total = step + 1, total_steps
        self.normalize_prototypes()
        started = step >= self.hp.queue_start_frac * total_steps
        if self._new_z is not None and self.hp.queue_length > 0 and started:
            self.enqueue(torch.cat([gather(v) for v in self._new_z]).view(2, -1, self._new_z.shape[-1]))
        self._new_z = None

    @torch.no_grad()
    def assign(self, images: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
        """The prototype of each uint8 NHWC image's deterministic view (argmax of its scores), on the CPU."""
        protos = self.prototypes.weight.float()
        return embed(self.backbone, images, self.cfg.aug, device, self.cfg.train.precision, batch_size,
                     head=lambda f: (F.normalize(self.projector(f).float(), dim=1) @ protos.t()).argmax(1))

    def figures(self, data, out_dir: Path, device) -> list[Path]:
        """``prototypes.png``: images of the most used prototypes, one row each."""
        images = sample_images(data, 512)
        labels = self.assign(images, device)
        return [members_grid(images, labels, self.hp.num_prototypes, out_dir / "prototypes.png",
                             f"SwAV: images assigned to the most used of {self.hp.num_prototypes} prototypes")]


def members_grid(images: np.ndarray, labels: torch.Tensor, k: int, path: Path, title: str, rows: int = 8,
                 cols: int = 10) -> Path:
    """A grid with one row per most frequent label: up to ``cols`` of its images (in order)."""
    sizes = torch.bincount(labels, minlength=k)
    top = [c for c in torch.argsort(sizes, descending=True, stable=True)[:rows].tolist() if sizes[c] > 0]
    grid = [images[(labels == c).nonzero().flatten()[:cols].numpy()] for c in top]
    return image_grid(grid, path, row_titles=[f"#{c}\nn={int(sizes[c])}" for c in top], title=title)

"""MoCo v2: contrast queries against a momentum key encoder's keys and a queue of past keys
(He, Fan, Wu, Xie & Girshick, CVPR 2020; Chen, Fan, Girshick & He 2020, "Improved baselines").

Algorithm 1 of the MoCo paper, symmetrised over the two views as solo-learn does::

    f_k.params = f_q.params                           # key encoder starts as a copy
    for minibatch x:
        x1, x2 = aug(x), aug(x)
        q1, q2 = f_q(x1), f_q(x2)                     # queries: encoder + 2-layer MLP head (v2), L2-normed
        k1, k2 = f_k(x1).detach(), f_k(x2).detach()   # keys: momentum encoder, no gradient
        loss = (InfoNCE(q1, k2, queue) + InfoNCE(q2, k1, queue)) / 2   # Eq. 1, temperature 0.2
        loss.backward(); update(f_q)                  # SGD on the query encoder only
        f_k.params = m * f_k.params + (1 - m) * f_q.params             # after_step, Eq. 2
        enqueue(queue, [k1; k2]); dequeue(queue)      # after_step: the 2B oldest keys make room

The queue is a ring buffer of ``queue_size`` L2-normalised keys (rows) with a write pointer, both
registered buffers (checkpointed, so a resumed run sees the same negatives). It starts as random unit
vectors, as in the reference code; each step writes the 2B new keys of both views at the pointer
(wrapping around) and advances it, so both halves of the symmetric loss share one queue of K
negatives (solo-learn keeps one queue per view). The keys are kept from ``training_step`` and enqueued in ``after_step``, after the
optimizer and momentum updates, in the order of Algorithm 1.

The momentum ``m`` follows a cosine from ``base_momentum`` to ``final_momentum`` (0.99 -> 0.999 as in
solo-learn's CIFAR recipe; set both to 0.999 for the paper's constant m). Differences from the paper:
no shuffling BN (single device; the reference uses it against BN leaking information between query
and key), and the symmetrised loss. Features for downstream tasks are the backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.views import two_views
from ..ema import cosine_momentum, ema_update, frozen_copy
from ..losses import infonce
from ..distributed import gather
from .base import Method, TwoViewFigures


class MoCoV2(TwoViewFigures, Method):
    name = "moco_v2"
    family = "joint-embedding"
    full_frame = True  # its views are random-resized crops only: of the whole frame
    summary = "MoCo v2 (Chen et al. 2020): momentum key encoder, queue of negatives, InfoNCE"
    views_per_image = 2

    @dataclass
    class Params:
        temperature: float = 0.2
        queue_size: int = 4096  # K negatives (paper: 65536 on ImageNet; 4096 suits 10^4-10^5 images)
        proj_hidden_dim: int = 2048  # MoCo v2 head: fc(2048) - ReLU - fc(128), no BatchNorm
        proj_dim: int = 128
        base_momentum: float = 0.99
        final_momentum: float = 0.999  # at any run length: the queue's keys must stay consistent (MoCo
        # Table 4: m = 0.9 costs most of the accuracy), so MoCo v2 does not lower m for short runs

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.queue_size < 1 or hp.temperature <= 0:
            from ..config import ConfigError

            raise ConfigError(f"moco_v2 needs params.queue_size >= 1 and params.temperature > 0, got "
                              f"{hp.queue_size} and {hp.temperature}")
        self.projector = nn.Sequential(nn.Linear(self.backbone.out_dim, hp.proj_hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hp.proj_hidden_dim, hp.proj_dim))
        # key encoder: a copy of the query encoder + head, moved by EMA only; in the state_dict
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(hp.queue_size, hp.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: torch.Tensor | None = None  # this step's keys, enqueued by after_step

    def prepare(self, images, generator):
        return self.fmt(two_views(images, self.cfg.aug, generator))

    def training_step(self, x):
        x1, x2 = x.chunk(2)
        q1 = F.normalize(self.projector(self.backbone(x1)).float(), dim=1)
        q2 = F.normalize(self.projector(self.backbone(x2)).float(), dim=1)
        with torch.no_grad():
            k1 = F.normalize(self.key_projector(self.key_backbone(x1)).float(), dim=1)
            k2 = F.normalize(self.key_projector(self.key_backbone(x2)).float(), dim=1)
        queue = self.queue.clone()  # the negatives of this step, before this step's keys are enqueued
        loss = (infonce(q1, k2, queue, self.hp.temperature) + infonce(q2, k1, queue, self.hp.temperature)) / 2
        self._new_keys = torch.cat([k1, k2])
        with torch.no_grad():  # does the positive key beat every negative in the queue?
            pos = torch.cat([(q1 * k2).sum(1), (q2 * k1).sum(1)])
            neg = torch.cat([q1, q2]) @ queue.t()
            acc = (pos > neg.max(dim=1).values).float().mean()
        return {"loss": loss, "pretext_acc": acc}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, D) at the pointer, wrapping around, and advance it (dequeue = overwrite
        the oldest). Index arithmetic stays on the device (no host synchronisation)."""
        k = self.queue.shape[0]
        if keys.shape[0] > k:  # more new keys than room: keep the last K
            keys = keys[-k:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % k
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % k)

    def after_step(self, step, total_steps):
        m = cosine_momentum(step, total_steps, self.hp.base_momentum, self.hp.final_momentum)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)
        if self._new_keys is not None:
            self.enqueue(gather(self._new_keys))  # distributed: every process enqueues the global batch's keys
            self._new_keys = None

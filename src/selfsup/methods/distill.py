"""Self-supervised distillation: a student network learns to reproduce a frozen teacher's view of
unlabeled images (SimCLR v2, Chen et al., NeurIPS 2020, arXiv 2006.10029, Sec. 2 "Self-training /
knowledge distillation via unlabeled examples"; the loss on embeddings is SEED, Fang, Wang, Wang,
Zhang, Yang & Liu, ICLR 2021, arXiv 2101.04731).

SimCLR v2 distils the *fine-tuned classifier's* predictions on unlabeled images (its Eq. 2)::

    L = - sum_x sum_y P_T(y | x; tau) log P_S(y | x; tau)        (selfsup.losses.distillation_loss)

A selfsup run has no classifier (``selfsup evaluate --protocol finetune`` does not save one), so the
"classes" here are instances, as in SEED: the teacher's softmax is its similarity distribution over
an instance set ``D+ = [z_T; queue]`` holding its own embedding and a queue of teacher embeddings of
past batches, and the student, through its own MLP head into the teacher's embedding space, matches
that distribution. Algorithm (SEED, Sec. 3 and its reference code)::

    T = the teacher run's encoder (backbone, + its projection head if it has one), frozen, eval mode
    for minibatch x:
        v   = aug(x)                                  # one view, the same for student and teacher
        z_S = normalize(head(f(v)))                   # student: backbone f (any, e.g. smaller) + MLP head
        z_T = normalize(T(v))                         # teacher embedding, no gradient
        p_T = softmax(z_T . D+ / tau_T)               # D+ = [z_T; queue]: (1 + K) instances
        p_S = softmax(z_S . D+ / tau_S)
        loss = - sum_j p_T[j] log p_S[j]              # selfsup.losses.seed_loss (= Eq. 2 over instances)
        loss.backward(); update(f, head)
        enqueue(queue, z_T)                           # after_step; the B oldest keys make room

The queue is filled once with the teacher's embeddings of training images (evenly spaced over the
data, evaluation view) before the first step, so no step sees random negatives (SEED's code starts
from random vectors). Features for downstream tasks are the student backbone's ``f(x)``.

The teacher: ``params.teacher`` is any selfsup run directory (or its ``checkpoints/last.pt``), loaded
with ``weights_only=True``; ``params.teacher_output`` chooses its embedding: ``"projector"`` (the
teacher method's projection head on top of its backbone, as SEED distils MoCo v2 / SimCLR's 128-d
output), ``"features"`` (its pooled backbone features: works for every method) or ``"auto"``
(projector when the run has one). The teacher sees the student's view in its own input format (its
normalisation, its image size, RGB or the L channel for a colorization teacher). It is frozen, kept
out of the optimizer and out of the student's checkpoint; the run's config stores its absolute path
and a resumed run reloads it from there (so the teacher run must stay where it was).

Defaults: SEED (ImageNet) uses tau_S = 0.2, a queue of 65536, SGD lr 0.03 per 256 images, weight
decay 1e-4, 200 epochs, and a near one-hot teacher (``--distill-t`` 1e-4 in the official code, where
the loss reduces to InfoNCE against the teacher's embedding). Here tau_T = 0.01, which keeps some of
the teacher's similarity structure (the soft targets of SimCLR v2's Eq. 2), a queue of 4096 for
10^4-10^5 images and MoCo v2's CIFAR optimizer (SGD lr 0.3 per 256, weight decay 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.views import augment, eval_view, normalize
from ..distributed import gather
from ..figures import image_grid, sample_batch, unnormalize
from ..losses import seed_logits, seed_loss
from .base import Method
from .moco_v2 import MoCoV2


@dataclass
class Teacher:
    net: nn.Module  # images in the teacher's input format -> embedding (B, dim)
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    input_mode: str  # "rgb" or "lab_l"
    output: str  # "projector" or "features"


def load_teacher(run: str, output: str = "auto") -> Teacher:
    """The frozen teacher of a distillation run (see the module docstring). Raises ``ConfigError`` for
    a missing teacher or an unknown ``output``. The global RNG is left untouched."""
    from ..checkpoint import load_checkpoint
    from ..config import ConfigError, restore_config
    from ..run import checkpoint_path, load_encoder
    from . import get_method

    if not run:
        raise ConfigError("distill needs a teacher: params.teacher=RUN_DIR (any selfsup run directory)")
    if output not in ("auto", "projector", "features"):
        raise ConfigError(f"params.teacher_output must be auto, projector or features, got '{output}'")
    try:
        path = checkpoint_path(run)
    except ConfigError:
        raise ConfigError(f"params.teacher: no checkpoint at {Path(run) / 'checkpoints' / 'last.pt'}; the teacher must "
                          f"be a selfsup run directory (or its checkpoint file)") from None
    with torch.random.fork_rng(devices=[]):
        enc = load_encoder(str(path))  # weights_only=True
        ckpt = load_checkpoint(path)
        has_projector = any(k.startswith("projector.") for k in ckpt["model"])
        if output == "projector" and not has_projector:
            raise ConfigError(f"the teacher {run} ('{ckpt['method']}') has no projection head; use "
                              f"params.teacher_output=features")
        use_projector = has_projector and output in ("auto", "projector")
        net: nn.Module = enc.backbone
        if use_projector:
            method = get_method(ckpt["method"])(restore_config(ckpt["config"]))
            method.load_state_dict(ckpt["model"])
            net = nn.Sequential(enc.backbone, method.projector)
    net.eval().requires_grad_(False)
    size = enc.spec["image_size"]
    with torch.no_grad():
        dim = net(torch.zeros(2, enc.spec["in_chans"], size, size)).shape[1]
    return Teacher(net, int(dim), tuple(enc.mean), tuple(enc.std), size, enc.input_mode,
                   "projector" if use_projector else "features")


class Distill(Method):
    name = "distill"
    family = "joint-embedding"
    summary = "Distillation (SimCLR v2; SEED, Fang et al. 2021): a student mimics a frozen run's similarity scores"
    views_per_image = 1

    @dataclass
    class Params:
        teacher: str = ""  # the teacher: a selfsup run directory or checkpoint file (required)
        teacher_output: str = "auto"  # projector | features | auto (projector when the teacher has one)
        temperature: float = 0.2  # tau_S, the student's softmax temperature (SEED: 0.2)
        teacher_temperature: float = 0.01  # tau_T (SEED's code: 1e-4, near one-hot; SimCLR v2: = tau_S)
        queue_size: int = 4096  # K teacher embeddings (SEED: 65536 on ImageNet)
        head_hidden_dim: int = 0  # student head Linear-ReLU-Linear; 0: the backbone's width (SEED)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from ..config import ConfigError

        hp = self.hp
        if hp.temperature <= 0 or hp.teacher_temperature <= 0 or hp.queue_size < 1:
            raise ConfigError(f"distill needs params.temperature > 0, teacher_temperature > 0 and queue_size >= 1, "
                              f"got {hp.temperature}, {hp.teacher_temperature} and {hp.queue_size}")
        teacher = load_teacher(hp.teacher, hp.teacher_output)
        # the run's config keeps the absolute path: a resumed run (or one started elsewhere) reloads it
        cfg.params["teacher"] = hp.teacher = str(Path(hp.teacher).resolve())
        # not a registered submodule: outside the state_dict (checkpoints), parameters() and train()
        object.__setattr__(self, "teacher", teacher)
        d = self.backbone.out_dim
        hidden = hp.head_hidden_dim or d
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, teacher.dim))
        self.register_buffer("queue", F.normalize(torch.randn(hp.queue_size, teacher.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.bool))
        self._new_keys: torch.Tensor | None = None

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .to(memory_format) move the teacher too
        out = super()._apply(fn, *args, **kwargs)
        if "teacher" in self.__dict__:
            self.teacher.net._apply(fn, *args, **kwargs)
        return out

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's (normalised) view in the teacher's input format."""
        t, aug = self.teacher, self.cfg.aug
        same_norm = (t.mean, t.std) == (tuple(aug.mean), tuple(aug.std))
        if t.input_mode == "rgb" and same_norm and t.image_size == x.shape[-1]:
            return x
        mean = torch.tensor(aug.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(aug.std, device=x.device).view(1, 3, 1, 1)
        raw = (x * std + mean).clamp(0, 1)  # back to [0, 1] RGB
        if raw.shape[-1] != t.image_size:
            raw = F.interpolate(raw, size=(t.image_size, t.image_size), mode="bilinear", align_corners=False,
                                antialias=True)
        if t.input_mode == "lab_l":
            from ..data.color import lightness

            return lightness(raw)
        return normalize(raw, t.mean, t.std)

    @torch.no_grad()
    def embed_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.teacher.net(x).float(), dim=1)

    @torch.no_grad()
    def on_epoch_start(self, run, epoch):
        """Before the first step: fill the queue with the teacher's embeddings of K training images,
        evenly spaced over the data (repeated when there are fewer than K), evaluation view."""
        if bool(self.queue_filled):
            return
        images = run.images
        n, k = len(images), self.queue.shape[0]
        idx = np.arange(k) * n // k if k <= n else np.arange(k) % n
        keys = []
        for i in range(0, k, 256):
            chunk = np.sort(np.unique(idx[i:i + 256]))
            x = torch.from_numpy(np.ascontiguousarray(images[chunk])).permute(0, 3, 1, 2).to(self.queue.device)
            z = self.embed_teacher(self.fmt(self.teacher_input(eval_view(x, self.cfg.aug))))
            keys.append(z[np.searchsorted(chunk, idx[i:i + 256])])
        self.queue.copy_(torch.cat(keys))
        self.queue_filled.fill_(True)

    def prepare(self, images, generator):
        x = augment(images, self.cfg.aug, generator)
        return self.fmt(x), self.fmt(self.teacher_input(x))

    def training_step(self, batch):
        x, x_teacher = batch
        z_s = self.head(self.backbone(x)).float()
        z_t = self.embed_teacher(x_teacher)
        queue = self.queue.clone()  # this step's instance set, before its keys are enqueued
        loss = seed_loss(z_s, z_t, queue, self.hp.temperature, self.hp.teacher_temperature)
        self._new_keys = z_t
        with torch.no_grad():  # does the student's most similar instance agree with the teacher's?
            agree = (seed_logits(z_s, z_t, queue).argmax(1) == seed_logits(z_t, z_t, queue).argmax(1)).float().mean()
        return {"loss": loss, "agree": agree}

    enqueue = MoCoV2.enqueue  # ring buffer: write at the pointer, wrap around

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        """``neighbours.png``, the task: among 256 sample images (evaluation view), the 5 nearest
        neighbours of a few queries by the teacher's embedding and by the student's (backbone + head),
        which the loss trains to agree; the title gives the top-1 neighbour agreement over all 256."""
        x = self.fmt(eval_view(sample_batch(data, 256, device), self.cfg.aug))
        z_t = self.embed_teacher(self.fmt(self.teacher_input(x)))
        z_s = F.normalize(self.head(self.backbone(x)).float(), dim=1)
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        k = min(5, len(x) - 1)
        nn_t = (z_t @ z_t.t()).masked_fill(eye, -2).topk(k, dim=1).indices
        nn_s = (z_s @ z_s.t()).masked_fill(eye, -2).topk(k, dim=1).indices
        agree = float((nn_t[:, 0] == nn_s[:, 0]).float().mean())
        rows, titles = [], []
        for q in range(0, min(48, len(x)), 8):  # 6 queries
            for who, nn_q in (("teacher", nn_t[q]), ("student", nn_s[q])):
                rows.append(unnormalize(torch.cat([x[q:q + 1], x[nn_q]]), self.cfg.aug))
                titles.append(f"image {q}\n{who}")
        return [image_grid(rows, Path(out_dir) / "neighbours.png", row_titles=titles,
                           col_titles=["query"] + [f"neighbour {i}" for i in range(1, k + 1)],
                           title=f"distill: nearest neighbours among 256 images by teacher and by student; "
                                 f"top-1 neighbour agrees for {agree:.0%}")]

    def after_step(self, step, total_steps):
        if self._new_keys is not None:
            self.enqueue(gather(self._new_keys))  # distributed: the global batch's teacher embeddings
            self._new_keys = None

"""Fine-tuning: the whole backbone plus a linear head, trained on a fraction of the labels.

The semi-supervised protocol of the SSL papers (SimCLR Table 7, BYOL Table 2: 1% / 10% of the
ImageNet labels): the pretrained backbone is not frozen, a linear head is put on its pooled features
and both are trained with cross-entropy on a class-balanced subset of the training labels
(``evaluate.fraction_subset``), then top-1 is measured on the test split. ``random:BACKBONE`` with
fraction 1.0 is the supervised-from-scratch baseline.

Recipe (one for every backbone, so methods are compared on equal terms):

* views: random resized crop (scale 0.5-1) + horizontal flip, through ``data.views.augment`` with a
  generator seeded per step (``runtime.step_generator``), in the input the backbone was trained on
  (``Encoder.input_mode``: RGB, or the L channel for colorization; ``data.views.augment_input``);
  testing uses the deterministic ``eval_input`` view;
* SGD, momentum 0.9, Nesterov, weight decay 5e-4, cosine decay to 0, batch 64 (FixMatch's settings);
  the head's lr is ``lr`` (0.03), the backbone's ``lr * backbone_lr_ratio``: 0.1 for a pretrained
  backbone (small updates keep the pretrained features while the random head settles; the usual
  fine-tuning practice) and 1.0 for ``random:`` backbones (nothing to preserve: a plain supervised run);
* bf16 autocast and channels_last, as in pretraining;
* length: ``steps`` optimizer steps if given, else ``epochs`` passes over the labeled subset if given;
  by default 30 epochs, but at least 500 and at most 10,000 steps (1% of CIFAR-10 is 8 steps an epoch
  at batch 64: 30 epochs would be 240). ``steps`` gives every fraction the same compute.

:func:`train_classifier` is the loop shared with the semi-supervised protocols (``semi.py``): it
draws the labeled batch (and, when given, a batch of unlabeled *images*, ``mu`` times larger), seeds
the step's augmentation generator and applies a ``step_loss`` function, which is where the protocols
differ.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.views import AugConfig, augment_input
from ..runtime import autocast, embed, grad_scaler, resolve_device
from ..runtime import step_generator
from .features import Encoder

log = logging.getLogger("selfsup")

DEFAULT_EPOCHS = 30
MIN_STEPS = 500
MAX_STEPS = 10_000

# step_loss(model, labeled uint8 images, their labels, unlabeled uint8 images or None, generator, step, total)
#   -> (loss, {name: tensor to record for this step})
StepLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Classifier(nn.Module):
    """A backbone and a linear head on its pooled features: images -> class logits."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def new_classifier(encoder: Encoder, num_classes: int, seed: int = 0) -> Classifier:
    """A copy of the encoder's backbone (the encoder is left untouched) with a fresh head (seeded)."""
    torch.manual_seed(seed)
    return Classifier(copy.deepcopy(encoder.backbone).cpu(), num_classes)


def weak_view(encoder: Encoder, crop_scale: tuple[float, float] = (0.5, 1.0)) -> AugConfig:
    """Random resized crop + flip, no colour ops, at the backbone's size and normalisation."""
    return AugConfig(size=encoder.spec["image_size"], crop_scale=crop_scale, jitter_p=0.0, gray_p=0.0,
                     blur_p=0.0, solarize_p=0.0, mean=encoder.mean, std=encoder.std)


def default_backbone_lr_ratio(encoder: Encoder) -> float:
    return 1.0 if encoder.name.startswith("random:") else 0.1


def count_steps(steps_per_epoch: int, epochs: int | None, steps: int | None = None) -> int:
    """``steps`` if given; else ``epochs`` passes if given; else ``DEFAULT_EPOCHS``, clamped to
    [MIN_STEPS, MAX_STEPS] steps."""
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return int(steps)
    if epochs is not None:
        return max(1, epochs * steps_per_epoch)
    return min(max(DEFAULT_EPOCHS * steps_per_epoch, MIN_STEPS), MAX_STEPS)


class IndexStream:
    """Endless batches of indices into ``n`` items: seeded random permutations back to back (a batch
    may straddle two epochs; with ``n < batch_size`` an item appears more than once in a batch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = torch.zeros(0, dtype=torch.long)

    def next(self) -> np.ndarray:
        while len(self.pending) < self.batch_size:
            self.pending = torch.cat([self.pending, torch.randperm(self.n, generator=self.generator)])
        idx, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        return idx.numpy()


def load_batch(images: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC images at ``idx`` -> ``(B, 3, H, W)`` (channels_last) on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images[idx])).permute(0, 3, 1, 2).to(device)


def train_classifier(model: Classifier, images: np.ndarray, labels: np.ndarray, step_loss: StepLoss, *,
                     unlabeled: np.ndarray | None = None, mu: int = 7, epochs: int | None = None,
                     steps: int | None = None, batch_size: int = 64, lr: float = 0.03, backbone_lr: float | None = None,
                     weight_decay: float = 5e-4, device: torch.device | str = "auto", precision: str = "auto",
                     seed: int = 0, name: str = "finetune") -> dict:
    """Train ``model`` in place; the shared loop of fine-tuning and the semi-supervised protocols.

    ``images``/``labels``: the labeled set (uint8 NHWC, int labels). ``unlabeled``: images only, drawn
    ``mu * batch_size`` per step. An epoch is a pass over the larger of the two streams. Each step
    calls ``step_loss(model, xl, yl, xu, generator, step, total)`` under autocast (``xl``/``xu`` uint8
    batches on the device, ``xu`` None without unlabeled data) and records the tensors it returns.
    Returns ``{"steps", "epochs", "lr", "backbone_lr", "batch_size", "weight_decay", "history"}`` with
    ``history[key]`` the records stacked over steps (on the CPU), incl. ``loss`` and, with unlabeled
    data, ``unlabeled_idx`` (which unlabeled images each step drew).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    backbone_lr = lr if backbone_lr is None else backbone_lr
    n_unlabeled = 0 if unlabeled is None else len(unlabeled)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    if n_unlabeled:
        steps_per_epoch = max(steps_per_epoch, math.ceil(n_unlabeled / (mu * batch_size)))
    total = count_steps(steps_per_epoch, epochs, steps)

    model.to(device).to(memory_format=torch.channels_last).train()
    groups = [{"params": list(model.backbone.parameters()), "lr": backbone_lr},
              {"params": list(model.head.parameters()), "lr": lr}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    labeled_stream = IndexStream(len(images), batch_size, seed)
    unlabeled_stream = IndexStream(n_unlabeled, mu * batch_size, seed + 1) if n_unlabeled else None

    scaler = grad_scaler(device, precision)
    records = []
    for step in range(total):
        idx = labeled_stream.next()
        xl, yl = load_batch(images, idx, device), y_all[idx].to(device)
        xu = uidx = None
        if unlabeled_stream is not None:
            uidx = unlabeled_stream.next()
            xu = load_batch(unlabeled, uidx, device)
        with autocast(device, precision):
            loss, record = step_loss(model, xl, yl, xu, step_generator(device, seed, step), step, total)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:  # fp16: scaled loss; a step whose gradients overflowed is skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
        record = {"loss": loss.detach(), **{k: v.detach() for k, v in record.items()}}
        if uidx is not None:
            record["unlabeled_idx"] = torch.from_numpy(uidx)
        records.append(record)
        if (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
            log.info("%s: step %d/%d loss %.4f", name, step + 1, total, float(record["loss"]))
    history = {k: torch.stack([r[k] for r in records]).cpu() for k in records[0]}
    return {"steps": total, "epochs": round(total / steps_per_epoch, 2), "lr": lr, "backbone_lr": backbone_lr,
            "batch_size": batch_size, "weight_decay": weight_decay, "history": history}


def supervised_loss(view: AugConfig, input_mode: str) -> StepLoss:
    """Cross-entropy on one augmented view of the labeled batch (unlabeled data, if any, unused)."""

    def step_loss(model, xl, yl, xu, generator, step, total):
        logits = model(augment_input(xl, view, generator, input_mode))
        return F.cross_entropy(logits.float(), yl), {}

    return step_loss


def finetune(encoder: Encoder, images: np.ndarray, labels: np.ndarray, num_classes: int, *,
             epochs: int | None = None, steps: int | None = None, batch_size: int = 64, lr: float = 0.03,
             backbone_lr_ratio: float | None = None, weight_decay: float = 5e-4,
             crop_scale: tuple[float, float] = (0.5, 1.0), device: torch.device | str = "auto",
             seed: int = 0) -> tuple[Classifier, dict]:
    """Fine-tune a copy of ``encoder``'s backbone + a linear head on the labeled ``images``.
    Returns the trained classifier and :func:`train_classifier`'s summary."""
    ratio = default_backbone_lr_ratio(encoder) if backbone_lr_ratio is None else backbone_lr_ratio
    model = new_classifier(encoder, num_classes, seed)
    info = train_classifier(model, images, labels, supervised_loss(weak_view(encoder, crop_scale), encoder.input_mode),
                            epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, backbone_lr=lr * ratio,
                            weight_decay=weight_decay, device=device, precision=encoder.precision, seed=seed)
    return model, info


def predict_logits(model: Classifier, encoder: Encoder, images: np.ndarray, device: torch.device | str = "auto",
                   batch_size: int = 512) -> torch.Tensor:
    """Class logits ``(N, C)`` (float32, CPU) of uint8 NHWC images through the deterministic view."""
    device = resolve_device(device) if isinstance(device, str) else device
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    return embed(model.to(device), images, view, device, encoder.precision, batch_size, encoder.input_mode)

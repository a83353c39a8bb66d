"""Optimizers and the learning-rate schedule: SGD, LARS, AdamW; linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, Alg. 1),
    as solo-learn implements it (``solo/utils/lars.py``), which the CIFAR presets cite.

    For each parameter ``w`` with gradient ``g`` and weight decay ``wd``::

        local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (paper Eq. 6)
        if clip: local_lr = min(local_lr / lr, 1)                 (solo-learn's clip_lr)
        v = momentum * v + local_lr * (g + wd * w)
        w = w - lr * v

    (where ``||w||`` or ``||g||`` is 0 the step is plain SGD on ``g``, as in solo-learn). Without the clip the step of every layer is about ``lr * eta * ||w||`` however small its
    gradient; with it a layer never moves faster than plain SGD at ``lr`` would move it (the
    adaptation only slows layers down). Every solo-learn CIFAR LARS recipe sets ``clip_lr: True``
    with ``eta = 0.02``; the papers (SimCLR, BYOL) use ``eta = 1e-3`` without a clip.

    Parameter groups with ``lars_exclude=True`` (biases and norm layers, as in SimCLR/BYOL and
    solo-learn's ``exclude_bias_n_norm``) skip the adaptation and the weight decay: plain SGD with
    momentum.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip: bool = True, eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    local = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group["clip"]:
                        local = torch.clamp(local / group["lr"], max=1.0) if group["lr"] > 0 else torch.ones_like(local)
                    scaled = (g.add(p, alpha=wd) if wd else g).mul(local)
                    g = torch.where((w_norm > 0) & (g_norm > 0), scaled, g)  # as solo-learn: a zero norm, no change
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    """The run's learning rate is ``cfg.lr * batch_size / 256`` (linear scaling rule, Goyal et al. 2017)."""
    lr = cfg.lr * batch_size / 256
    if cfg.name == "lars":
        return LARS(param_groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta,
                    clip=cfg.lars_clip)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in param_groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{cfg.name}'")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base rate at ``step`` (0-based): linear warm-up, then half a cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def backbone_factor(step: int, freeze_steps: int, ramp_steps: int) -> float:
    """Multiplier of the backbone's rate at ``step`` under ``optim.freeze_backbone_frac`` (on top of
    :func:`lr_factor`): 0 for the first ``freeze_steps`` steps (the trainer also drops the backbone's
    gradients then, so that neither momentum nor weight decay moves it), then a linear ramp to 1 over
    ``ramp_steps`` steps (the run's warm-up length), then 1.

    Why: at the start of a run the heads (projector, predictor, prototypes, ...) are random, and so are the
    first gradients they send into the backbone; the same reason as linear probing before fine-tuning
    (LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"), here for a random backbone
    whose features are already a strong baseline. Measured (5-minute CIFAR-10 BYOL on a fp32 machine,
    convnet, batch 128, kNN of kept checkpoints; ``benchmarks/results/trajectory_byol_fp32.json``): the
    random network's 0.423 falls to 0.361 in the first 40 steps, and the rest of the run climbs back to
    0.380 only (270 steps); with the backbone held for the first 30% of the run it is 0.423-0.431 from
    step 120 to the end (265 steps)."""
    if step < freeze_steps:
        return 0.0
    if freeze_steps <= 0 or ramp_steps <= 0:  # nothing held (a run too short for the fraction): no ramp
        return 1.0
    return min(1.0, (step - freeze_steps + 1) / ramp_steps)


def warmup_steps_for(cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length in steps, capped at 10% of the run so short runs are not all warm-up."""
    return min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps // 10)

"""Linear probe: a linear classifier trained on frozen, standardised features.

Features are extracted once (no augmentation), standardised with the training set's mean and std,
and a linear layer is trained with AdamW and a cosine schedule on the cross-entropy loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, batch_size: int = 256,
                 lr: float = 1e-3, weight_decay: float = 1e-4, min_steps: int = 500, seed: int = 0) -> dict:
    """Returns ``{"top1": test accuracy, "train_top1": training accuracy}``."""
    g = torch.Generator().manual_seed(seed)
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6) if len(train_features) > 1 else 1.0
    xtr = (train_features - mean) / std
    xte = (test_features - mean) / std
    n, d = xtr.shape
    head = torch.nn.Linear(d, num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = max(epochs * steps_per_epoch, min_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= total:
                break
    with torch.no_grad():
        train_top1 = float((head(xtr).argmax(1) == train_labels).float().mean())
        top1 = float((head(xte).argmax(1) == test_labels).float().mean())
    return {"top1": top1, "train_top1": train_top1}

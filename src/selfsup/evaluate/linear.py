"""Linear probe: a linear classifier trained on frozen, standardised features.

Features are extracted once (no augmentation), standardised with the training set's mean and std,
and a linear layer is trained with AdamW and a cosine schedule on the cross-entropy loss. The weight
decay is chosen on a validation split carved from the training set (``val_fraction``, stratified,
fixed seed; the selection probes train on at most 10,000 of the remaining images) among
``WEIGHT_DECAYS``; the probe is then retrained on the whole training set with it (AdamW, batch 1024,
50 epochs, cosine schedule).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)  # AdamW's decoupled decay; 1.0 is strong regularisation


def train_linear(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, min_steps: int = 500,
                 seed: int = 0, max_steps: int = 20_000) -> torch.nn.Linear:
    """A linear classifier on (already standardised) features."""
    g = torch.Generator().manual_seed(seed)
    n, d = train_features.shape
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = min(max(epochs * steps_per_epoch, min_steps), max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(train_features[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= total:
                break
    return head


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``fraction`` of every class (at least one sample of a class with two or
    more) goes to validation, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        val.append(members[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


@torch.no_grad()
def _accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 50, batch_size: int = 1024,
                 lr: float = 2e-3, weight_decays: tuple[float, ...] = WEIGHT_DECAYS, val_fraction: float = 0.1,
                 min_steps: int = 500, seed: int = 0, return_model: bool = False, select_max: int = 10_000):
    """Returns ``{"top1": test accuracy, "train_top1", "weight_decay": chosen, "val_top1": {wd: acc}}``.
    With a single weight decay (or too few samples for a validation split) no selection is made.
    With ``return_model`` returns ``(result, predict)``: ``predict(features) -> logits`` applies the
    training standardisation and the trained head to new (e.g. corrupted) features; its attributes
    ``head``, ``mean`` and ``std`` are those pieces."""
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6) if len(train_features) > 1 else 1.0
    xtr = (train_features - mean) / std
    xte = (test_features - mean) / std
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, min_steps=min_steps, seed=seed)
    val_scores: dict[str, float] = {}
    wd = weight_decays[0]
    tr_idx, val_idx = stratified_split(train_labels.numpy(), val_fraction, seed)
    if len(tr_idx) > select_max:  # the selection probes train on a fixed random subset (speed)
        tr_idx = np.sort(np.random.default_rng(seed).choice(tr_idx, select_max, replace=False))
    if len(weight_decays) > 1 and len(val_idx) > 0:
        ti, vi = torch.from_numpy(tr_idx), torch.from_numpy(val_idx)
        for w in weight_decays:
            head = train_linear(xtr[ti], train_labels[ti], num_classes, weight_decay=w, **kw)
            val_scores[str(w)] = _accuracy(head, xtr[vi], train_labels[vi])
        wd = float(max(val_scores, key=lambda k: (val_scores[k], -float(k))))  # ties: the weaker decay
    head = train_linear(xtr, train_labels, num_classes, weight_decay=wd, **kw)
    result = {"top1": _accuracy(head, xte, test_labels), "train_top1": _accuracy(head, xtr, train_labels),
              "weight_decay": wd, "val_top1": val_scores}
    if not return_model:
        return result

    @torch.no_grad()
    def predict(features: torch.Tensor) -> torch.Tensor:
        return head((features - mean) / std)

    predict.head, predict.mean, predict.std = head, mean, std  # what a kept classifier saves
    return result, predict

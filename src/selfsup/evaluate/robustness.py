"""Robustness: the linear probe trained on clean features, tested on corrupted test images.

For each corruption of :mod:`selfsup.evaluate.corruptions` and severity 1..5 the test images (a
class-balanced subset of at most ``max_test``, fixed seed, the same for every run) are corrupted
with a generator seeded by (seed, corruption, severity), quantised back to uint8 as stored
corruption benchmarks are, embedded, and classified by the clean probe. Reported: clean top-1, the
top-1 per corruption and severity, the mean per corruption, and ``top1`` = the mean over all
corruptions and severities (CIFAR-10-C's "corruption accuracy").
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .corruptions import CORRUPTIONS, corrupt
from .features import Encoder, extract_features
from .linear import linear_probe

log = logging.getLogger("selfsup")


def corrupted_uint8(images: np.ndarray, name: str, severity: int, seed: int = 0, batch_size: int = 500) -> np.ndarray:
    """Corrupt uint8 NHWC images; returns uint8 NHWC (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed * 1000 + CORRUPTIONS.index(name) * 10 + severity)
    out = np.empty_like(images)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float() / 255
        y = corrupt(x, name, severity, g)
        out[i:i + batch_size] = (y * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def robustness(encoder: Encoder, train_features: torch.Tensor, train_labels: torch.Tensor, test_images: np.ndarray,
               test_labels: torch.Tensor, num_classes: int, device, seed: int = 0,
               corruptions: tuple[str, ...] = CORRUPTIONS) -> dict:
    clean = extract_features(encoder, test_images, device)
    res, predict = linear_probe(train_features, train_labels, clean, test_labels, num_classes, seed=seed,
                                return_model=True)
    per: dict[str, dict[str, float]] = {}
    for name in corruptions:
        per[name] = {}
        for sev in range(1, 6):
            feats = extract_features(encoder, corrupted_uint8(test_images, name, sev, seed), device)
            per[name][str(sev)] = float((predict(feats).argmax(1) == test_labels).float().mean())
        log.info("robustness: %-15s %s", name, " ".join(f"{v:.3f}" for v in per[name].values()))
    means = {name: float(np.mean(list(v.values()))) for name, v in per.items()}
    return {"top1": float(np.mean(list(means.values()))), "clean_top1": res["top1"], "corruptions": means,
            "per_severity": per, "weight_decay": res["weight_decay"]}

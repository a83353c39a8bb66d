"""Weighted k-nearest-neighbour classification on frozen features.

As in InstDisc (Wu et al. 2018, Sec. 3.4): cosine similarity ``s_i`` to the k nearest training
features, each neighbour votes for its class with weight ``exp(s_i / T)``; k=200, T=0.1 by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of every test feature (``k`` is capped at the number of training samples)."""
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    preds = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.1) -> float:
    preds = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((preds == test_labels).float().mean())

"""Retrieval: rank the training (gallery) images by cosine similarity to each test (query) image and
score the ranking by labels: precision@k (the fraction of the k nearest with the query's label) and
mean average precision over the whole gallery (AP = mean of precision@rank over the ranks of the
relevant items)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def retrieval_scores(gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor,
                     query_labels: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10, 20), chunk: int = 512) -> dict:
    """``{"precision@k": ..., "map": ...}`` averaged over the queries."""
    g = F.normalize(gallery.float(), dim=1)
    q = F.normalize(queries.float(), dim=1)
    ks = tuple(k for k in ks if k <= len(g))
    prec = {k: 0.0 for k in ks}
    ap_sum = 0.0
    ranks = torch.arange(1, len(g) + 1, dtype=torch.float32)
    for i in range(0, len(q), chunk):
        sim = q[i:i + chunk] @ g.t()
        order = sim.argsort(dim=1, descending=True, stable=True)
        rel = (gallery_labels[order] == query_labels[i:i + chunk, None]).float()  # (c, N) relevance by rank
        for k in ks:
            prec[k] += float(rel[:, :k].mean(1).sum())
        hits = rel.cumsum(1)
        n_rel = rel.sum(1)
        ap = (hits / ranks * rel).sum(1) / n_rel.clamp_min(1)
        ap_sum += float(ap.sum())
    n = max(1, len(q))
    return {**{f"precision@{k}": prec[k] / n for k in ks}, "map": ap_sum / n}

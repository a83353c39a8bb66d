"""Losses as pure functions on tensors, each citing the equation it implements."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020, Eq. 1).

    ``z1[i]`` and ``z2[i]`` are the projections of two views of image ``i``. For each of the 2N views,
    the positive is the other view of the same image and the 2(N-1) views of other images are the
    negatives::

        l(i, j) = -log( exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t) )

    with cosine similarity ``sim``; the loss is the mean of ``l`` over all 2N anchors.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # k != i
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)

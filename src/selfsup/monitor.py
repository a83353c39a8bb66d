"""Label-free health of a run: is the representation collapsing?

Once per epoch the trainer embeds a fixed subset of the training images (no augmentation) with the
backbone and computes, on the L2-normalised features ``z`` (N x d):

* ``feat_std``: the per-dimension standard deviation over the samples, averaged over dimensions.
  A healthy embedding spread over the sphere has about ``1/sqrt(d)``; complete collapse (every image
  mapped to the same point) gives 0 (the SimSiam paper, Sec. 4.1, monitors the same quantity).
* ``rankme``: the effective rank of the feature matrix (Garrido et al. 2023, "RankMe", Eq. 1):
  ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum_j s_j + eps`` over its singular values ``s_k``.
  It lies between 1 (collapse to a line) and ``min(N, d)``; dimensional collapse shows as a small
  rank.

Both are logged in ``metrics.csv`` (columns ``feat_std`` and ``rankme``, filled on the last row of
each epoch). Two warnings:

* complete collapse: ``feat_std`` below :data:`STD_COLLAPSE` of the healthy ``1/sqrt(d)``, or a rank
  below :data:`RANK_COLLAPSE`;
* dimensional collapse (low rank): ``rankme`` below :data:`LOW_RANK` (5%) of ``min(N, d)``. Calibrated
  on the convnet runs of the one-epoch CIFAR-10 table (d = 256, N = 512): the runs whose features
  ended below random init had an effective rank of 6 (SwAV) and 11 (BYOL), the healthy ones 36-102;
  5% of 256 is 12.8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STD_COLLAPSE = 0.1  # warn when feat_std < 0.1 / sqrt(d)
RANK_COLLAPSE = 2.0  # warn when the effective rank is below 2
LOW_RANK = 0.05  # warn when the effective rank is below 5% of min(N, d)


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """The std over the batch of ``z / ||z||``, averaged over dimensions (SimSiam, Sec. 4.1): 0 for a
    collapsed (constant) output, about ``1/sqrt(d)`` for well spread outputs. A tensor (no host sync),
    so methods can log it every step."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


def feature_std(features: torch.Tensor) -> float:
    return float(normalized_std(features))


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_health(features: torch.Tensor) -> dict[str, float]:
    """``feat_std`` and ``rankme`` of the L2-normalised rows of ``features`` (N x d), and ``n``."""
    z = F.normalize(features.float(), dim=1)
    return {"feat_std": feature_std(z), "rankme": rankme(z), "n": len(z)}


def collapse_warning(health: dict[str, float], dim: int) -> str | None:
    """A message when the embedding looks collapsed (completely, or to a few dimensions), else None."""
    healthy = 1 / math.sqrt(dim)
    if health["feat_std"] < STD_COLLAPSE * healthy or health["rankme"] < RANK_COLLAPSE:
        return (f"the representation is collapsing: feature std {health['feat_std']:.2e} (healthy ~{healthy:.2e}), "
                f"effective rank {health['rankme']:.2f}; lower the learning rate, check the augmentations, or "
                f"for methods without negatives check the predictor / stop-gradient / momentum settings")
    full = min(int(health.get("n", dim)), dim)
    if health["rankme"] < LOW_RANK * full:
        return (f"the representation is collapsing to a few dimensions: effective rank {health['rankme']:.1f} of "
                f"{full} (healthy runs: 15-40%; below {LOW_RANK:.0%} the features were worse than random init in "
                f"short CIFAR-10 runs); try a lower learning rate or LARS with optim.lars_clip=true, a lower "
                f"EMA momentum for short runs, or stronger augmentations")
    return None

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

    Distributed training (``selfsup.distributed``): the anchors are this process's 2n views and the
    candidates the global batch's 2N views, all-gathered with gradients; the mean of this loss over
    processes is the single-process loss of the global batch, and so are the averaged gradients.
    """
    from .distributed import gather, rank

    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    anchors = torch.cat([z1, z2])  # (2n, D), local
    candidates = torch.cat([gather(z1), gather(z2)])  # (2N, D), global: [views 1 of all; views 2 of all]
    big_n = candidates.shape[0] // 2
    offset = rank() * n
    mine = torch.cat([torch.arange(offset, offset + n), torch.arange(big_n + offset, big_n + offset + n)]).to(z1.device)
    logits = anchors @ candidates.t() / temperature
    logits[torch.arange(2 * n, device=z1.device), mine] = float("-inf")  # k != i
    targets = torch.cat([mine[n:], mine[:n]])  # the other view of the same image
    return F.cross_entropy(logits, targets)


# --------------------------------------------------------------------------------------------------
# joint-embedding losses: MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg. Each computes in float32
# whatever the input dtype and even under autocast (the training step runs under bf16 autocast, which
# would otherwise run the matmuls below in bf16: ~3 significant digits for C_ii ~ 1 or a logit / 0.2).


from functools import wraps  # noqa: E402  (this section was appended to the module)


def _float32(loss_fn):
    """Run ``loss_fn`` with autocast disabled on the device of its first tensor argument."""

    @wraps(loss_fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


@_float32
def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE with a queue of negatives, MoCo (He et al. 2020, Eq. 1 and Algorithm 1).

    ``q`` (N, D) are the queries, ``k`` (N, D) their positive keys and ``queue`` (K, D) the negative
    keys. All three are L2-normalised here, so the logits are cosine similarities::

        l_pos = q . k+                  (N, 1)
        l_neg = q . queue^T             (N, K)
        L_q   = -log( exp(l_pos/t) / (exp(l_pos/t) + sum_K exp(l_neg/t)) )

    i.e. a (K+1)-way cross entropy whose label is 0 (the positive), averaged over the N queries.
    Keys and queue are constants (stop-gradient): in MoCo they come from the momentum encoder.
    """
    if q.shape != k.shape or q.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"infonce expects q, k of shape (N, D) and queue (K, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(queue.shape)}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    negatives = F.normalize(queue.detach().float(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ negatives.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@_float32
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, Eq. 2), averaged over the batch::

        L = || p/||p|| - sg(z)/||sg(z)|| ||^2 = 2 - 2 cos(p, sg(z))

    ``p`` is the online prediction of one view, ``z`` the target projection of the other view;
    ``z`` gets no gradient (stop-gradient). The symmetrised loss of the paper is
    ``byol_loss(p1, z2) + byol_loss(p2, z1)``.
    """
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


@_float32
def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's negative cosine similarity with stop-gradient (Chen & He 2021, Eq. 1, Algorithm 1)::

        D(p, z) = - (p/||p||) . (sg(z)/||sg(z)||)

    averaged over the batch; ``z`` gets no gradient. The paper's loss is
    ``simsiam_loss(p1, z2) / 2 + simsiam_loss(p2, z1) / 2`` (Eq. 4), minimum -1.
    """
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


@_float32
def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins' cross-correlation matrix (Zbontar et al. 2021, Eq. 2), (D, D)::

        C_ij = sum_b z1_bi z2_bj / ( sqrt(sum_b z1_bi^2) sqrt(sum_b z2_bj^2) )

    of the embeddings normalised along the batch: each dimension is centred and divided by its
    (biased) standard deviation, ``sqrt(var + eps)`` as a BatchNorm without affine parameters does in
    the reference implementation, then ``C = z1n^T z2n / N``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")

    def standardise(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        z = z - z.mean(dim=0)
        return z / torch.sqrt(z.pow(2).mean(dim=0) + eps)

    return standardise(z1).t() @ standardise(z2) / z1.shape[0]


@_float32
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, Eq. 1)::

        L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2

    with ``C = cross_correlation(z1, z2)`` (Eq. 2): the invariance term pulls the diagonal to 1, the
    redundancy-reduction term pushes the off-diagonal to 0. ``lambda`` = 5e-3 in the paper (0.0051 in
    the reference code). Zero exactly when C is the identity.
    """
    c = cross_correlation(z1, z2)
    diag = torch.diagonal(c)
    on_diag = (1 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag


def _vicreg_variance(z: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """v(Z) = 1/d sum_j max(0, gamma - S(z^j, eps)), S(x, eps) = sqrt(Var(x) + eps) (VICReg Eq. 1-2);
    Var is the unbiased variance over the batch, as in the reference code."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def _vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """c(Z) = 1/d sum_{i != j} C(Z)_ij^2, C(Z) = 1/(n-1) sum_i (z_i - zbar)(z_i - zbar)^T (VICReg Eq. 3-4)."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.t() @ z / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


@_float32
def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, gamma: float = 1.0,
                eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes, Ponce & LeCun, ICLR 2022, Eq. 1-6). Returns ``(total, parts)``::

        total = lambda * s(Z, Z') + mu * [v(Z) + v(Z')] + nu * [c(Z) + c(Z')]       (Eq. 6)

    * invariance ``s``: the mean squared error between the two embeddings (Eq. 5). Like the reference
      implementation (and solo-learn) it is averaged over the d dimensions as well as the batch
      (``F.mse_loss``); the default weights 25/25/1 were tuned with that normalisation.
    * variance ``v``: hinge on the standard deviation of each dimension over the batch (Eq. 1-2),
      target ``gamma`` = 1, ``eps`` = 1e-4; zero when every dimension has std >= gamma.
    * covariance ``c``: sum of the squared off-diagonal covariances, divided by d (Eq. 3-4).

    ``parts`` holds the unweighted terms: ``{"invariance": s, "variance": v(Z) + v(Z'),
    "covariance": c(Z) + c(Z')}``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance = _vicreg_variance(z1, gamma, eps) + _vicreg_variance(z2, gamma, eps)
    covariance = _vicreg_covariance(z1) + _vicreg_covariance(z2)
    total = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return total, {"invariance": invariance, "variance": variance, "covariance": covariance}

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


def vicreg_multicrop_loss(zs: list[torch.Tensor], n_global: int = 2, sim_weight: float = 25.0,
                          var_weight: float = 25.0, cov_weight: float = 1.0, gamma: float = 1.0,
                          eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg over multi-crop views (the multi-crop of Caron et al. 2020, Sec. 3.2, applied to VICReg's
    terms): ``zs`` are the embeddings of V crops of the same N images, the first ``n_global`` of them
    the large views. Every large view is paired with every other view, as SwAV and DINO pair them::

        s = mean over pairs (a < n_global, v != a) of mse(Z_a, Z_v)
        v = 2/V sum_v v(Z_v);   c = 2/V sum_v c(Z_v)          # the per-view terms of Eq. 1-4
        total = lambda * s + mu * v + nu * c

    The per-view terms are averaged and scaled by 2 so that two views give exactly :func:`vicreg_loss`
    (tested); ``parts`` as there."""
    if len(zs) < 2 or not 1 <= n_global <= len(zs) or any(z.shape != zs[0].shape or z.dim() != 2 for z in zs):
        raise ValueError(f"expected at least two (N, D) tensors of equal shape and 1 <= n_global <= {len(zs)}")
    zs = [z.float() for z in zs]
    pairs = [(a, v) for a in range(n_global) for v in range(len(zs)) if v != a]
    invariance = sum(F.mse_loss(zs[a], zs[v]) for a, v in pairs) / len(pairs)
    scale = 2.0 / len(zs)
    variance = scale * sum(_vicreg_variance(z, gamma, eps) for z in zs)
    covariance = scale * sum(_vicreg_covariance(z) for z in zs)
    total = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return total, {"invariance": invariance, "variance": variance, "covariance": covariance}


# --------------------------------------------------------------------------------------------------
# masked image modelling: MAE


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch (last dim: its p*p*C pixels) minus its mean, divided by ``sqrt(var + eps)``: MAE's
    normalised-pixel target (He et al. 2022, Sec. 3 "Reconstruction target"; the unbiased variance,
    as ``target.var(-1)`` in the reference code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


@_float32
def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction loss (He et al., CVPR 2022, Sec. 3): the mean squared error in pixel space
    between predicted and true patches, computed on the masked patches only::

        t    = normalize_patches(target) if norm_pix else target     # (B, N, P)
        L    = sum_{b,n} mask[b,n] * mean_P (pred[b,n] - t[b,n])^2 / sum_{b,n} mask[b,n]

    ``pred`` and ``target`` are ``(B, N, P)`` patch sequences (see ``methods.mae.patchify``), ``mask``
    ``(B, N)`` is 1 on the masked (removed) patches and 0 on the visible ones, whose predictions do
    not enter the loss. Computed in float32."""
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        target = normalize_patches(target, eps)
    per_patch = (pred - target).square().mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------------
# MoCo v3 and distillation (SimCLR v2 Sec. 2, SEED)


@_float32
def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """``ctr(q, k)`` of MoCo v3 (Chen, Xie & He 2021, Algorithm 1), scaled by ``2 tau`` as in the
    official code::

        logits = normalize(q) @ normalize(k)^T / tau      (N, N): the keys of the batch are the candidates
        ctr    = 2 tau * CrossEntropy(logits, labels = [0, 1, ..., N-1])   # positives on the diagonal

    The keys come from the momentum encoder and get no gradient. Distributed training
    (``selfsup.distributed``): the candidates are the keys of the global batch (all-gathered) and the
    label of local query ``i`` is ``rank * n + i``; the mean of this loss over processes is the
    single-process loss of the global batch. MoCo v3's loss is ``ctr(q1, k2) + ctr(q2, k1)``.
    """
    from .distributed import gather, rank

    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"moco_v3_loss expects q and k of equal shape (N, D), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    n = q.shape[0]
    q = F.normalize(q.float(), dim=1)
    keys = gather(F.normalize(k.detach().float(), dim=1))  # (N_global, D), no gradient
    logits = q @ keys.t() / temperature
    labels = torch.arange(n, device=q.device) + rank() * n
    return F.cross_entropy(logits, labels) * (2 * temperature)


@_float32
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      teacher_temperature: float | None = None) -> torch.Tensor:
    """Knowledge distillation on unlabeled data, SimCLR v2 (Chen et al. 2020, Sec. 2, Eq. 2)::

        L = - sum_y P_T(y | x; tau_T) log P_S(y | x; tau_S),   P(y | x; tau) = softmax(logits / tau)_y

    averaged over the batch: the cross entropy of the student's softmax against the teacher's (equal
    to KL(P_T || P_S) plus the teacher's entropy, a constant). ``teacher_temperature`` defaults to
    ``temperature`` (SimCLR v2 uses one tau for both). The teacher's logits get no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: logits of different shapes {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    t_t = temperature if teacher_temperature is None else teacher_temperature
    p_teacher = F.softmax(teacher_logits.detach().float() / t_t, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(p_teacher * log_p_student).sum(dim=-1).mean()


def seed_logits(z: torch.Tensor, z_teacher: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """Similarities of the L2-normalised ``z`` (N, D) to SEED's instance set ``D+ = [z_T; queue]``
    (Fang et al. 2021, Eq. 2-3): column 0 is the sample's own teacher embedding ``z_T`` (N, D),
    columns 1..K the queue of past teacher embeddings (K, D). Returns (N, 1 + K)."""
    z, zt = F.normalize(z.float(), dim=1), F.normalize(z_teacher.detach().float(), dim=1)
    bank = F.normalize(queue.detach().float(), dim=1)
    return torch.cat([(z * zt).sum(dim=1, keepdim=True), z @ bank.t()], dim=1)


@_float32
def seed_loss(z_student: torch.Tensor, z_teacher: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2,
              teacher_temperature: float = 0.01) -> torch.Tensor:
    """SEED, self-supervised distillation (Fang, Wang, Wang, Zhang, Yang & Liu, ICLR 2021, Eq. 2-4):
    the student mimics the teacher's similarity distribution over an instance queue::

        p_T = softmax( z_T . D+ / tau_T ),   p_S = softmax( z_S . D+ / tau_S ),   D+ = [z_T; queue]
        L   = - sum_j p_T[j] log p_S[j]                    (averaged over the batch)

    with every embedding L2-normalised and the queue holding teacher embeddings of past batches. It is
    :func:`distillation_loss` (SimCLR v2's Eq. 2) with the instances of ``D+`` as the "classes"."""
    if z_student.shape != z_teacher.shape or queue.dim() != 2 or queue.shape[1] != z_student.shape[1]:
        raise ValueError(f"seed_loss expects z_student, z_teacher (N, D) and queue (K, D), got "
                         f"{tuple(z_student.shape)}, {tuple(z_teacher.shape)} and {tuple(queue.shape)}")
    return distillation_loss(seed_logits(z_student, z_teacher, queue), seed_logits(z_teacher, z_teacher, queue),
                             temperature, teacher_temperature)


# --------------------------------------------------------------------------------------------------
# clustering / self-distillation losses: SwAV (Sinkhorn codes, swapped prediction) and DINO


@_float32
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's codes (Caron et al. 2020, Eq. 3 and Algorithm 1's ``distributed_sinkhorn``): the
    soft assignment ``Q`` of ``B`` samples to ``K`` prototypes that maximises
    ``Tr(Q^T C^T Z) + epsilon H(Q)`` over the transportation polytope where every prototype gets
    ``B/K`` of the mass (equipartition) and every sample a mass of 1::

        Q = exp(scores / epsilon)^T                     # (K, B), scores = z . c (cosines)
        Q /= sum(Q)
        repeat `iterations` times:                      # Sinkhorn-Knopp
            Q /= sum_b Q  (rows);    Q /= K             # each prototype: total mass 1/K
            Q /= sum_k Q  (columns); Q /= B             # each sample:    total mass 1/B
        return (B * Q)^T                                # (B, K), every row sums to 1

    ``scores`` (n, K) are this process's samples. Distributed (``selfsup.distributed``): the sums
    over the batch (the total and the row sums) are all-reduced and ``B`` is the global batch size,
    exactly as the official code does, so W processes x n samples give the codes of one process with
    the W n samples. Numerics: the scores' maximum (all-reduced) is subtracted first (a constant factor
    that the first normalisation removes) and the iterations run in float64, so that for cosine scores
    ``exp`` neither overflows nor underflows to a prototype row of zeros (0/0) down to epsilon ~ 0.003
    (float32 fails below ~0.02). Returns float32 codes, without gradient.
    """
    from . import distributed

    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects (B, K) scores, got {tuple(scores.shape)}")

    def all_reduce(t: torch.Tensor, maximum: bool = False) -> torch.Tensor:
        if distributed.is_distributed():
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)
        return t

    scores = scores.detach().double()
    q = torch.exp((scores - all_reduce(scores.max().clone(), maximum=True)) / epsilon).t()  # (K, n)
    k, b = q.shape[0], q.shape[1] * distributed.world_size()
    q /= all_reduce(q.sum())
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t().float()


@_float32
def swav_loss(scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction with multi-crop (Caron et al. 2020, Eq. 1-2 and Eq. 4)::

        l(z_v, q_a) = - sum_k q_a^(k) log p_v^(k),    p_v = softmax(z_v . C / temperature)
        L = 1/A sum_{a < A} 1/(V - 1) sum_{v != a} mean_batch l(z_v, q_a)

    ``scores`` (V, n, K) are the prototype scores ``z . c`` of all V crops of n images, the A crops
    that get codes first (the global views); ``codes`` (A, n, K) are their Sinkhorn codes
    (:func:`sinkhorn`), constants: each code is predicted from every other crop of its image.
    """
    if scores.dim() != 3 or codes.dim() != 3 or codes.shape[1:] != scores.shape[1:] or codes.shape[0] > scores.shape[0]:
        raise ValueError(f"swav_loss expects scores (V, n, K) and codes (A <= V, n, K), got {tuple(scores.shape)} "
                         f"and {tuple(codes.shape)}")
    n_views, n_codes = scores.shape[0], codes.shape[0]
    if n_views < 2:
        raise ValueError("swav_loss needs at least two crops per image")
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)
    codes = codes.detach().float()
    total = scores.new_zeros((), dtype=torch.float32)
    for a in range(n_codes):
        others = [v for v in range(n_views) if v != a]
        total = total - (codes[a] * log_p[others]).sum(-1).mean(-1).sum() / len(others)
    return total / n_codes


@_float32
def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO's self-distillation cross-entropy (Caron et al. 2021, Eq. 1-2 and Algorithm 1)::

        P_t = softmax((g_t(x_a) - C) / tau_t)           # teacher: centred, sharpened (tau_t ~ 0.04-0.07)
        P_s = softmax(g_s(x_v) / tau_s)                 # student, tau_s = 0.1
        L = mean over pairs (a < G, v != a) of  mean_batch  - sum_k P_t^(k) log P_s^(k)

    ``student`` (V, n, K) are the student's outputs for all V crops of n images, the G global crops
    first in the order of ``teacher`` (G, n, K), the teacher's outputs for the global crops only;
    ``center`` (K,) or (1, K). Every teacher view is predicted from every other student view:
    G (V - 1) pairs. The teacher gets no gradient (stop-gradient).
    """
    if student.dim() != 3 or teacher.dim() != 3 or teacher.shape[1:] != student.shape[1:] \
            or teacher.shape[0] > student.shape[0]:
        raise ValueError(f"dino_loss expects student (V, n, K) and teacher (G <= V, n, K), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    log_ps = F.log_softmax(student.float() / student_temp, dim=-1)
    pt = F.softmax((teacher.detach().float() - center.detach().float().reshape(1, 1, -1)) / teacher_temp, dim=-1)
    total, pairs = student.new_zeros((), dtype=torch.float32), 0
    for a in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v != a:
                total = total - (pt[a] * log_ps[v]).sum(-1).mean()
                pairs += 1
    return total / pairs


# --------------------------------------------------------------------------------------------------
# many-patch coding rate: EMP-SSL


@_float32
def total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """R(Z) = 1/2 logdet(I_d + d / (m eps) Z^T Z) of ``m`` embeddings ``z`` ``(m, d)`` (EMP-SSL, Tong et
    al. 2023, Eq. 2, after MCR^2, Yu et al. 2020); as the reference code, ``eps`` divides directly
    (the paper writes eps^2). Computed as logdet(I_m + d / (m eps) Z Z^T) when m < d (Sylvester's
    determinant identity: the same value, a smaller matrix)."""
    m, d = z.shape
    z = z.float()
    gram = z @ z.T if m < d else z.T @ z
    eye = torch.eye(gram.shape[0], device=z.device, dtype=z.dtype)
    return 0.5 * torch.logdet(eye + (d / (m * eps)) * gram)


@_float32
def emp_ssl_loss(z: torch.Tensor, sim_weight: float = 200.0, tcr_weight: float = 1.0,
                 eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EMP-SSL (Tong, Chen, Ma & LeCun 2023, Eq. 4) on ``z`` ``(n, B, d)``: ``n`` patches of each of ``B``
    images, embeddings L2-normalised. With ``zbar`` the mean of an image's ``n`` embeddings::

        loss = - tcr_weight * 1/n sum_i R(Z_i) - sim_weight * 1/n sum_i 1/B sum_b cos(z_ib, zbar_b)

    ``Z_i`` is patch ``i`` of every image (the reference computes R per patch chunk), ``zbar`` is not
    detached (as the reference). ``parts``: ``{"invariance": mean cosine, "tcr": mean R}``."""
    if z.dim() != 3:
        raise ValueError(f"expected (n_patches, batch, dim) embeddings, got {tuple(z.shape)}")
    z = z.float()
    zbar = z.mean(0, keepdim=True)
    invariance = F.cosine_similarity(z, zbar.expand_as(z), dim=-1).mean()
    tcr = torch.stack([total_coding_rate(zi, eps) for zi in z]).mean()
    return -tcr_weight * tcr - sim_weight * invariance, {"invariance": invariance, "tcr": tcr}

"""k-means and PCA whitening in plain torch, batched, on the CPU or a GPU (DeepCluster's clustering step).

What DeepCluster does to the features of the whole dataset before each epoch (Caron et al. 2018,
Sec. 3.2 and 4; the reference code uses Faiss)::

    x = pca_whiten(features, 256)            # PCA to 256 dims with whitening
    x = x / ||x||                            # then L2-normalise
    centroids, labels = kmeans(x, k, 20)     # 20 Lloyd iterations

:func:`kmeans` is Lloyd's algorithm with the point-to-centroid distances as one matrix product per
chunk of points (``x.c - ||c||^2 / 2``; ``||x||^2`` does not change the argmin), the centroid sums by
``index_add_`` on the CPU and by a one-hot matrix product on CUDA (deterministic, unlike CUDA's
atomic ``index_add_``), so the same generator gives the same clustering run after run. Its randomness
(initial centroids, split directions) comes only from the ``generator`` passed in, drawn on the
generator's device and moved to the data's.

Empty clusters are handled as in the paper (Sec. 3.3) and Faiss: an empty cluster takes a perturbed
copy ``m + delta`` of the centroid of the largest cluster, whose centroid becomes ``m - delta`` (``m``
the mean of its points), and that cluster's points go to the nearer of the two; if all its points are
identical (so no direction separates them), every other one moves. Every cluster is non-empty in the
result whenever ``k <= n``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kmeans", "pca_whiten", "assign"]

_CHUNK_ELEMENTS = 1 << 24  # points x centroids per distance block (64 MiB of float32)


def pca_whiten(x: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """Project ``x`` (N, D) on its top ``dim`` principal components and scale each to unit variance:
    the result (N, dim') has zero mean and identity covariance. ``dim' = min(dim, D, N - 1)`` (beyond
    the rank of the centred data there is no variance to whiten). Eigenvalues below ``eps`` times
    the largest are floored there, so directions without variance are not blown up."""
    n, d = x.shape
    dim = max(1, min(dim, d, n - 1))
    x = x.float()
    mean = x.mean(0, keepdim=True)
    xc = x - mean
    cov = (xc.t() @ xc).double() / max(n - 1, 1)
    evals, evecs = _eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    evals = evals.clamp_min(eps * float(evals[0].clamp_min(1e-30)))
    proj = (evecs / evals.sqrt()).float()
    return xc @ proj


def _eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``; on the CPU on one thread: threaded LAPACK gains little on a D x D matrix
    (D <= 2048 here) and was seen to stall for seconds on busy cores."""
    if a.device.type != "cpu":
        return torch.linalg.eigh(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


def _chunk(n_centroids: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, _CHUNK_ELEMENTS // max(1, n_centroids))


def assign(x: Tensor, centroids: Tensor, chunk_size: int | None = None) -> Tensor:
    """Index of the nearest centroid (squared Euclidean) of every row of ``x``, chunked over points."""
    half_cn = 0.5 * (centroids * centroids).sum(1, keepdim=True)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    step = _chunk(len(centroids), chunk_size)
    for s in range(0, x.shape[0], step):
        # argmin_c ||x - c||^2 = argmax_c (x.c - ||c||^2 / 2); a (k, chunk) block: max over dim 0 is the
        # faster reduction on the CPU (and values+indices beat a bare argmax there)
        out[s:s + step] = torch.mm(centroids, x[s:s + step].t()).sub_(half_cn).max(0).indices
    return out


def _means(x: Tensor, a: Tensor, k: int, old: Tensor, chunk_size: int | None) -> Tensor:
    """Centroids = means of their points (an empty cluster keeps its old centroid)."""
    n, d = x.shape
    if x.device.type == "cuda":  # one-hot product: deterministic, unlike CUDA's atomic index_add_
        sums = torch.zeros(k, d, device=x.device, dtype=x.dtype)
        step = _chunk(k, chunk_size)
        for s in range(0, n, step):
            sums.addmm_(F.one_hot(a[s:s + step], k).to(x.dtype).t(), x[s:s + step])
    else:
        sums = torch.zeros(k, d, device=x.device, dtype=x.dtype).index_add_(0, a, x)
    counts = torch.bincount(a, minlength=k).to(x.dtype).unsqueeze(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), old)


def _init(x: Tensor, k: int, init: str | Tensor, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    if isinstance(init, Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"initial centroids must have shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        return init.to(x).clone()
    if init == "random":  # k distinct points (Faiss' default)
        idx = torch.randperm(n, generator=generator, device=generator.device)[:k].to(x.device)
        return x[idx].clone()
    if init == "k-means++":  # Arthur & Vassilvitskii 2007: next centre drawn with probability ~ D(x)^2
        u = torch.rand(k, generator=generator, device=generator.device, dtype=torch.float64).to(x.device)
        xn = (x * x).sum(1)
        c = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
        first = (u[0] * n).long().clamp_max(n - 1)
        c[0] = x[first]
        d2 = (xn - 2 * (x @ c[0]) + xn[first]).clamp_min(0)
        for j in range(1, k):
            cum = torch.cumsum(d2.double(), 0)
            idx = torch.searchsorted(cum, (u[j] * cum[-1]).reshape(1)).clamp_max(n - 1)
            c[j] = x[idx[0]]
            d2 = torch.minimum(d2, (xn - 2 * (x @ c[j]) + xn[idx[0]]).clamp_min(0))
        return c
    raise ValueError(f"unknown k-means init '{init}'; choose 'k-means++', 'random' or a tensor of centroids")


def _split_empty(x: Tensor, a: Tensor, c: Tensor, generator: torch.Generator, eps: float) -> int:
    """Give every empty cluster half of the largest cluster (in place on ``a`` and ``c``); returns how
    many clusters were empty."""
    k = c.shape[0]
    counts = torch.bincount(a, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    counts = counts.tolist()
    scale = eps * float(x.std()) + 1e-12
    for j in empty:
        i = max(range(k), key=counts.__getitem__)  # the largest cluster (first one on ties)
        if counts[i] < 2:
            break
        members = (a == i).nonzero().flatten()
        xm = x[members]
        m = xm.mean(0)
        delta = torch.randn(x.shape[1], generator=generator, device=generator.device).to(x) * scale
        to_j = (xm - m) @ delta > 0  # nearer to m + delta than to m - delta
        moved = int(to_j.sum())
        if moved == 0 or moved == len(members):  # identical points: no direction splits them
            to_j = torch.arange(len(members), device=x.device) % 2 == 1
            moved = int(to_j.sum())
        a[members[to_j]] = j
        c[j], c[i] = m + delta, m - delta
        counts[j], counts[i] = moved, counts[i] - moved
    return len(empty)


def kmeans(x: Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None,
           init: str | Tensor = "k-means++", chunk_size: int | None = None,
           split_eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of the rows of ``x`` (N, D), on ``x``'s device: returns ``(centroids (k, D),
    assignments (N,))`` with every cluster non-empty and each point assigned to its nearest centroid
    (except when a cluster had to be split between identical points).

    ``init``: ``"k-means++"``, ``"random"`` (k distinct points) or a (k, D) tensor. Each of the
    ``iters`` iterations assigns the points, splits empty clusters (module docstring), and moves the
    centroids to the means; a last assignment (and split) gives the result. ``chunk_size`` bounds the
    points per distance block (default: 2^24 / k).
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, D) data, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x = x.float().contiguous()
    c = _init(x, k, init, generator)
    for _ in range(iters):
        a = assign(x, c, chunk_size)
        _split_empty(x, a, c, generator, split_eps)
        c = _means(x, a, k, c, chunk_size)
    a = assign(x, c, chunk_size)
    _split_empty(x, a, c, generator, split_eps)
    return c, a


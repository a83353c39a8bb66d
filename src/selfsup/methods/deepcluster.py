"""DeepCluster: cluster the features of the whole dataset with k-means every epoch and train the network
to classify the cluster ids (Caron, Bojanowski, Joulin & Douze, "Deep Clustering for Unsupervised
Learning of Visual Features", ECCV 2018, arXiv:1807.05520).

Algorithm (Sec. 3 of the paper)::

    for epoch in range(epochs):
        f = [f_theta(eval_view(x)) for x in dataset]       # pooled features of every image, no augmentation
        f = l2_normalize(pca_whiten(f, pca_dim))            # Sec. 4: PCA-whitening, then L2-normalisation
        y = kmeans(f, k)                                    # pseudo labels; empty clusters are split (Sec. 3.3)
        g = new classifier head; reset its optimizer state  # the old cluster ids mean nothing any more
        for x in batches sampled uniformly over the k clusters:   # Sec. 3.3: avoids trivial parametrisation
            loss = cross_entropy(g(f_theta(augment(x))), y[x])

Paper defaults (ImageNet, AlexNet/VGG at 224 px): k = 10,000 for 1.3M images, PCA to 256 dims,
20 Lloyd iterations (Faiss), Sobel-filtered input, random resized crop + flip, SGD lr 0.05, momentum
0.9, weight decay 1e-5, batch 256, 500 epochs. Here, for 32-96 px images and 10-class-scale data:
k = 100 (about 10x the number of classes, as the paper's 10x over ImageNet's 1,000), PCA to 128 dims
(at most the feature dimension), pooled backbone features (not fc7 of an MLP) and a linear classifier
(``head_hidden_dim > 0``: a 2-layer MLP whose last layer alone is re-initialised), RGB input (no Sobel
filter), random crop + flip.

The labels of a batch are those of its images' dataset indices, which the trainer sets before each
step (``Method.batch_indices``: this process's slice of the batch under torchrun); the epoch's
uniform-over-clusters order comes from :meth:`DeepCluster.epoch_order`. The clustering
(``selfsup.cluster``) runs on the training device; under torchrun every process clusters and rank 0's
labels are broadcast, so all processes train on the same labels. Per-epoch values (the NMI between
the clusterings of consecutive epochs, cluster sizes, k-means time) are logged with the ``selfsup``
logger and kept in :attr:`DeepCluster.history` (saved in the checkpoint); ``nmi`` is also a column of
``metrics.csv`` (constant within an epoch, NaN in the first). The pseudo labels and the epoch they
belong to are part of the model's state dict (``_extra_state``), so a run resumed mid-epoch neither
re-clusters nor changes its labels.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..cluster import kmeans, pca_whiten
from ..config import ConfigError
from ..data.views import augment
from ..figures import image_grid
from ..heads import MLP, LinearClassifier
from ..runtime import embed
from .base import Method

log = logging.getLogger("selfsup")


def uniform_cluster_order(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` image indices in which every non-empty cluster appears ``n // K`` or ``n // K + 1`` times
    (``K`` non-empty clusters; which ones get the extra image is random). A cluster with enough images
    contributes distinct ones; a smaller one repeats all of its images as evenly as possible. Shuffled;
    all randomness from ``generator`` (the paper's sampler draws with replacement from small clusters)."""
    labels = labels.cpu().long()
    order = torch.argsort(labels, stable=True)
    clusters, sizes = torch.unique_consecutive(labels[order], return_counts=True)
    members = torch.split(order, sizes.tolist())
    quota = torch.full((len(clusters),), n // len(clusters), dtype=torch.long)
    quota[torch.randperm(len(clusters), generator=generator)[:n % len(clusters)]] += 1
    picks = []
    for mem, q in zip(members, quota.tolist()):
        reps, rest = divmod(q, len(mem))
        picks += [mem[torch.randperm(len(mem), generator=generator)] for _ in range(reps)]
        picks.append(mem[torch.randperm(len(mem), generator=generator)[:rest]])
    out = torch.cat(picks)
    return out[torch.randperm(n, generator=generator)]


class DeepCluster(Method):
    name = "deepcluster"
    family = "context-based"
    summary = "DeepCluster (Caron et al. 2018): k-means of the features every epoch, classify the cluster ids"

    @dataclass
    class Params:
        num_clusters: int = 100  # k of k-means (paper: 10,000 for ImageNet; ~10x the classes here)
        pca_dim: int = 128  # PCA-whitening dimension before L2-normalisation (paper: 256); capped at the feature dim
        kmeans_iters: int = 20  # Lloyd iterations per clustering (paper: 20, with Faiss)
        kmeans_init: str = "k-means++"  # "k-means++" or "random" (k distinct points, Faiss' default)
        head_hidden_dim: int = 0  # 0: a linear classifier on pooled features; >0: a 2-layer MLP
        uniform_sampling: bool = True  # epochs sample the clusters uniformly (paper Sec. 3.3); False: plain shuffle
        embed_batch_size: int = 256  # images per forward pass when embedding the dataset for clustering

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d, h, k = self.backbone.out_dim, self.hp.head_hidden_dim, self.hp.num_clusters
        if k < 2 or self.hp.pca_dim < 1 or self.hp.kmeans_init not in ("k-means++", "random"):
            raise ConfigError(f"deepcluster needs params.num_clusters >= 2, params.pca_dim >= 1 and "
                              f"params.kmeans_init 'k-means++' or 'random'; got {k}, {self.hp.pca_dim}, "
                              f"'{self.hp.kmeans_init}'")
        self.head = MLP(d, h, k) if h > 0 else LinearClassifier(d, k)
        self.labels: torch.Tensor | None = None  # (N,) pseudo labels of the training images (CPU)
        self.labels_epoch = -1  # the epoch they were computed for
        self.nmi = math.nan  # NMI between this epoch's and the previous epoch's clustering
        self.history: list[dict] = []  # one dict per clustering: epoch, nmi, sizes, seconds

    # -- state kept in checkpoints (N is unknown at __init__, hence extra state, not buffers) ----------
    def get_extra_state(self) -> dict:
        labels = self.labels if self.labels is not None else torch.zeros(0, dtype=torch.long)
        return {"labels": labels, "epoch": self.labels_epoch, "nmi": self.nmi, "history": list(self.history)}

    def set_extra_state(self, state: dict) -> None:
        labels = state["labels"].cpu().long()
        self.labels = labels if labels.numel() else None
        self.labels_epoch, self.nmi = int(state["epoch"]), float(state["nmi"])
        self.history = [dict(h) for h in state["history"]]

    # -- the clustering, once per epoch ------------------------------------------------------------------
    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.cfg.train.seed * 1_000_033 + epoch) * 4 + stream)

    @torch.no_grad()
    def cluster(self, images: np.ndarray, device: torch.device, epoch: int) -> torch.Tensor:
        """Pseudo labels (N,) of ``images`` for ``epoch``: k-means of the L2-normalised, PCA-whitened
        pooled features of their evaluation view."""
        k = self.hp.num_clusters
        if k > len(images):
            raise ConfigError(f"params.num_clusters={k} is more than the {len(images)} training images")
        t0 = time.perf_counter()
        feats = embed(self.backbone, images, self.cfg.aug, device, self.cfg.train.precision,
                      self.hp.embed_batch_size, self.input_mode)
        if len(images) < 4 * min(self.hp.pca_dim, feats.shape[1]):
            log.warning("deepcluster: whitening %d images to %d dims mostly amplifies noise; lower "
                        "params.pca_dim", len(images), min(self.hp.pca_dim, feats.shape[1]))
        x = F.normalize(pca_whiten(feats.to(device), self.hp.pca_dim), dim=1)
        _, labels = kmeans(x, k, self.hp.kmeans_iters, self._generator(epoch, 0), self.hp.kmeans_init)
        labels = distributed.broadcast(labels.to(device)).cpu()  # one clustering for every process
        sizes = torch.bincount(labels, minlength=k)
        nmi = math.nan
        if self.labels is not None and len(self.labels) == len(labels):
            from sklearn.metrics import normalized_mutual_info_score

            nmi = float(normalized_mutual_info_score(self.labels.numpy(), labels.numpy()))
        self.labels, self.labels_epoch, self.nmi = labels, epoch, nmi
        entry = {"epoch": epoch, "nmi": nmi, "min_size": int(sizes.min()), "max_size": int(sizes.max()),
                 "seconds": round(time.perf_counter() - t0, 3)}
        self.history.append(entry)
        log.info("deepcluster epoch %d: k-means of %d images into %d clusters (sizes %d-%d), NMI to the "
                 "previous clustering %.4f, %.2f s", epoch + 1, len(labels), k, entry["min_size"],
                 entry["max_size"], nmi, entry["seconds"])
        return labels

    @torch.no_grad()
    def reset_head(self, optimizer: torch.optim.Optimizer | None, epoch: int) -> None:
        """New cluster ids: re-initialise the classifier's last layer (as LinearClassifier: N(0, 0.01),
        zero bias) and drop its optimizer state (momentum buffers, Adam moments)."""
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        w = torch.randn(last.weight.shape, generator=self._generator(epoch, 1)) * 0.01
        last.weight.copy_(w)
        last.bias.zero_()
        if optimizer is not None:
            for p in last.parameters():
                optimizer.state.pop(p, None)

    def on_epoch_start(self, run, epoch: int) -> None:
        if self.labels_epoch != epoch:  # not when resuming mid-epoch: the checkpoint holds this epoch's labels
            self.cluster(run.images, run.device, epoch)
            self.reset_head(run.optimizer, epoch)

    def epoch_order(self, epoch, generator, n):
        if not self.hp.uniform_sampling or self.labels is None:
            return None
        if len(self.labels) != n:
            raise RuntimeError(f"deepcluster: {len(self.labels)} pseudo labels for {n} images")
        return uniform_cluster_order(self.labels, n, generator).numpy()

    # -- one step ------------------------------------------------------------------------------------
    def prepare(self, images, generator):
        if self.labels is None:
            raise RuntimeError("deepcluster: no pseudo labels yet; the trainer's "
                               "method.on_epoch_start(run, epoch) clusters the data first")
        if self.batch_indices is None or len(self.batch_indices) != images.shape[0]:
            raise RuntimeError(f"deepcluster: a batch of {images.shape[0]} images needs their dataset indices "
                               f"(method.batch_indices, set by the trainer)")
        y = self.labels[self.batch_indices].to(images.device)
        x = augment(images, self.cfg.aug, generator)
        return self.fmt(x), y

    def training_step(self, batch):
        x, y = batch
        logits = self.head(self.backbone(x)).float()
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "pretext_acc": (logits.argmax(1) == y).float().mean(),
                "nmi": torch.tensor(self.nmi)}

    # -- pictures ------------------------------------------------------------------------------------
    @torch.no_grad()
    def figures(self, data, out_dir: Path, device) -> list[Path]:
        """``clusters.png``: members of the largest clusters of the last clustering, one row each."""
        if self.labels is None or len(self.labels) != len(data.images):
            return []
        rows_n, cols = 8, 10
        sizes = torch.bincount(self.labels, minlength=self.hp.num_clusters)
        top = torch.argsort(sizes, descending=True, stable=True)[:rows_n].tolist()
        g = torch.Generator().manual_seed(0)
        rows, titles = [], []
        for c in top:
            mem = (self.labels == c).nonzero().flatten()
            mem = np.sort(mem[torch.randperm(len(mem), generator=g)[:cols]].numpy())
            rows.append(np.asarray(data.images[mem]))
            titles.append(f"#{c}\nn={int(sizes[c])}")
        title = (f"DeepCluster: members of the {len(top)} largest of {self.hp.num_clusters} clusters "
                 f"(epoch {self.labels_epoch + 1})")
        return [image_grid(rows, out_dir / "clusters.png", row_titles=titles, title=title)]

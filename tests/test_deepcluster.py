"""DeepCluster: the k-means / PCA-whitening module (selfsup.cluster), sampling uniform over clusters, the
per-epoch re-clustering with a fresh head, pseudo labels that follow the stream's batches, a tiny run,
and an exact mid-epoch resume."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score

from conftest import make_folder, stop_at, assert_backbone_moved
from selfsup.cluster import kmeans, pca_whiten
from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.evaluate import evaluate
from selfsup.methods import METHODS
from selfsup.methods.deepcluster import uniform_cluster_order
from selfsup.runtime import embed
from selfsup.train import BatchStream, Trainer, TrainingInterrupted
from selfsup.run import read_metrics

SMALL = {"num_clusters": 4, "pca_dim": 8, "kmeans_iters": 10}  # 64-256 images: whitening to 128 dims would be noise


def _cfg(data, epochs, batch=16, **extra):
    overrides = {"model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
                 "train": {"epochs": epochs, "batch_size": batch, "log_every": 2, "ckpt_every": 1000,
                           "device": "cpu"},
                 "optim": {"name": "sgd", "lr": 2.0, "warmup_epochs": 0}, "params": dict(SMALL)}
    for k, v in extra.items():
        overrides[k].update(v)
    return build_config("deepcluster", overrides)


# -- selfsup.cluster -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_assigns_every_point_to_its_nearest_centroid(init):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=g)
    c, a = kmeans(x, 9, 10, g, init, chunk_size=128)  # several distance blocks
    assert c.shape == (9, 12) and a.shape == (600,) and a.dtype == torch.long
    assert torch.equal(a, torch.cdist(x, c).argmin(1))
    assert torch.bincount(a, minlength=9).min() > 0
    # run to convergence: a Lloyd fixed point, every centroid is the mean of its points
    c, a = kmeans(x, 9, 60, torch.Generator().manual_seed(1), init)
    means = torch.stack([x[a == j].mean(0) for j in range(9)])
    assert torch.allclose(c, means, atol=1e-5)


def test_kmeans_recovers_well_separated_blobs_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=g) * 10
    truth = torch.arange(6).repeat_interleave(50)[torch.randperm(300, generator=g)]
    x = centers[truth] + 0.3 * torch.randn(300, 16, generator=g)
    _, a = kmeans(x, 6, 20, torch.Generator().manual_seed(3))
    assert normalized_mutual_info_score(truth.numpy(), a.numpy()) == pytest.approx(1.0)
    _, again = kmeans(x, 6, 20, torch.Generator().manual_seed(3))
    assert torch.equal(a, again)


def test_pca_whitening_gives_identity_covariance_on_the_top_components():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 5, 3, 2, 1, 0.5, 0.3, 0.2, 0.1, 0.05])
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    x = (torch.randn(4000, 10, generator=g) * scales) @ q.t() + 5.0
    y = pca_whiten(x, 6)
    assert y.shape == (4000, 6)
    assert torch.allclose(y.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(torch.cov(y.t()), torch.eye(6), atol=1e-3)
    # the same 6 directions as scikit-learn's whitened PCA (up to the sign of each component)
    ref = torch.from_numpy(PCA(6, whiten=True).fit_transform(x.double().numpy())).float()
    corr = (F.normalize(y - y.mean(0), dim=0) * F.normalize(ref, dim=0)).sum(0).abs()
    assert torch.allclose(corr, torch.ones(6), atol=1e-4)
    assert pca_whiten(x[:5], 6).shape == (5, 4)  # at most N - 1 directions have variance


def test_empty_clusters_are_split_so_every_cluster_has_points():
    # k larger than the number of distinct points: groups of identical points are split between clusters
    pts = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    x = pts.repeat(10, 1)
    _, a = kmeans(x, 10, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(a, minlength=10).min() > 0
    for j in range(10):  # each cluster holds copies of one point only
        assert len(torch.unique(x[a == j], dim=0)) == 1

    # a bad initialisation: the far centroid gets no point; it takes half of the largest cluster (blob A)
    g = torch.Generator().manual_seed(1)
    blob_a = torch.randn(150, 2, generator=g)
    blob_b = torch.randn(50, 2, generator=g) + 20
    x = torch.cat([blob_a, blob_b])
    init = torch.tensor([[0.0, 0.0], [20.0, 20.0], [1000.0, 1000.0]])
    c, a = kmeans(x, 3, 0, g, init=init)  # no Lloyd iteration: only the final assignment and its split
    counts = torch.bincount(a, minlength=3)
    assert counts.min() > 0 and counts[1] == 50 and counts[0] + counts[2] == 150
    assert (a[150:] == 1).all()
    assert torch.equal(a, torch.cdist(x, c).argmin(1))  # the split gives each point the nearer half
    # the two halves sit around blob A's mean, a small perturbation apart (blob spread 1)
    assert torch.allclose((c[0] + c[2]) / 2, blob_a.mean(0), atol=1e-5) and (c[0] - c[2]).norm() < 0.1
    _, a = kmeans(x, 3, 10, g, init=init)
    assert torch.bincount(a, minlength=3).min() > 0


# -- sampling uniform over clusters ---------------------------------------------------------------


def test_epoch_order_is_uniform_over_clusters_and_deterministic():
    sizes = {0: 1, 2: 6, 3: 52, 5: 144}  # clusters 1 and 4 are empty
    labels = torch.cat([torch.full((s,), c) for c, s in sizes.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    n = len(labels)  # 203 = 4 * 50 + 3
    order = uniform_cluster_order(labels, n, torch.Generator().manual_seed(7))
    assert order.shape == (n,) and order.min() >= 0 and order.max() < n
    counts = torch.bincount(labels[order], minlength=6)
    assert counts[1] == 0 and counts[4] == 0
    assert sorted(counts[[0, 2, 3, 5]].tolist()) == [50, 51, 51, 51]
    per_image = torch.bincount(order, minlength=n)
    assert per_image[labels == 0].item() in (50, 51)  # the lone image of cluster 0, repeated
    small = per_image[labels == 2]  # 6 images share ~50 draws as evenly as possible: 8 or 9 each
    assert small.max() - small.min() <= 1 and small.sum() == counts[2]
    assert per_image[labels == 5].max() == 1  # the large cluster gives distinct images
    assert torch.equal(order, uniform_cluster_order(labels, n, torch.Generator().manual_seed(7)))
    assert not torch.equal(order, uniform_cluster_order(labels, n, torch.Generator().manual_seed(8)))


# -- the method ------------------------------------------------------------------------------------


def test_clustering_resets_the_head_and_labels_follow_the_batches(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset / "train", epochs=2)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    m, images = tr.method, np.asarray(tr.data.images)
    with torch.no_grad():  # as if the head had been trained: weights and momentum buffers
        m.head.weight.fill_(1.0)
        m.head.bias.fill_(1.0)
    tr.optimizer.state[m.head.weight]["momentum_buffer"] = torch.ones_like(m.head.weight)
    tr.optimizer.state[m.head.bias]["momentum_buffer"] = torch.ones_like(m.head.bias)
    conv = next(m.backbone.parameters()).detach().clone()

    m.on_epoch_start(tr.run_state(), 0)
    assert m.labels_epoch == 0 and m.labels.shape == (64,)
    assert 0.005 < float(m.head.weight.detach().std()) < 0.02 and (m.head.bias == 0).all()  # fresh N(0, 0.01) layer
    assert m.head.weight not in tr.optimizer.state and m.head.bias not in tr.optimizer.state
    assert torch.equal(next(m.backbone.parameters()), conv)  # only the head is reset

    # the labels are k-means of the L2-normalised, PCA-whitened features of the un-augmented images
    feats = embed(m.backbone, images, cfg.aug, tr.device, cfg.train.precision, input_mode="rgb")
    x = F.normalize(pca_whiten(feats, SMALL["pca_dim"]), dim=1)
    _, expect = kmeans(x, 4, SMALL["kmeans_iters"], m._generator(0, 0))
    assert torch.equal(m.labels, expect)

    # every batch the stream delivers gets the pseudo labels of exactly its own images
    order = tr.stream.order(0)
    assert torch.bincount(m.labels[torch.from_numpy(order)], minlength=4).tolist() == [16, 16, 16, 16]
    for step, batch in enumerate(tr.stream.batches(0)):
        idx = np.sort(order[step * 16:(step + 1) * 16])
        assert np.array_equal(batch.permute(0, 2, 3, 1).numpy(), images[idx])
        assert np.array_equal(tr.stream.indices, idx)
        m.batch_indices = torch.from_numpy(tr.stream.indices)  # as the trainer does before each step
        _, y = m.prepare(batch, torch.Generator().manual_seed(step))
        assert torch.equal(y, m.labels[idx])
    m.batch_indices = None
    with pytest.raises(RuntimeError, match="dataset indices"):
        m.prepare(batch, torch.Generator())

    # under torchrun each process gets a slice of the global batch: its labels are those of its images
    for rank in range(2):
        shard = BatchStream(images, 16, cfg.train.seed, tr.device, order_fn=m.epoch_order, rank=rank, world_size=2)
        for step, batch in enumerate(shard.batches(0)):
            mine = np.sort(order[step * 16:(step + 1) * 16][rank * 8:(rank + 1) * 8])
            assert np.array_equal(shard.indices, mine)
            assert np.array_equal(batch.permute(0, 2, 3, 1).numpy(), images[mine])
            m.batch_indices = torch.from_numpy(shard.indices)
            assert torch.equal(m.prepare(batch, torch.Generator())[1], m.labels[mine])

    # the same epoch again (a resumed run): neither re-clustering nor a new head
    w = m.head.weight.detach().clone()
    monkeypatch.setattr(m, "cluster", lambda *a: pytest.fail("re-clustered an epoch already clustered"))
    m.on_epoch_start(tr.run_state(), 0)
    assert torch.equal(m.head.weight, w)
    monkeypatch.undo()
    m.on_epoch_start(tr.run_state(), 1)  # a new epoch: new clustering, new head
    assert m.labels_epoch == 1 and len(m.history) == 2 and not torch.equal(m.head.weight, w)
    assert 0.0 <= m.history[1]["nmi"] <= 1.0 and math.isnan(m.history[0]["nmi"])

    with pytest.raises(ConfigError, match="num_clusters=100 is more than the 64 training images"):
        m.hp.num_clusters = 100
        m.on_epoch_start(tr.run_state(), 2)
    with pytest.raises(ConfigError, match="kmeans_init"):
        METHODS["deepcluster"](_cfg(tiny_dataset / "train", 1, params={"kmeans_init": "faiss"}))

    # with an MLP head only its last layer is re-initialised (the paper keeps fc6/fc7)
    mlp = METHODS["deepcluster"](_cfg(tiny_dataset / "train", 1, params={"head_hidden_dim": 16}))
    first, last = mlp.head[0].weight.detach().clone(), mlp.head[-1].weight.detach().clone()
    mlp.reset_head(None, 3)
    assert torch.equal(mlp.head[0].weight, first) and not torch.equal(mlp.head[-1].weight, last)


def test_tiny_run_learns_the_pseudo_labels_draws_clusters_and_evaluates(tiny_dataset, tmp_path):
    data = make_folder(tmp_path / "imgs", 64, size=16, seed=2)  # 256 images: 8 steps of 32 per epoch
    cfg = _cfg(data, epochs=3, batch=32)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.fit()
    rows = read_metrics(tmp_path / "run")
    last_epoch = [float(r["pretext_acc"]) for r in rows if float(r["epoch"]) > 2]
    assert np.mean(last_epoch) > 0.4, last_epoch  # chance is 1/k = 0.25 (a fresh head every epoch)
    nmi = [float(r["nmi"]) for r in rows]
    assert all(math.isnan(v) for v, r in zip(nmi, rows) if float(r["epoch"]) <= 1)  # no previous clustering
    assert all(0.0 <= v <= 1.0 for v, r in zip(nmi, rows) if float(r["epoch"]) > 1)
    assert [h["epoch"] for h in tr.method.history] == [0, 1, 2]
    assert (tmp_path / "run" / "figures" / "clusters.png").stat().st_size > 0

    r = evaluate(str(tmp_path / "run"), "knn", str(tiny_dataset), str(tiny_dataset),
                 out=tmp_path / "eval", progress=False)
    assert r["top1"] > 0.25 and r["n_train"] == 64 and r["n_test"] == 32  # 4 classes
    assert_backbone_moved(tmp_path / "run")


def _comparable(history):
    """Per-epoch entries without timings, NaN as None (NaN != NaN)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items() if k != "seconds"}
            for h in history]


def test_resume_mid_epoch_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset / "train", epochs=3)  # 4 steps per epoch
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit()
    model = straight.state()["model"]
    assert model["_extra_state"]["epoch"] == 2 and model["_extra_state"]["labels"].shape == (64,)

    interrupted = Trainer(cfg, tmp_path / "resumed", progress=False)
    stop_at(interrupted, 5)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step == 6 and resumed.method.labels_epoch == 1  # mid-epoch 1, already clustered
    calls = []
    cluster = resumed.method.cluster
    resumed.method.cluster = lambda *a: calls.append(a[-1]) or cluster(*a)
    resumed.fit()
    assert calls == [2]  # epoch 1 is not clustered again, epoch 2 is

    final = resumed.state()["model"]
    assert final.keys() == model.keys()
    for k in model:
        if k == "_extra_state":
            a, b = final[k], model[k]
            assert torch.equal(a["labels"], b["labels"]) and a["epoch"] == b["epoch"]
            assert _comparable(a["history"]) == _comparable(b["history"]) and len(a["history"]) == 3
        else:
            assert torch.equal(final[k], model[k]), k
    cols = ("step", "loss", "pretext_acc", "nmi")
    assert ([[r[c] for c in cols] for r in read_metrics(tmp_path / "resumed")]
            == [[r[c] for c in cols] for r in read_metrics(tmp_path / "straight")])

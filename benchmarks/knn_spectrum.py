"""kNN of frozen features as they are and with their top principal directions removed, and the share of
variance in the first one (and first five): does a run's feature space put its variance in a few
directions that the cosine kNN then follows?

    python benchmarks/knn_spectrum.py random:convnet runs/exp/jig_pre runs/exp/jig_p1000

Reads ../shared/data/cifar10 (train as gallery, test as queries, k=200, T=0.1, precise BN as the kNN
protocol does); results in benchmarks/results/jigsaw_2m_probes.json ("spectrum").
"""
import sys

import torch


def main():
    from selfsup.run import load_encoder
    from selfsup.data import load_images
    from selfsup.evaluate import knn_predict
    from selfsup.evaluate.features import cached_features, precise_bn, fit_random_from_data
    tr = load_images("../shared/data/cifar10", "train", 32, progress=False)
    te = load_images("../shared/data/cifar10", "test", 32, progress=False)
    ytr, yte = torch.from_numpy(tr.labels).long(), torch.from_numpy(te.labels).long()
    for run in sys.argv[1:]:
        enc = load_encoder(run, seed=0)
        fit_random_from_data(enc, tr.images, "cpu")
        precise_bn(enc, tr.images, "cpu", seed=0)
        ftr = cached_features(enc, tr.images, "cpu", None)
        fte = cached_features(enc, te.images, "cpu", None)
        out = [run]
        mu = ftr.mean(0)
        _, S, V = torch.linalg.svd(ftr - mu, full_matrices=False)  # one SVD: the directions and their variances

        def drop(k):
            P = V[k:].T
            return lambda x: (x - mu) @ P

        for name, f in (("raw", lambda x: x), ("drop1", drop(1)), ("drop3", drop(3))):
            pred = knn_predict(f(ftr), ytr, f(fte), 10, 200, 0.1)
            out.append(f"{name} {float((pred == yte).float().mean()):.4f}")
        e = S**2 / (S**2).sum()
        out.append(f"top1 var share {float(e[0]):.3f} top5 {float(e[:5].sum()):.3f}")
        print(" | ".join(out), flush=True)


if __name__ == "__main__":
    main()

"""Is a network's kNN held back by a few features of large scale? kNN (k=200, T=0.1) on the pooled features
after precise BN, raw, centred and standardised per feature with the training features' mean and std, and
how unequal the features' scales are (largest std over the median; the 8 largest features' share of the
second moment). If standardising lifts a network's kNN, its raw kNN was dominated by a few features.

    python benchmarks/knn_standardized.py --data ../shared/data/cifar10 \\
        --runs random:convnet runs/ctx_jig_g2/jigsaw runs/dg_reals_map_s2/dcgan
"""

from __future__ import annotations

import argparse

import torch

from selfsup.evaluate import knn_top1, load_encoder
from selfsup.evaluate.features import extract_features, precise_bn
from stage_knn import labeled_splits  # benchmarks/ is on the path when the script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("--runs", nargs="+", required=True, help="run directories or random:BACKBONE")
    args = ap.parse_args()
    torch.set_num_threads(2)
    splits = {}
    for run in args.runs:
        enc = load_encoder(run)
        tr, te, ytr, yte = labeled_splits(args.data, enc.spec["image_size"], splits)
        precise_bn(enc, tr.images, "cpu")
        a, b = extract_features(enc, tr.images, "cpu").float(), extract_features(enc, te.images, "cpu").float()
        mu, sd = a.mean(0), a.std(0)

        def knn(f_train, f_test):
            return knn_top1(f_train, ytr, f_test, yte, tr.num_classes, 200, 0.1)

        s = sd.sort(descending=True).values
        energy = (sd**2 + mu**2).sort(descending=True).values
        print(run, f"raw {knn(a, b):.3f} centred {knn(a - mu, b - mu):.3f} "
              f"standardised {knn((a - mu) / (sd + 1e-6), (b - mu) / (sd + 1e-6)):.3f}",
              f"| std largest/median {s[0] / s[len(s) // 2]:.1f} top-8 share {energy[:8].sum() / energy.sum():.2f}",
              flush=True)


if __name__ == "__main__":
    main()

"""kNN with every evaluation image standardised per channel by its own mean and std (as jigsaw's and
relative location's training tiles are), instead of the dataset's normalisation: is a mismatch between
training and evaluation inputs what takes a context method's kNN below random init?

    SELFSUP_FEATURE_CACHE=0 python benchmarks/knn_standardised_input.py random:convnet runs/exp/jig_pre

Reads ../shared/data/cifar10; results in benchmarks/results/jigsaw_2m_probes.json ("standardised_input").
"""

import sys

import torch


def main():
    import selfsup.data.views as V
    from selfsup.methods.jigsaw import standardize_tiles
    def std_view(images, cfg):
        x = V.to_float(images)
        return standardize_tiles(x).contiguous(memory_format=torch.channels_last)
    V.eval_view = std_view
    from selfsup.run import load_encoder
    from selfsup.data import load_images
    from selfsup.evaluate import knn_predict
    from selfsup.evaluate.features import extract_features, precise_bn
    tr = load_images("../shared/data/cifar10", "train", 32, progress=False)
    te = load_images("../shared/data/cifar10", "test", 32, progress=False)
    ytr, yte = torch.from_numpy(tr.labels).long(), torch.from_numpy(te.labels).long()
    for run in sys.argv[1:]:
        enc = load_encoder(run, seed=0)
        precise_bn(enc, tr.images, "cpu", seed=0)
        ftr = extract_features(enc, tr.images, "cpu")
        fte = extract_features(enc, te.images, "cpu")
        pred = knn_predict(ftr, ytr, fte, 10, 200, 0.1)
        print(run, "per-image standardised input: kNN", round(float((pred == yte).float().mean()), 4), flush=True)


if __name__ == "__main__":
    main()

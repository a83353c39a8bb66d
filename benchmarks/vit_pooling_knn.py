"""kNN (k=200, T=0.1, test split) of a ViT's class token (what ``selfsup evaluate`` uses) against its mean
patch token, on the same subset of images, for runs or ``random:vit_tiny``: whether a short MAE run's
class token (which MAE's loss reaches only through attention) is what falls behind.

    python benchmarks/vit_pooling_knn.py --data ../shared/data/cifar10 random:vit_tiny runs/mae_fp32/mae \\
        --train-images 10000 --test-images 2000 --results benchmarks/results/vit_pooling_knn

One forward pass per image gives both features (the final norm's tokens: token 0 and the mean of the rest).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfsup.evaluate import balanced_subset, knn_top1, load_encoder
from selfsup.evaluate.features import extract_features
from stage_knn import labeled_splits  # benchmarks/stage_knn.py, beside this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("runs", nargs="+", help="run directories or random:BACKBONE (a ViT)")
    ap.add_argument("--train-images", type=int, default=10000, help="class-balanced subset (seed 0)")
    ap.add_argument("--test-images", type=int, default=2000, help="class-balanced subset (seed 0)")
    ap.add_argument("--results", metavar="PREFIX", help="write PREFIX.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out, splits = {}, {}
    for run in args.runs:
        enc = load_encoder(run)
        bb = enc.backbone
        if not hasattr(bb, "forward_tokens"):
            raise SystemExit(f"{run}: not a ViT backbone")
        tr, te, ytr, yte = labeled_splits(args.data, enc.spec["image_size"], splits)
        per_class = (args.train_images // tr.num_classes, args.test_images // tr.num_classes)
        itr, ite = (balanced_subset(y.numpy(), n) for y, n in zip((ytr, yte), per_class))  # the same for every run

        def both(x: torch.Tensor) -> torch.Tensor:  # [class token, mean patch token]
            t = bb.forward_tokens(x)
            return torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=1)

        bb.forward = both
        ftr = extract_features(enc, tr.images[itr], "cpu", progress=False)
        fte = extract_features(enc, te.images[ite], "cpu", progress=False)
        d = ftr.shape[1] // 2
        row = {}
        for name, sl in (("class_token", slice(0, d)), ("mean_patch_token", slice(d, 2 * d))):
            row[name] = knn_top1(ftr[:, sl], ytr[itr], fte[:, sl], yte[ite], tr.num_classes, 200, 0.1)
            print(f"{run} {name}: {row[name]:.4f}", flush=True)
        out[run] = row
    if args.results:
        Path(args.results).with_suffix(".json").write_text(json.dumps(
            {"command": "python benchmarks/vit_pooling_knn.py " + " ".join(
                [f"--data {args.data}", *args.runs, f"--train-images {args.train_images}",
                 f"--test-images {args.test_images}", f"--results {args.results}"]),
             "knn": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()

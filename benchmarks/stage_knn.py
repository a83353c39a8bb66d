"""kNN (k=200, T=0.1) on every stage of trained encoders, to see where a pretext task's features stop
being useful downstream (the last stages of context tasks specialise in the task). Each stage's map is
average-pooled to a small grid (``selfsup.evaluate.extract_stage_features``), after precise BN, as the
frozen protocols do.

    python benchmarks/stage_knn.py --data ../shared/data/cifar10 \\
        --runs random:convnet runs/budget_2026-11/jigsaw runs/budget/relative_location \\
        --results benchmarks/results/stage_knn

``--teacher`` evaluates the ``teacher_backbone.`` weights of the checkpoints instead (DINO runs made
before DINO was evaluated with its teacher by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfsup.checkpoint import safe_torch_load
from selfsup.data import load_images
from selfsup.evaluate import extract_stage_features, knn_top1, load_encoder
from selfsup.evaluate.features import extract_features, precise_bn


def labeled_splits(data: str, size: int, cache: dict) -> tuple:
    """``(train, test, train labels, test labels)`` of the labeled folder ``data`` at ``size`` px, loaded once
    per size (``cache``) for the runs of one script."""
    if size not in cache:
        tr, te = (load_images(data, split=sp, image_size=size, progress=False) for sp in ("train", "test"))
        cache[size] = tr, te, torch.from_numpy(tr.labels).long(), torch.from_numpy(te.labels).long()
    return cache[size]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("--runs", nargs="+", required=True, help="run directories or random:BACKBONE")
    ap.add_argument("--teacher", action="store_true", help="the checkpoints' teacher_backbone weights")
    ap.add_argument("--results", metavar="PREFIX", help="write PREFIX.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out, splits = {}, {}  # the labeled splits, loaded once per image size
    for run in args.runs:
        enc = load_encoder(run)
        if args.teacher:
            model = safe_torch_load(Path(run) / "checkpoints" / "last.pt")["model"]
            enc.backbone.load_state_dict({k[len("teacher_backbone."):]: v for k, v in model.items()
                                          if k.startswith("teacher_backbone.")})
        tr, te, ytr, yte = labeled_splits(args.data, enc.spec["image_size"], splits)
        precise_bn(enc, tr.images, "cpu")
        row = {"pooled": knn_top1(extract_features(enc, tr.images, "cpu"), ytr,
                                  extract_features(enc, te.images, "cpu"), yte, tr.num_classes, 200, 0.1)}
        ftr, fte = extract_stage_features(enc, tr.images, "cpu"), extract_stage_features(enc, te.images, "cpu")
        for name in ftr:
            row[name] = knn_top1(ftr[name], ytr, fte[name], yte, tr.num_classes, 200, 0.1)
        out[run] = row
        print(run, " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if args.results:
        Path(args.results).with_suffix(".json").write_text(json.dumps(
            {"command": "python benchmarks/stage_knn.py " + " ".join(
                ["--data", args.data, "--runs", *args.runs] + (["--teacher"] if args.teacher else [])),
             "knn": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()

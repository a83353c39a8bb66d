"""kNN (k=200, T=0.1, precise BN, test split) of a run's backbone along the run: its initial weights
(step 0, rebuilt from the run's config and seed, as the trainer builds them), every checkpoint kept with
``train.keep_every`` (``checkpoints/step_<N>.pt``) and the last one. Shows *when* a run loses or gains what
the random network's features had, e.g. the first steps of a BYOL run, where the heads are still random.

    selfsup pretrain --method byol --data ../shared/data/cifar10/train --backbone convnet --time 5m \\
        --batch-size 128 --out runs/traj_byol train.keep_every=40
    python benchmarks/trajectory_knn.py --data ../shared/data/cifar10 runs/traj_byol \\
        --results benchmarks/results/trajectory_byol

Prints one line per run (``step: kNN``) and writes ``PREFIX.json`` when ``--results`` is given.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from selfsup.checkpoint import load_checkpoint
from selfsup.configure import config_from_dict
from selfsup.evaluate import knn_top1, load_encoder
from selfsup.evaluate.features import extract_features, precise_bn
from selfsup.methods import get_method
from stage_knn import labeled_splits  # benchmarks/stage_knn.py, beside this script


def checkpoints(run: Path, last_step: int) -> list[tuple[int, Path]]:
    """``(step, file)`` of the kept checkpoints and ``last.pt`` (at ``last_step``), by step."""
    kept = [(int(m.group(1)), p) for p in (run / "checkpoints").glob("step_*.pt")
            if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    kept.append((last_step, run / "checkpoints" / "last.pt"))
    return sorted(dict(kept).items())


def knn(enc, splits) -> float:
    tr, te, ytr, yte = splits
    precise_bn(enc, tr.images, "cpu")
    return knn_top1(extract_features(enc, tr.images, "cpu", progress=False), ytr,
                    extract_features(enc, te.images, "cpu", progress=False), yte, tr.num_classes, 200, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--results", metavar="PREFIX", help="write PREFIX.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out, splits = {}, {}  # the labeled splits, loaded once per image size
    for run in args.runs:
        last = load_checkpoint(run / "checkpoints" / "last.pt")
        ckpts = checkpoints(run, int(last["step"]))
        enc = load_encoder(ckpts[-1][1])
        size = enc.spec["image_size"]
        labeled_splits(args.data, size, splits)
        cfg = config_from_dict(last["config"])
        torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
        prefix = enc.spec.get("weights", "backbone") + "."
        init = {k[len(prefix):]: v for k, v in get_method(cfg.method)(cfg).state_dict().items() if k.startswith(prefix)}
        enc.backbone.load_state_dict(init)
        row = {0: knn(enc, splits[size])}
        print(f"{run} step 0: {row[0]:.4f}", flush=True)
        for step, path in ckpts:
            row[step] = knn(load_encoder(path), splits[size])
            print(f"{run} step {step}: {row[step]:.4f}", flush=True)
        out[str(run)] = row
    if args.results:
        Path(args.results).with_suffix(".json").write_text(json.dumps(
            {"command": "python benchmarks/trajectory_knn.py --data " + args.data + " " + " ".join(map(str, args.runs)),
             "knn_by_step": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()

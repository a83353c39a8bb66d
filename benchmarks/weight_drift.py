"""How far did training move each stage of the backbone from its initialisation?

    python benchmarks/weight_drift.py RUN_DIR [RUN_DIR ...]

For each run, the method is rebuilt from the checkpoint's config with the run's seed (``torch.manual_seed(
train.seed)`` before the method, as the trainer does), which reproduces the initial weights; then, per
stage, the relative change of the convolution / linear weights ``||W - W0|| / ||W0||`` (all of the stage's
weight tensors together) and, from the final weights alone, the cosine between ``W`` and ``W0``. Prints a
markdown table. Reads no data; a few seconds per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from selfsup.checkpoint import load_checkpoint
from selfsup.configure import config_from_dict
from selfsup.methods import get_method


def drift(run_dir: Path) -> list[tuple[str, float, float]]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = config_from_dict(ckpt["config"])
    torch.manual_seed(cfg.train.seed)
    init = get_method(cfg.method)(cfg).backbone.state_dict()
    final = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    out = []
    for i in range(len(ckpt["backbone_spec"].get("stage_dims", [])) or 32):
        keys = [k for k in init if k.startswith(f"stages.{i}.") and k.endswith("weight") and init[k].dim() > 1]
        if not keys:
            break
        w0 = torch.cat([init[k].flatten().float() for k in keys])
        w = torch.cat([final[k].flatten().float() for k in keys])
        out.append((f"stage {i + 1}", float((w - w0).norm() / w0.norm()), float(torch.nn.functional.cosine_similarity(w, w0, dim=0))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    rows = {str(r): drift(r) for r in args.runs}
    stages = [s for s, _, _ in next(iter(rows.values()))]
    print("| run | " + " | ".join(f"{s}: change / cosine" for s in stages) + " |")
    print("|---|" + "---|" * len(stages))
    for r, vals in rows.items():
        print(f"| {r} | " + " | ".join(f"{c:.2f} / {cos:.2f}" for _, c, cos in vals) + " |")


if __name__ == "__main__":
    main()

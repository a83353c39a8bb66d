"""The dense-transfer table: CamVid mIoU of backbones pretrained (a) on CamVid's own frames, without their
labels, and (b) on CIFAR-10, beside random init and supervised training from scratch.

    python benchmarks/segment_table.py --camvid ../shared/data/camvid --cifar ../shared/data/cifar10 \\
        --out runs/segment --time 5m --results benchmarks/results/camvid_segment

Rows, all with the same backbone (``--backbone``, default convnet):

* ``random:BACKBONE`` frozen: the untrained network's features (precise BN on the frames);
* supervised from scratch: ``random:BACKBONE`` with ``--finetune`` (backbone and head trained on the
  labeled train split);
* every ``--methods`` entry pretrained for ``--time`` with its preset (``selfsup pretrain --time``) on
  (a) CamVid train + val frames (468 images, their labels never read; decoded at ``--camvid-size`` px,
  whole 4:3 frames for the crop methods, centre squares for the others: ``selfsup.data.size``; batch
  ``--camvid-batch-size``) and (b) CIFAR-10 train (32 px, ``--batch-size``), then
  evaluated frozen.

Evaluation: ``selfsup evaluate RUN --protocol segment --train CAMVID --test CAMVID --ignore-index 11``
(CamVid's train split for the head, its test split for the scores; the backbone runs at the frames'
240 x 180, rounded to its stride, whatever size it was pretrained at). Rows whose results exist are
skipped, so an interrupted table continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["rotation", "simclr", "vicreg"]
IGNORE = "11"  # CamVid's "unlabelled"


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def frames_folder(camvid: Path, out: Path) -> Path:
    """A flat folder of links to CamVid's train + val frames (the pretraining data: images only)."""
    folder = out / "camvid_frames"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for f in sorted((camvid / split / "images").iterdir()):
            link = folder / f"{split}_{f.name}"
            if not link.exists():
                os.symlink(f.resolve(), link)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--camvid", required=True, help="CamVid: train/ val/ test/, each images/ + labels/")
    ap.add_argument("--cifar", required=True, help="CIFAR-10 folder with train/ (labels unused)")
    ap.add_argument("--out", default="runs/segment")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--sources", nargs="+", default=["camvid", "cifar10"], choices=["camvid", "cifar10"])
    ap.add_argument("--backbone", default="convnet")
    ap.add_argument("--time", default="5m", help="pretraining budget per run")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--camvid-size", type=int, default=64, help="pretraining image size on CamVid frames")
    ap.add_argument("--camvid-batch-size", type=int, default=32, help="pretraining batch on CamVid's 468 frames")
    ap.add_argument("--cifar-size", type=int, default=32)
    ap.add_argument("--results", metavar="PREFIX", help="also write PREFIX.json and PREFIX.md")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    exe = [sys.executable, "-m", "selfsup"]
    camvid = Path(args.camvid)
    data = {"camvid": (frames_folder(camvid, out), args.camvid_size, args.camvid_batch_size),
            "cifar10": (Path(args.cifar) / "train", args.cifar_size, args.batch_size)}
    rows = [("random", None, False), ("supervised from scratch", None, True)]
    rows += [(m, src, False) for src in args.sources for m in args.methods]

    for name, src, finetune in rows:
        key = name if src is None else f"{name} ({src})"
        entry = results.get(key, {})
        if "miou" in entry:
            continue
        spec = f"random:{args.backbone}"
        if src is not None:
            run_dir = out / f"{src}_{name}"
            folder, size, batch = data[src]
            if "pretrain_s" not in entry:
                cmd = exe + ["pretrain", "--method", name, "--data", str(folder), "--out", str(run_dir),
                             "--backbone", args.backbone, "--time", args.time, "--batch-size", str(batch),
                             "--image-size", str(size), "--no-progress"]
                if (run_dir / "checkpoints" / "last.pt").exists():
                    cmd.append("--resume")
                entry["pretrain_s"] = round(run(cmd), 1)
                entry["pretrain_data"], entry["pretrain_size"], entry["pretrain_batch"] = str(folder), size, batch
                results[key] = entry
                results_path.write_text(json.dumps(results, indent=1))
            spec, eval_dir = str(run_dir), run_dir / "eval"
        else:
            eval_dir = out / ("random_finetune" if finetune else "random")
        cmd = exe + ["evaluate", spec, "--protocol", "segment", "--train", str(camvid), "--test", str(camvid),
                     "--ignore-index", IGNORE, "--out", str(eval_dir), "--no-progress"]
        if finetune:
            cmd.append("--finetune")
        entry["eval_s"] = round(run(cmd), 1)
        r = json.loads((eval_dir / ("segment_finetune.json" if finetune else "segment.json")).read_text())
        entry.update({"miou": r["miou"], "pixel_acc": r["pixel_acc"], "per_class_iou": r["per_class_iou"],
                      "finetune": finetune, "epochs": r.get("epochs"), "network_size": r.get("network_size")})
        results[key] = entry
        results_path.write_text(json.dumps(results, indent=1))

    lines = ["| backbone weights | pretraining data | mIoU | pixel accuracy | pretraining | evaluation |",
             "|---|---|---|---|---|---|"]
    for name, src, finetune in rows:
        key = name if src is None else f"{name} ({src})"
        e = results.get(key)
        if not e or "miou" not in e:
            continue
        what = {"camvid": f"CamVid train+val frames, no labels ({args.camvid_size} px, batch {args.camvid_batch_size})",
                "cifar10": f"CIFAR-10 train ({args.cifar_size} px, batch {args.batch_size})"}.get(src, "-")
        pre = f"{e['pretrain_s'] / 60:.1f} min" if "pretrain_s" in e else "-"
        how = "backbone + head trained" if finetune else "frozen, linear per pixel"
        lines.append(f"| {name} | {what} | {e['miou']:.3f} | {e['pixel_acc']:.3f} | {pre} | {how} |")
    header = (f"{args.backbone}, CamVid (11 classes, 'unlabelled' ignored): head on the 367 train frames, "
              f"scores on the 233 test frames at 240 x 180; pretraining budget {args.time} per run.")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    if args.results:
        prefix = Path(args.results)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "camvid": args.camvid, "cifar": args.cifar,
                "backbone": args.backbone, "time": args.time, "batch_size": args.batch_size,
                "camvid_size": args.camvid_size, "camvid_batch_size": args.camvid_batch_size,
                "cifar_size": args.cifar_size}
        prefix.with_suffix(".json").write_text(json.dumps({"settings": meta, "rows": results}, indent=1))
        prefix.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

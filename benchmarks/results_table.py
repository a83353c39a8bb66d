"""The docs' results table: pretrain several methods at the same budget, evaluate each with kNN and
the linear probe, and print one markdown table (also written to OUT/results.md and OUT/results.json).

    python benchmarks/results_table.py --data ../shared/data/cifar10 --out runs/table \\
        --backbone convnet --epochs 1 --batch-size 128

Every method is trained with the same backbone, image size, batch size and number of epochs (each
method's own preset otherwise: optimizer, lr, augmentation, method parameters), one after another in
a fresh process (``selfsup pretrain``), then evaluated on the labeled train/test splits with
``selfsup evaluate --protocol knn`` and ``--protocol linear``. ``random:BACKBONE`` (no training) is the
baseline row (one per backbone used). A method whose run and evaluations already exist in OUT is not
redone, so an interrupted table continues where it stopped (an interrupted pretraining is resumed).

``--set METHOD:key=value`` (repeatable) adds a config override for one method, e.g.
``--set mae:model.backbone=vit_tiny`` (MAE needs a ViT; the table then also gets a ``random:vit_tiny``
row) or ``--set distill:params.teacher=runs/table/simclr``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

CLASSIC = ["rotation", "jigsaw", "relative_location", "colorization", "inpainting", "dcgan", "bigan",
           "deepcluster", "simclr"]


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/ (pretraining uses train/)")
    ap.add_argument("--out", default="runs/table")
    ap.add_argument("--methods", nargs="+", default=CLASSIC)
    ap.add_argument("--backbone", default="convnet")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=200, help="kNN neighbours")
    ap.add_argument("--no-random", action="store_true", help="skip the random-init baseline rows")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:key=value",
                    help="a config override for one method (repeatable)")
    args = ap.parse_args()
    per_method: dict[str, list[str]] = {}
    for item in args.set:
        method, sep, kv = item.partition(":")
        if not sep or "=" not in kv or method not in args.methods:
            ap.error(f"--set takes METHOD:key=value with METHOD one of --methods, got {item!r}")
        per_method.setdefault(method, []).append(kv)
    backbone_of = {m: args.backbone for m in args.methods}
    for m, kvs in per_method.items():
        for kv in kvs:
            if kv.startswith("model.backbone="):
                backbone_of[m] = kv.split("=", 1)[1]
        per_method[m] = [kv for kv in kvs if not kv.startswith("model.backbone=")]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    exe = [sys.executable, "-m", "selfsup"]
    rows = [] if args.no_random else [f"random:{args.backbone}"]
    for m in args.methods:  # another backbone's baseline comes just before its first method
        if not args.no_random and f"random:{backbone_of[m]}" not in rows:
            rows.append(f"random:{backbone_of[m]}")
        rows.append(m)

    def run_dir_of(name: str) -> Path:
        if name.startswith("random:"):  # the first backbone's baseline keeps the plain name "random"
            return out / ("random" if name == f"random:{args.backbone}" else "random-" + name.split(":", 1)[1])
        return out / name

    for name in rows:
        is_random = name.startswith("random:")
        run_dir = run_dir_of(name)
        entry = results.get(name, {})
        if not is_random and "pretrain_s" not in entry:
            cmd = exe + ["pretrain", "--method", name, "--data", str(Path(args.data) / "train"), "--out", str(run_dir),
                         "--backbone", backbone_of[name], "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                         "--image-size", str(args.image_size), "--no-progress", *per_method.get(name, [])]
            if (run_dir / "checkpoints" / "last.pt").exists():
                cmd.append("--resume")
            entry["pretrain_s"] = round(run(cmd), 1)
        for protocol in ("knn", "linear"):
            done = run_dir / "eval" / f"{protocol}.json"
            if protocol in entry:
                continue
            if done.exists() and done.stat().st_mtime > (run_dir / "checkpoints" / "last.pt").stat().st_mtime \
                    if not is_random else done.exists():
                entry[protocol] = json.loads(done.read_text())["top1"]  # from an interrupted table run
                continue
            cmd = exe + ["evaluate", name if is_random else str(run_dir), "--protocol", protocol,
                         "--train", args.data, "--test", args.data, "--k", str(args.k), "--no-progress"]
            if is_random:
                cmd += ["--out", str(run_dir / "eval"), "--image-size", str(args.image_size)]
            run(cmd)
            entry[protocol] = json.loads((run_dir / "eval" / f"{protocol}.json").read_text())["top1"]
        results[name] = entry
        results_path.write_text(json.dumps(results, indent=1))

    lines = [f"| method | kNN top-1 (k={args.k}) | linear top-1 | training steps time | source img/s |",
             "|---|---|---|---|---|"]
    for name in rows:
        e = results[name]
        t, speed = "-", "-"
        metrics = run_dir_of(name) / "metrics.csv"
        if not name.startswith("random:") and metrics.exists():
            last = list(csv.DictReader(open(metrics)))[-1]
            secs = float(last["elapsed_s"])  # time inside training steps (no data decoding, health, figures)
            t = f"{secs / 60:.1f} min"
            speed = f"{int(round(float(last['step']) * args.batch_size / secs))}"
        mark, base = "", results.get(f"random:{backbone_of.get(name)}")
        label = name if backbone_of.get(name, args.backbone) == args.backbone else f"{name} ({backbone_of[name]})"
        if base and not name.startswith("random:") and (e["knn"] <= base["knn"] or e["linear"] <= base["linear"]):
            mark = " (not above random init)"
        lines.append(f"| {label}{mark} | {e['knn']:.3f} | {e['linear']:.3f} | {t} | {speed} |")
    header = (f"{args.backbone} (unless named), {args.image_size} px, batch {args.batch_size}, {args.epochs} epoch(s) over "
              f"{Path(args.data) / 'train'}; kNN and linear probe on all training labels, test split.")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

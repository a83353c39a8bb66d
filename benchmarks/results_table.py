"""The docs' results table: pretrain several methods at the same budget, evaluate each with kNN and
the linear probe, and print one markdown table (also written to OUT/results.md and OUT/results.json,
and to ``--results PREFIX.{json,md}`` when given, e.g. under benchmarks/results/ to commit).

    python benchmarks/results_table.py --data ../shared/data/cifar10 --out runs/budget \\
        --backbone convnet --time 5m --batch-size 128 --results benchmarks/results/budget_5m

Every method is trained with the same backbone, image size, batch size and budget, ``--time`` (each
run measures its own throughput and sizes itself to end within it: ``selfsup pretrain --time``) or
``--epochs`` (each method's own preset otherwise: optimizer, lr, augmentation, method parameters),
one after another in a fresh process (``selfsup pretrain``), then evaluated on the labeled
train/test splits with ``selfsup evaluate --protocol knn`` and ``--protocol linear`` (both re-estimate
the BatchNorm statistics on the training images first: precise BN, no labels). ``random:BACKBONE`` (no training) is the
baseline row (one per backbone used), the mean of ``--random-seeds`` initialisations (3 by default).
A method whose run and evaluations already exist in OUT is not redone, so an interrupted table continues where it stopped (an interrupted pretraining is resumed).

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


def run_facts(run_dir: Path) -> dict:
    """Steps, epochs, the in-step time and the last label-free health of a finished run."""
    import yaml

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    last = rows[-1]
    health = [r for r in rows if r.get("rankme")]
    return {"steps": int(last["step"]), "epochs": float(last["epoch"]), "step_time_s": float(last["elapsed_s"]),
            "total_steps": cfg["train"].get("total_steps"), "time_budget": cfg["train"].get("time_budget"),
            "rankme": float(health[-1]["rankme"]) if health else None,
            "final_loss": float(last["loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/ (pretraining uses train/)")
    ap.add_argument("--out", default="runs/table")
    ap.add_argument("--methods", nargs="*", default=CLASSIC,
                    help="methods to train (default: the classic ones); --methods with no names: only the random-init rows")
    ap.add_argument("--backbone", default="convnet")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="epochs per method (default 1 unless --time)")
    budget.add_argument("--time", help="time budget per method (whole pretraining run), e.g. 5m")
    ap.add_argument("--results", metavar="PREFIX", help="also write PREFIX.json and PREFIX.md (e.g. "
                    "benchmarks/results/budget_5m, to commit)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=200, help="kNN neighbours")
    ap.add_argument("--no-random", action="store_true", help="skip the random-init baseline rows")
    ap.add_argument("--random-seeds", type=int, default=3, metavar="N",
                    help="a random-init row is the mean of N initialisations (--seed 0..N-1 of selfsup evaluate; "
                         "default 3: one draw's kNN varies by about 0.01)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:key=value",
                    help="a config override for one method (repeatable)")
    args = ap.parse_args()
    if args.time is None and args.epochs is None:
        args.epochs = 1
    length = ["--time", args.time] if args.time else ["--epochs", str(args.epochs)]
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

    n_random = max(1, args.random_seeds)

    def random_row(name: str) -> dict:
        """The random-init baseline: each of ``--random-seeds`` initialisations evaluated (kNN, linear), and
        their mean; seed 0 in the row's own directory, seed s in ``<dir>_s<s>``."""
        entry = results.setdefault(name, {})
        seeds = entry.setdefault("seeds", {})
        if "0" not in seeds and "knn" in entry and "linear" in entry:  # a table written before seeds were kept
            seeds["0"] = {"knn": entry["knn"], "linear": entry["linear"]}
        base = run_dir_of(name)
        for s in range(n_random):
            d = base if s == 0 else base.with_name(f"{base.name}_s{s}")
            got = seeds.setdefault(str(s), {})
            for protocol in ("knn", "linear"):
                done = d / "eval" / f"{protocol}.json"
                if protocol not in got:
                    if not done.exists():
                        run(exe + ["evaluate", name, "--protocol", protocol, "--train", args.data, "--test", args.data,
                                   "--k", str(args.k), "--no-progress", "--seed", str(s), "--out", str(d / "eval"),
                                   "--image-size", str(args.image_size)])
                    got[protocol] = json.loads(done.read_text())["top1"]
            results_path.write_text(json.dumps(results, indent=1))  # an interrupted table keeps the seeds done
        used = [seeds[str(s)] for s in range(n_random)]
        entry.update({p: sum(u[p] for u in used) / len(used) for p in ("knn", "linear")})
        return entry

    for name in rows:
        if name.startswith("random:"):
            random_row(name)
            results_path.write_text(json.dumps(results, indent=1))
            continue
        run_dir = run_dir_of(name)
        entry = results.get(name, {})
        if "pretrain_s" not in entry:
            cmd = exe + ["pretrain", "--method", name, "--data", str(Path(args.data) / "train"), "--out", str(run_dir),
                         "--backbone", backbone_of[name], *length, "--batch-size", str(args.batch_size),
                         "--image-size", str(args.image_size), "--no-progress", *per_method.get(name, [])]
            if (run_dir / "checkpoints" / "last.pt").exists():
                cmd.append("--resume")
            entry["pretrain_s"] = round(run(cmd), 1)
            entry.update(run_facts(run_dir))
        for protocol in ("knn", "linear"):
            done = run_dir / "eval" / f"{protocol}.json"
            if protocol in entry:
                continue
            if done.exists() and done.stat().st_mtime > (run_dir / "checkpoints" / "last.pt").stat().st_mtime:
                entry[protocol] = json.loads(done.read_text())["top1"]  # from an interrupted table run
                continue
            run(exe + ["evaluate", str(run_dir), "--protocol", protocol, "--train", args.data, "--test", args.data,
                       "--k", str(args.k), "--no-progress"])
            entry[protocol] = json.loads(done.read_text())["top1"]
        results[name] = entry
        results_path.write_text(json.dumps(results, indent=1))

    lines = [f"| method | kNN top-1 (k={args.k}) | linear top-1 | steps (epochs) | run wall time | RankMe |",
             "|---|---|---|---|---|---|"]
    for name in rows:
        e = results[name]
        steps, wall, rank = "-", "-", "-"
        if not name.startswith("random:"):
            if "steps" not in e and (run_dir_of(name) / "metrics.csv").exists():
                e.update(run_facts(run_dir_of(name)))
            steps = f"{e['steps']} ({e['epochs']:.2f})" if "steps" in e else "-"
            wall = f"{e['pretrain_s'] / 60:.2f} min" if "pretrain_s" in e else "-"
            rank = f"{e['rankme']:.0f}" if e.get("rankme") is not None else "-"
        mark, base = "", results.get(f"random:{backbone_of.get(name)}")
        label = name if backbone_of.get(name, args.backbone) == args.backbone else f"{name} ({backbone_of[name]})"
        if base and not name.startswith("random:") and (e["knn"] <= base["knn"] or e["linear"] <= base["linear"]):
            mark = " (not above random init)"
        used = [e["seeds"][str(s)] for s in range(n_random)] if name.startswith("random:") else []
        if len(used) > 1:
            knn, lin = (" / ".join(f"{u[p]:.3f}" for u in used) for p in ("knn", "linear"))
            mark = f" (mean of {len(used)} initialisations: kNN {knn}, linear {lin})"
        lines.append(f"| {label}{mark} | {e['knn']:.3f} | {e['linear']:.3f} | {steps} | {wall} | {rank} |")
    what = f"a {args.time} budget per run" if args.time else f"{args.epochs} epoch(s)"
    header = (f"{args.backbone} (unless named), {args.image_size} px, batch {args.batch_size}, {what} over "
              f"{Path(args.data) / 'train'}; kNN and linear probe on all training labels, test split.")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    results_path.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    if args.results:
        prefix = Path(args.results)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "data": args.data, "backbone": args.backbone,
                "image_size": args.image_size, "batch_size": args.batch_size, "time": args.time,
                "epochs": args.epochs, "k": args.k}
        prefix.with_suffix(".json").write_text(json.dumps({"settings": meta, "rows": {n: results[n] for n in rows}},
                                                          indent=1))
        prefix.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

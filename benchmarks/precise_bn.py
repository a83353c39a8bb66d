"""kNN with and without precise BN for the runs of a results table (``benchmarks/results_table.py``):
what re-estimating the BatchNorm statistics on the training images' evaluation views changes, per
method, in one run of this script.

    python benchmarks/precise_bn.py --table runs/budget --data ../shared/data/cifar10 \\
        --results benchmarks/results/budget_5m_precise_bn

For each row of ``TABLE/results.json`` it runs ``selfsup evaluate --protocol knn --no-precise-bn`` into
``RUN_DIR/eval_no_precise_bn/`` (skipped when that json exists) and prints a markdown table next to the
table's kNN (with precise BN, the default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="the --out folder of results_table.py")
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--results", metavar="PREFIX", help="also write PREFIX.json and PREFIX.md")
    ap.add_argument("--rows", nargs="+", help="only these rows of the table (default: all)")
    args = ap.parse_args()
    table = Path(args.table)
    results = json.loads((table / "results.json").read_text())
    rows = {}
    for name, entry in results.items():
        if "knn" not in entry or (args.rows and name not in args.rows):
            continue
        if name.startswith("random:"):
            backbone = name.split(":", 1)[1]
            run_dir = table / ("random" if (table / "random" / "eval" / "knn.json").exists() and
                               json.loads((table / "random" / "eval" / "knn.json").read_text())["run"] == name
                               else f"random-{backbone}")
            target, extra = name, ["--image-size", "32"]
        else:
            run_dir, target, extra = table / name, str(table / name), []
        out = run_dir / "eval_no_precise_bn"
        if not (out / "knn.json").exists():
            cmd = [sys.executable, "-m", "selfsup", "evaluate", target, "--protocol", "knn", "--train", args.data,
                   "--test", args.data, "--k", str(args.k), "--no-progress", "--no-precise-bn", "--out", str(out),
                   *extra]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        without = json.loads((out / "knn.json").read_text())["top1"]
        rows[name] = {"knn_precise_bn": entry["knn"], "knn_checkpoint_bn": without}
    lines = ["| method | kNN, precise BN (default) | kNN, the checkpoint's BN statistics | difference |",
             "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['knn_precise_bn']:.3f} | {r['knn_checkpoint_bn']:.3f} | "
                     f"{r['knn_precise_bn'] - r['knn_checkpoint_bn']:+.3f} |")
    text = "\n".join(lines) + "\n"
    if args.results:
        prefix = Path(args.results)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
        prefix.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

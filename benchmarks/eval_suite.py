"""Every evaluation protocol on several runs and the baselines, then one comparison report.

    python benchmarks/eval_suite.py --data ../shared/data/cifar10 --out runs/suite \\
        --runs runs/table/rotation runs/table/simclr --backbone convnet

For each run (and ``random:BACKBONE``, written to OUT/random) it runs ``selfsup evaluate`` with knn,
linear, layers, retrieval, robustness, finetune at each ``--fractions``, and pseudolabel / fixmatch
at the fractions below 1 (for the random baseline only with ``--semi-baseline``: the semi-supervised
protocols start from a pretrained backbone); the supervised-from-scratch baseline is
``random:BACKBONE --protocol finetune --fraction 1.0`` (in OUT/random). Evaluations already written
are not redone, so an interrupted suite continues. Finally ``selfsup compare`` writes
OUT/compare/compare.{md,csv,html} and each run gets its ``report.html``.

Budget: ``--finetune-steps`` / ``--semi-steps`` fix the number of optimizer steps of every fraction
(batch 64 labeled, plus ``--mu`` x 64 unlabeled for pseudolabel / fixmatch), so that 1%, 10% and 100%
get the same compute; without them each protocol uses its own default (30 epochs, 500-10,000 steps).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

FROZEN = ["knn", "linear", "layers", "retrieval", "robustness"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("--runs", nargs="+", required=True, help="run directories to evaluate")
    ap.add_argument("--out", default="runs/suite")
    ap.add_argument("--backbone", default="convnet", help="backbone of the random-init / supervised baselines")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    ap.add_argument("--finetune-steps", type=int, help="optimizer steps of finetune (default: the protocol's)")
    ap.add_argument("--semi-steps", type=int, help="optimizer steps of pseudolabel / fixmatch (default: theirs)")
    ap.add_argument("--mu", type=int, help="pseudolabel / fixmatch: unlabeled images per labeled one (default 7)")
    ap.add_argument("--semi-baseline", action="store_true", help="also run pseudolabel / fixmatch from random init")
    ap.add_argument("--protocols", nargs="+", default=FROZEN + ["finetune", "pseudolabel", "fixmatch"])
    args = ap.parse_args()

    exe = [sys.executable, "-m", "selfsup"]
    out = Path(args.out)
    random_dir = out / "random"
    targets = [(str(r), Path(r) / "eval", []) for r in args.runs]
    targets.append((f"random:{args.backbone}", random_dir, ["--out", str(random_dir), "--image-size",
                                                             str(args.image_size)]))
    for name, eval_dir, extra in targets:
        for protocol in args.protocols:
            if protocol in ("pseudolabel", "fixmatch") and name.startswith("random:") and not args.semi_baseline:
                continue
            if protocol in FROZEN:
                jobs = [(protocol, None)]
            else:
                fracs = [f for f in args.fractions if protocol == "finetune" or f < 1.0]
                jobs = [(protocol, f) for f in fracs]
            for proto, frac in jobs:
                result = eval_dir / (f"{proto}.json" if frac is None else f"{proto}_{frac:g}.json")
                if result.exists():
                    continue
                cmd = exe + ["evaluate", name, "--protocol", proto, "--train", args.data, "--test", args.data,
                             "--no-progress", *extra]
                if frac is not None:
                    cmd += ["--fraction", f"{frac:g}"]
                    steps = args.finetune_steps if proto == "finetune" else args.semi_steps
                    if steps:
                        cmd += ["--steps", str(steps)]
                    if args.mu and proto != "finetune":
                        cmd += ["--mu", str(args.mu)]
                run(cmd)
    for r in args.runs:
        run(exe + ["report", r, "--data", args.data])
    run(exe + ["compare", *args.runs, str(random_dir), "--out", str(out / "compare"), "--data", args.data])


if __name__ == "__main__":
    main()

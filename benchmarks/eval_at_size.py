"""kNN of a run's checkpoint with its evaluation views at another image size than it was pretrained at,
e.g. a jigsaw run at its tiles' 16 px (benchmarks/results/jigsaw_2m_probes.md):

    python benchmarks/eval_at_size.py RUN_DIR 16 --data ../shared/data/cifar10

Compare with `selfsup evaluate random:convnet --protocol knn --image-size 16 ...` (the untrained network
at the same size). The backbone is built as pretrained; only the size of the views fed to it changes.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from selfsup.evaluate import evaluate
    from selfsup.run import load_encoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("size", type=int)
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/ splits")
    ap.add_argument("--out", help="where knn.json goes (default RUN/eval_SIZEpx)")
    args = ap.parse_args()
    enc = load_encoder(args.run)
    enc.spec = dict(enc.spec, image_size=args.size)
    r = evaluate(args.run, "knn", args.data, args.data, out=args.out or f"{args.run}/eval_{args.size}px", encoder=enc,
                 progress=False)
    print(f"{args.run} at {args.size} px: kNN {r['top1']:.4f}")


if __name__ == "__main__":  # spawned decoding workers import this file
    main()

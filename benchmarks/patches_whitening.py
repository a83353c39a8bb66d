"""What the output whitening of the ``patches`` features does to the kNN and linear probes.

    python benchmarks/patches_whitening.py --run runs/budget/patches --data ../shared/data/cifar10 \
        --results benchmarks/results/patches_whitening

Extracts the run's raw pooled codes (the output whitening of a whitened run is bypassed) of the
train and test splits once (the evaluation's feature cache), then scores with the evaluation's kNN
(k = 200, T = 0.1) and linear probe: the raw codes, centred, standardised per feature, and
PCA-whitened (:func:`selfsup.backbones.pca_whitening`, the method's own function) from the codes of
``--images`` training images drawn with a fixed seed, for every ``--dims`` x ``--eps``. No labels
enter the whitening; the test split is only scored.

``--power P ...``: the same whitened rows after a power normalisation of the codes, ``codes ** P``
(Perronnin et al. 2010: the codes are non-negative pooled frequencies, and a root, P = 0.5 by
default, damps the frequent ones). ``--flip``: the codes averaged with those of the horizontally flipped image (a fixed,
label-free test-time average; it doubles the encoding), whitened the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from selfsup.backbones import pca_whitening
from selfsup.data.cache import load_images
from selfsup.evaluate import load_encoder
from selfsup.evaluate.features import cached_features, extract_features
from selfsup.evaluate.knn import knn_top1
from selfsup.evaluate.linear import linear_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a patches run")
    ap.add_argument("--data", required=True, help="labeled folder with train/ and test/")
    ap.add_argument("--images", type=int, default=10_000, help="training images whose codes fit the whitening")
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    ap.add_argument("--linear", nargs="*", default=["raw", "1024:0.03"],
                    help="rows that also get the linear probe: raw, or [PREFIX]DIMS:EPS (PREFIX 'sqrt, ', "
                         "'flip-averaged, ', 'flip-averaged sqrt, ')")
    ap.add_argument("--no-plain", action="store_true", help="skip the raw, centred and standardised rows")
    ap.add_argument("--power", type=float, nargs="*", metavar="P",
                    help="also score codes ** P, whitened (no value: 0.5, the square root)")
    ap.add_argument("--flip", action="store_true", help="also score codes averaged with the flipped image's")
    ap.add_argument("--results", metavar="PREFIX", help="also write PREFIX.json and PREFIX.md")
    a = ap.parse_args()
    torch.manual_seed(0)

    enc = load_encoder(a.run)
    pe = enc.backbone
    if getattr(pe, "whiten", 0) or getattr(pe, "power", 1) != 1 or getattr(pe, "flip", False):
        pe.whiten, pe.out_dim, pe.power, pe.flip = 0, pe.pooled_dim, 1.0, False  # the codes as they are
        # a spec of its own, so the feature cache never serves the run's own (whitened) features
        enc.spec = {**enc.spec, "options": {**enc.spec.get("options", {}), "whiten": 0, "power": 1.0, "flip": False}}
    size = enc.spec["image_size"]
    tr_img, te_img = load_images(a.data, "train", size), load_images(a.data, "test", size)
    ytr, yte = torch.from_numpy(tr_img.labels), torch.from_numpy(te_img.labels)
    t0 = time.perf_counter()
    tr, te = cached_features(enc, tr_img.images).float(), cached_features(enc, te_img.images).float()
    print(f"raw codes {tuple(tr.shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
    classes = int(max(ytr.max(), yte.max())) + 1

    rows = []

    def score(name: str, f, linear: bool) -> None:
        t = time.perf_counter()
        row = {"features": name, "knn": knn_top1(f(tr), ytr, f(te), yte, classes)}
        if linear:
            row["linear"] = linear_probe(f(tr), ytr, f(te), yte, classes)["top1"]
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not a.no_plain:
        mu, sd = tr.mean(0), tr.std(0)
        score("raw", lambda x: x, "raw" in a.linear)
        score("centred", lambda x: x - mu, False)
        score("standardised", lambda x: (x - mu) / (sd + 1e-3), False)
    idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:a.images]

    def whitened(prefix: str, tr_x: torch.Tensor, te_x: torch.Tensor) -> None:
        nonlocal tr, te
        tr, te = tr_x, te_x  # score() reads these
        t = time.perf_counter()
        m, p0, evals = pca_whitening(tr[idx], max(a.dims), 0.0)  # one eigendecomposition for every row
        print(f"{prefix}covariance and eigendecomposition: {time.perf_counter() - t:.0f} s", flush=True)
        axes = p0 * evals.clamp_min(1e-12).sqrt()  # the principal axes (unit columns)
        for dim in a.dims:
            for eps in a.eps:  # pca_whitening(x, dim, eps): the same axes, regularised by eps * mean(L_dim)
                ev = evals[:dim]
                p = axes[:, :dim] / (ev + eps * ev.mean()).sqrt()
                score(f"{prefix}pca-whitened {dim}, eps {eps:g}", lambda x, p=p, m=m: (x - m) @ p,
                      f"{prefix}{dim}:{eps:g}" in a.linear)

    raw_tr, raw_te = tr, te
    whitened("", raw_tr, raw_te)
    powers = [] if a.power is None else (a.power or [0.5])

    def label(pw: float) -> str:
        return "sqrt, " if pw == 0.5 else f"power {pw:g}, "

    for pw in powers:
        whitened(label(pw), raw_tr.pow(pw), raw_te.pow(pw))
        tr, te = raw_tr, raw_te  # drop the powered copy before the next
    if a.flip:
        t0 = time.perf_counter()
        ftr = extract_features(enc, np.ascontiguousarray(tr_img.images[:, :, ::-1])).float()
        fte = extract_features(enc, np.ascontiguousarray(te_img.images[:, :, ::-1])).float()
        print(f"flipped images' codes in {time.perf_counter() - t0:.0f} s", flush=True)
        avg_tr, avg_te = ftr.add_(raw_tr).div_(2), fte.add_(raw_te).div_(2)  # in place: the codes are large
        del raw_tr, raw_te
        whitened("flip-averaged, ", avg_tr, avg_te)
        for pw in powers:
            whitened("flip-averaged " + label(pw), avg_tr.pow(pw), avg_te.pow(pw))
            tr, te = avg_tr, avg_te

    lines = [f"patches features of {a.run} on {a.data} (kNN k=200; whitening fitted on {a.images} training images)",
             "", "| features | kNN top-1 | linear top-1 |", "|---|---|---|"]
    lines += [f"| {r['features']} | {r['knn']:.3f} | {r['linear']:.3f} |" if "linear" in r
              else f"| {r['features']} | {r['knn']:.3f} | - |" for r in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if a.results:
        Path(a.results + ".json").write_text(json.dumps({"run": a.run, "data": a.data, "images": a.images,
                                                         "rows": rows}, indent=1) + "\n")
        Path(a.results + ".md").write_text(text + "\n")


if __name__ == "__main__":
    main()

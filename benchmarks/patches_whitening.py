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
default, damps the frequent ones). ``--flip``: the codes averaged with those of the horizontally
mirrored image (the layer's own ``flip``: a fixed, label-free average; it doubles the encoding),
whitened the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from selfsup.backbones import pca_whitening
from selfsup.data.cache import load_images
from selfsup.evaluate import load_encoder
from selfsup.evaluate.features import cached_features
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

    def codes_of(images, flip: bool) -> torch.Tensor:
        """The run's pooled codes before its power and output whitening (``flip``: the layer's own
        mirror average), through the evaluation's feature cache under a spec of their own."""
        pe.whiten, pe.out_dim, pe.power, pe.flip = 0, pe.pooled_dim, 1.0, flip
        enc.spec = {**enc.spec, "options": {**enc.spec.get("options", {}), "whiten": 0, "power": 1.0, "flip": flip}}
        return cached_features(enc, images).float()

    size = enc.spec["image_size"]
    tr_img, te_img = load_images(a.data, "train", size), load_images(a.data, "test", size)
    ytr, yte = torch.from_numpy(tr_img.labels), torch.from_numpy(te_img.labels)
    t0 = time.perf_counter()
    tr, te = codes_of(tr_img.images, False), codes_of(te_img.images, False)
    print(f"raw codes {tuple(tr.shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
    classes = int(max(ytr.max(), yte.max())) + 1

    rows = []

    def score(name: str, f, linear: bool, tr: torch.Tensor, te: torch.Tensor) -> None:
        t = time.perf_counter()
        row = {"features": name, "knn": knn_top1(f(tr), ytr, f(te), yte, classes)}
        if linear:
            row["linear"] = linear_probe(f(tr), ytr, f(te), yte, classes)["top1"]
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not a.no_plain:
        mu, sd = tr.mean(0), tr.std(0)
        score("raw", lambda x: x, "raw" in a.linear, tr, te)
        score("centred", lambda x: x - mu, False, tr, te)
        score("standardised", lambda x: (x - mu) / (sd + 1e-3), False, tr, te)
    idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:a.images]

    def whitened(prefix: str, tr: torch.Tensor, te: torch.Tensor) -> None:
        t = time.perf_counter()
        m, p0, evals = pca_whitening(tr[idx], max(a.dims), 0.0)  # one eigendecomposition for every row
        print(f"{prefix}covariance and eigendecomposition: {time.perf_counter() - t:.0f} s", flush=True)
        axes = p0 * evals.clamp_min(1e-12).sqrt()  # the principal axes (unit columns)
        for dim in a.dims:
            for eps in a.eps:  # pca_whitening(x, dim, eps): the same axes, regularised by eps * mean(L_dim)
                ev = evals[:dim]
                p = axes[:, :dim] / (ev + eps * ev.mean()).sqrt()
                score(f"{prefix}pca-whitened {dim}, eps {eps:g}", lambda x, p=p, m=m: (x - m) @ p,
                      f"{prefix}{dim}:{eps:g}" in a.linear, tr, te)

    powers = [] if a.power is None else (a.power or [0.5])

    def label(pw: float) -> str:
        return "sqrt, " if pw == 0.5 else f"power {pw:g}, "

    whitened("", tr, te)
    for pw in powers:
        whitened(label(pw), tr.pow(pw), te.pow(pw))
    if a.flip:
        del tr, te  # the codes are large (18,432 features at grid 3)
        t0 = time.perf_counter()
        tr, te = codes_of(tr_img.images, True), codes_of(te_img.images, True)
        print(f"mirror-averaged codes in {time.perf_counter() - t0:.0f} s", flush=True)
        whitened("flip-averaged, ", tr, te)
        for pw in powers:
            whitened("flip-averaged " + label(pw), tr.pow(pw), te.pow(pw))

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

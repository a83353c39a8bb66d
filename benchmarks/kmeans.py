"""selfsup.cluster.kmeans vs scikit-learn's KMeans (Lloyd, n_init=1, the same number of iterations) on
random features: wall time, their ratio, and the final inertia (sum of squared distances) of each.

    OMP_NUM_THREADS=1 python benchmarks/kmeans.py --n 50000 --dim 128 --k 100 --iters 20

scikit-learn gets ``tol=0`` (it may still stop early when no label changes) and the same init kind;
its k-means++ is the greedy variant (2 + log k candidates per centre), so the k-means++ rows also
compare two slightly different initialisations. The last line is ``sklearn_over_torch: R`` for the
random init (R > 1: ours is faster).
"""

from __future__ import annotations

import argparse
import time

import torch

from selfsup.cluster import kmeans


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-sklearn", action="store_true", help="time only selfsup's k-means (e.g. on a GPU)")
    a = p.parse_args()

    from sklearn.cluster import KMeans

    dev = torch.device(a.device)
    x = torch.randn(a.n, a.dim, generator=torch.Generator().manual_seed(0))
    xd = x.to(dev)
    print(f"data: {a.n} x {a.dim} random normal, k={a.k}, {a.iters} iterations, device={dev}, "
          f"torch threads={torch.get_num_threads()}")
    ratios = {}
    for init in ("random", "k-means++"):
        kmeans(xd[:2000], min(a.k, 2000), 2, torch.Generator().manual_seed(1), init)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        c, lab = kmeans(xd, a.k, a.iters, torch.Generator().manual_seed(0), init)
        sync(dev)
        t_ours = time.perf_counter() - t0
        inertia = float(((xd - c[lab]) ** 2).sum())
        print(f"init={init:10s} selfsup:  {t_ours:7.3f} s  inertia {inertia:.5g}")
        if a.no_sklearn:
            continue
        t0 = time.perf_counter()
        km = KMeans(a.k, init=init, n_init=1, max_iter=a.iters, tol=0.0, algorithm="lloyd", random_state=0)
        km.fit(x.numpy())
        t_sk = time.perf_counter() - t0
        print(f"init={init:10s} sklearn:  {t_sk:7.3f} s  inertia {km.inertia_:.5g}  ({km.n_iter_} iterations)")
        ratios[init] = t_sk / t_ours
        print(f"init={init:10s} sklearn / selfsup time: {ratios[init]:.2f}")
    if "random" in ratios:
        print(f"sklearn_over_torch: {ratios['random']:.2f}")


if __name__ == "__main__":
    main()

"""More atoms or a finer pooling grid for the whitened patches features, on a subset (10,000 training and
2,000 test images of CIFAR-10, fixed seed): raw kNN and kNN after a randomized PCA whitening to 1,024 /
2,048 dimensions, for K = 1024 / 2048 atoms and pooling grids 2 / 3. The figures in
src/selfsup/methods/patches.py (K = 2048 does not help, grid 3 adds 0.015) come from:

    python benchmarks/patches_atoms_grid.py > benchmarks/results/patches_atoms_grid.jsonl
"""
import time, numpy as np, torch, json
from selfsup.configure import build_config
from selfsup.methods.patches import Patches
from selfsup.data.cache import load_images
from selfsup.evaluate.knn import knn_top1
if __name__ == "__main__":
    torch.set_num_threads(2)
    tr = load_images("../shared/data/cifar10", "train", 32); te = load_images("../shared/data/cifar10", "test", 32)
    rng = np.random.default_rng(0)
    itr = np.sort(rng.choice(len(tr.labels), 10000, replace=False)); ite = np.sort(rng.choice(len(te.labels), 2000, replace=False))
    xtr_u8, xte_u8 = np.asarray(tr.images)[itr], np.asarray(te.images)[ite]
    ytr, yte = torch.from_numpy(tr.labels[itr]), torch.from_numpy(te.labels[ite])
    for K, grid in ((1024, 2), (2048, 2), (1024, 3)):
        cfg = build_config("patches", {"data": {"image_size": 32}, "train": {"device": "cpu"}, "params": {"num_atoms": K, "grid": grid, "whiten_dim": 0}})
        m = Patches(cfg); m.fit(np.asarray(tr.images), torch.device("cpu"), 0)
        mean = torch.tensor(cfg.aug.mean).view(1, 3, 1, 1); std = torch.tensor(cfg.aug.std).view(1, 3, 1, 1)
        enc = lambda a: torch.cat([m.backbone.pooled_codes((torch.from_numpy(a[i:i+512]).permute(0, 3, 1, 2).float() / 255 - mean) / std) for i in range(0, len(a), 512)])
        t = time.time()
        with torch.no_grad():
            ftr, fte = enc(xtr_u8), enc(xte_u8)
        enc_s = time.time() - t
        out = {"K": K, "grid": grid, "dim": ftr.shape[1], "img_s": round(12000 / enc_s, 1), "raw": knn_top1(ftr, ytr, fte, yte, 10)}
        for dim in (1024, 2048):
            t = time.time()
            mu = ftr.mean(0); U, S, V = torch.pca_lowrank(ftr - mu, q=dim + 64, center=False, niter=4)
            ev = (S[:dim] ** 2 / (len(ftr) - 1)); P = V[:, :dim] / (ev + 0.03 * ev.mean()).sqrt()
            out[f"white{dim}_fit_s"] = round(time.time() - t, 1)
            out[f"white{dim}"] = knn_top1((ftr - mu) @ P, ytr, (fte - mu) @ P, yte, 10)
        print(json.dumps(out), flush=True)

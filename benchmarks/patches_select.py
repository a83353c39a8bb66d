"""The patches encoder's two selections measured in one run: images/s of select="exact" (the q nearest
atoms) and "threshold" (mean + z std), the fraction of codes that agree, the fraction coded and the
correlation of the pooled features, on the last 256 CIFAR-10 training images (fit seed 0). The figures
quoted in src/selfsup/methods/patches.py and the README come from:

    python benchmarks/patches_select.py   # reads ../shared/data/cifar10/train through the decode cache
"""
import time, numpy as np, torch
from selfsup.configure import build_config
from selfsup.methods.patches import Patches
from selfsup.data.cache import load_images
if __name__ == "__main__":
    torch.set_num_threads(2)
    arr = np.asarray(load_images("../shared/data/cifar10", "train", 32).images)
    cfg = build_config("patches", {"data": {"image_size": 32}, "train": {"device": "cpu"},
                                   "params": {"whiten_dim": 0}})  # the pooled codes themselves
    m = Patches(cfg); print(m.fit(arr, torch.device("cpu"), 0))
    enc = m.backbone
    mean = torch.tensor(cfg.aug.mean).view(1, 3, 1, 1); std = torch.tensor(cfg.aug.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(arr[-256:].copy()).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        enc.select = "exact"; t = time.perf_counter(); fe = enc(x); te = time.perf_counter() - t
        ce = enc.codes(x[:32])
        enc.select = "threshold"; enc(x[:32]); t = time.perf_counter(); ft = enc(x); tt = time.perf_counter() - t
        ct = enc.codes(x[:32])
    print(f"img/s exact {256/te:.1f} threshold {256/tt:.1f} ratio {te/tt:.2f}")
    print("code agreement", float((ce == ct).float().mean()), "frac", float(ct.mean()), float(ce.mean()))
    print("pooled corr", float(torch.corrcoef(torch.stack([fe.flatten(), ft.flatten()]))[0, 1]),
          "max abs", float((fe - ft).abs().max()))
    d = (fe - ft).abs()
    print("frac >0.05", float((d > 0.05).float().mean()), ">0.2", float((d > 0.2).float().mean()), "rows with >0.2:", (d > 0.2).any(1).nonzero().flatten().tolist()[:20])
    i = int((d.max(1).values).argmax()); im = arr[-256 + i]
    print("worst image std", im.std(), "min/max", im.min(), im.max())

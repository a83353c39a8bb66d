"""SwAV at initialisation: how informative are Sinkhorn's codes before any training? For one batch of
CIFAR-10 training images (the preset's multi-crop views, convnet, batch 128) it prints the mean cosine
between the embeddings of different images, the spread of the prototype scores, and the mean entropy of
the codes for several epsilons (log K for uniform codes: no signal to learn from).

    python benchmarks/swav_codes.py [params.KEY=VALUE ...]

Reads ../shared/data/cifar10 (the decode cache). Figures in the README's SwAV paragraph (2026-12-06).
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import selfsup
from selfsup.data.cache import load_images
from selfsup.losses import sinkhorn
from selfsup.methods import get_method
from selfsup.runtime import step_generator


def main() -> None:
    torch.manual_seed(0)
    params = {k.removeprefix("params."): yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
    cfg = selfsup.build_config("swav", {"data": {"path": "../shared/data/cifar10/train", "image_size": 32},
                                        "model": {"backbone": "convnet"}, "train": {"batch_size": 128},
                                        **({"params": params} if params else {})})
    method = get_method("swav")(cfg).train()
    images = load_images("../shared/data/cifar10", "train", 32, progress=False).images
    x = torch.from_numpy(np.array(images[:128])).permute(0, 3, 1, 2).contiguous()
    glob, _ = method.prepare(x, step_generator(torch.device("cpu"), 0, 0, 0))
    with torch.no_grad():
        z = F.normalize(method.projector(method.backbone(glob[:128])).float(), dim=1)
        n = len(z)
        cos = (z @ z.t())[~torch.eye(n, dtype=torch.bool)]
        protos = method.prototypes.weight.float()
        s = z @ protos.t()
        print(f"mean cosine between images' embeddings {cos.mean():.3f}; score std over images {s.std(0).mean():.4f}, "
              f"over prototypes {s.std(1).mean():.4f}")
        for eps in (0.05, 0.03, 0.02, 0.01):
            q = sinkhorn(s, eps, 3).clamp_min(1e-12)
            entropy = -(q * q.log()).sum(1).mean()
            print(f"epsilon {eps}: code entropy {entropy:.2f} (log K = {math.log(len(protos)):.2f}), "
                  f"largest code entry {q.max(1).values.mean():.3f}")


if __name__ == "__main__":
    main()

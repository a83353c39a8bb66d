"""Worker for tests/test_distributed.py: run under torchrun with 1 or 2 processes.

Every method whose loss couples the samples of a batch computes its loss on this process's slice of a
fixed global batch of views, backpropagates, averages the gradients over processes
(selfsup.distributed.sync_gradients, as the trainer does) and rank 0 saves the mean loss over
processes and the gradients. Batch norm runs with frozen statistics (eval mode): per-process batch
statistics differ from the global ones by design. Computation in float32 (no autocast).
"""

import sys

import torch
import torch.distributed as dist

from selfsup import distributed
from selfsup.configure import build_config
from selfsup.losses import sinkhorn
from selfsup.methods import METHODS

SMALL = {
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "barlow_twins": {"proj_hidden_dim": 32, "proj_dim": 16},
    "vicreg": {"proj_hidden_dim": 32, "proj_dim": 16},
    "moco_v3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "swav": {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 10, "freeze_prototypes_frac": 0.0},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 24, "freeze_last_layer_frac": 0.0},
}
MULTI_CROP = {"swav": 2, "dino": 2}  # training_step((global views [x1; x2], local views)): local views per image


def main(out: str, global_batch: int = 8) -> None:
    rank, world, _ = distributed.setup("cpu")
    results = {}
    for name, params in SMALL.items():
        cfg = build_config(name, {"model": {"backbone": "convnet"}, "data": {"image_size": 8},
                                  "train": {"precision": "fp32", "channels_last": False}, "params": params})
        torch.manual_seed(0)
        method = METHODS[name](cfg).eval()  # frozen BN statistics
        g = torch.Generator().manual_seed(1)
        x1 = torch.randn(global_batch, 3, 8, 8, generator=g)
        x2 = x1 + 0.3 * torch.randn(global_batch, 3, 8, 8, generator=g)
        n = global_batch // world
        mine = torch.cat([x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n]])  # the method's [x1; x2] layout
        batch = mine
        if name in MULTI_CROP:  # local views, view-major like the global ones; DINO: the same non-zero centre
            local = torch.randn(MULTI_CROP[name], global_batch, 3, 8, 8, generator=g)
            batch = (mine, local[:, rank * n:(rank + 1) * n].flatten(0, 1))
            if name == "dino":
                method.center.copy_(torch.randn(method.center.shape, generator=g))
        center_before = method.center.clone() if name == "dino" else None
        loss = method.training_step(batch)["loss"]
        loss.backward()
        distributed.sync_gradients(list(method.parameters()))
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        results[name] = {"loss": mean_loss, "grads": {k: p.grad.clone() for k, p in method.named_parameters()
                                                      if p.grad is not None}}
        if name == "dino":  # after_step: centre <- 0.9 centre + 0.1 mean of the teacher outputs (global batch)
            method.after_step(0, 10)
            results[name].update(center_before=center_before, center=method.center.clone())
    # the gather itself: values in rank order, gradient = the sum over processes
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = distributed.gather(x)
    (y * torch.arange(y.numel(), dtype=torch.float32).view_as(y)).sum().backward()
    results["gather"] = {"value": y.detach(), "grad": x.grad.clone(), "rank": rank}
    gathered_grads = [torch.zeros_like(x.grad) for _ in range(world)]
    if world > 1:
        dist.all_gather(gathered_grads, x.grad)
        results["gather"]["all_grads"] = torch.stack(gathered_grads)
    # SwAV's Sinkhorn with all-reduced batch sums: each process's codes are its rows of the global batch's codes
    scores = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    n = 8 // world
    codes = sinkhorn(scores[rank * n:(rank + 1) * n], epsilon=0.5, iterations=3)
    all_codes = [torch.zeros_like(codes) for _ in range(world)]
    if world > 1:
        dist.all_gather(all_codes, codes)
    else:
        all_codes = [codes]
    results["sinkhorn"] = {"scores": scores, "codes": torch.cat(all_codes)}
    if rank == 0:
        torch.save(results, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""Training throughput: the whole step vs the bare backbone, measured in the same run.

End-to-end = what `selfsup pretrain` does per step: gather the batch from the decode cache (uint8
memory map), copy it to the device, augment on the device, forward backbone + heads, loss, backward,
optimizer step. Bound = the backbone alone, forward + backward + SGD step, on a ready-made input
batch of the same number of encoder images (a SimCLR step of B images runs the backbone on 2B
views, so both sides are counted in encoder images per second). The two are timed alternately,
step by step, so that changes in the machine's speed during the run affect both alike.

    python benchmarks/throughput.py --method simclr --backbone resnet18 --image-size 32 --batch-size 256

The last line is `end_to_end_vs_bound: R` with R = end-to-end / bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from selfsup.config import build_config
from selfsup.data import load_images
from selfsup.runtime import autocast
from selfsup.train import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default="digits", help="data to read from the decode cache (default: digits)")
    p.add_argument("--steps", type=int, default=10, help="timed steps for each side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 where the hardware has it natively (selfsup.runtime.resolve_precision)")
    a = p.parse_args()

    data = load_images(a.data, "train", a.image_size)
    cfg = build_config(a.method, {"model": {"backbone": a.backbone}, "data": {"path": a.data, "image_size": a.image_size},
                                  "train": {"batch_size": a.batch_size, "device": a.device, "precision": a.precision,
                                            "epochs": 1000}})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False, data=data)
    dev, method = trainer.device, trainer.method
    views = a.batch_size * method.views_per_image

    def batches():
        epoch = 0
        while True:
            trainer.method.on_epoch_start(trainer, epoch)  # e.g. DeepCluster's clustering
            yield from trainer.stream.batches(epoch)
            epoch += 1

    # -- bound: the bare backbone, forward + backward + SGD step on a ready batch
    backbone = method.backbone
    opt = torch.optim.SGD(backbone.parameters(), lr=1e-3, momentum=0.9)
    xb = torch.randn(views, 3, a.image_size, a.image_size, device=dev).contiguous(memory_format=torch.channels_last)

    def bare_step():
        with autocast(dev, trainer.precision):
            loss = backbone(xb).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # -- end to end: the training loop's own step, fed by the loop's own batch stream.
    # The two are timed alternately, step by step, so that drift in the machine's speed (other
    # processes, clocks) affects both alike.
    it = batches()
    for step in range(a.warmup):
        trainer.train_step(next(it), step)
        bare_step()
    t_e2e = t_bare = 0.0
    for step in range(a.warmup, a.warmup + a.steps):
        sync(dev)
        t0 = time.perf_counter()
        out = trainer.train_step(next(it), step)
        float(out["loss"])  # the loop reads the loss every step (NaN check)
        sync(dev)
        t1 = time.perf_counter()
        bare_step()
        sync(dev)
        t_e2e, t_bare = t_e2e + t1 - t0, t_bare + time.perf_counter() - t1
    e2e, bound = a.steps * views / t_e2e, a.steps * views / t_bare

    # -- the augmentation alone (part of end to end), for the breakdown
    x = next(it)
    t0 = time.perf_counter()
    for step in range(a.steps):
        method.prepare(x, torch.Generator(device=dev).manual_seed(step))
    sync(dev)
    aug_ms = 1000 * (time.perf_counter() - t0) / a.steps

    print(f"device: {dev} ({torch.get_num_threads()} threads), precision {trainer.precision}, method {a.method}, "
          f"backbone {a.backbone}, {a.image_size}px, batch {a.batch_size} images = {views} encoder images")
    print(f"end-to-end: {e2e:.1f} encoder img/s ({e2e / method.views_per_image:.1f} source img/s)")
    print(f"bare backbone fwd+bwd+step: {bound:.1f} img/s")
    print(f"augmentation alone: {aug_ms:.1f} ms per batch ({aug_ms * e2e / views / 10:.1f}% of an end-to-end step)")
    print(f"end_to_end_vs_bound: {e2e / bound:.3f}")


if __name__ == "__main__":
    main()

"""Training throughput: the whole step against the model alone, measured in the same run.

End-to-end = what `selfsup pretrain` does per step: gather the batch from the decode cache (uint8
memory map), copy it to the device, augment on the device, forward backbone + heads, loss, backward,
optimizer step, the method's after-step (EMA) update. Bound = the same model (a copy of the method:
backbone and heads) doing forward + loss + backward + optimizer step + after-step on one ready-made,
already augmented batch of the method's real encoder inputs (tiles, small crops, both views, ...):
the step with data loading and augmentation taken out. Also timed: the bare backbone, forward +
backward + SGD step on random images of the same pixel count as the method's encoder inputs. The
three are timed alternately, step by step, so that changes in the machine's speed during the run
affect all alike. Rates are in source images per second (B per step); the encoder inputs of one step
are counted in image-size equivalents (pixels / (3 x S x S)): a SimCLR step of B images is 2B, a
jigsaw step 9B tiles of (S/2)^2 pixels = 2.25B.

    python benchmarks/throughput.py --method simclr --backbone resnet18 --image-size 32 --batch-size 256

The last line is `end_to_end_vs_bound: R` with R = end-to-end / bound (1: data and augmentation
cost nothing next to the model).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from selfsup.configure import build_config
from selfsup.data import load_images
from selfsup.runtime import autocast
from selfsup.train import Trainer, build_phase_optimizers


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
    if not method.phases:
        raise SystemExit(f"{a.method} has no training step (it is fitted in one pass): nothing to time")

    def batches():
        epoch = 0
        while True:
            trainer.method.on_epoch_start(trainer, epoch)  # e.g. DeepCluster's clustering
            yield from trainer.stream.batches(epoch)
            epoch += 1

    it = batches()
    first = next(it)

    # -- bound: a copy of the model on one ready-made batch of its real encoder inputs
    model = copy.deepcopy(method)
    opts = build_phase_optimizers(model, cfg)
    ready = model.prepare(first, torch.Generator(device=dev).manual_seed(0))

    def encoder_images(batch) -> float:
        """The backbone inputs of a prepared batch in image-size equivalents (pixels / 3 S^2)."""
        if isinstance(batch, torch.Tensor):
            return batch.numel() / (3 * a.image_size ** 2) if batch.is_floating_point() and batch.dim() == 4 else 0.0
        if isinstance(batch, (tuple, list)):
            return sum(encoder_images(b) for b in batch)
        return 0.0

    views = encoder_images(ready)

    def model_step():
        for phase in model.phases:
            with autocast(dev, trainer.precision):
                out = model.training_step(ready) if len(model.phases) == 1 else model.phase_step(ready, phase)
            opts[phase].zero_grad(set_to_none=True)
            out["loss"].backward()
            opts[phase].step()
        model.after_step(0, 1000)
        float(out["loss"].detach())

    # -- the bare backbone, forward + backward + SGD step on as many pixels
    backbone = copy.deepcopy(method.backbone)
    opt = torch.optim.SGD(backbone.parameters(), lr=1e-3, momentum=0.9)
    xb = torch.randn(max(1, round(views)), 3, a.image_size, a.image_size,
                     device=dev).contiguous(memory_format=torch.channels_last)

    def bare_step():
        with autocast(dev, trainer.precision):
            loss = backbone(xb).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # -- end to end: the training loop's own step, fed by the loop's own batch stream, timed
    # alternately with the two others, so that drift in the machine's speed affects all alike
    for step in range(a.warmup):
        trainer.train_step(next(it), step)
        model_step()
        bare_step()
    t_e2e = t_model = t_bare = 0.0
    for step in range(a.warmup, a.warmup + a.steps):
        sync(dev)
        t0 = time.perf_counter()
        out = trainer.train_step(next(it), step)
        float(out["loss"])  # the loop reads the loss every step (NaN check)
        sync(dev)
        t1 = time.perf_counter()
        model_step()
        sync(dev)
        t2 = time.perf_counter()
        bare_step()
        sync(dev)
        t_e2e, t_model, t_bare = t_e2e + t1 - t0, t_model + t2 - t1, t_bare + time.perf_counter() - t2
    b = a.batch_size
    e2e, bound, bare = a.steps * b / t_e2e, a.steps * b / t_model, a.steps * b / t_bare

    # -- the augmentation alone (part of end to end), for the breakdown
    x = next(it)
    t0 = time.perf_counter()
    for step in range(a.steps):
        method.prepare(x, torch.Generator(device=dev).manual_seed(step))
    sync(dev)
    aug_ms = 1000 * (time.perf_counter() - t0) / a.steps

    print(f"device: {dev} ({torch.get_num_threads()} threads), precision {trainer.precision}, method {a.method}, "
          f"backbone {a.backbone}, {a.image_size}px, batch {b} images = {views:.0f} encoder images "
          f"({a.image_size} px equivalents)")
    print(f"end-to-end: {e2e:.1f} source img/s ({e2e * views / b:.1f} encoder img/s)")
    print(f"model alone (backbone + heads, ready-made views): {bound:.1f} source img/s")
    print(f"bare backbone fwd+bwd+step, as many pixels: {bare:.1f} source img/s "
          f"(the heads and the loss take {max(0.0, 1 - bound / bare):.0%} of the model's step)")
    print(f"augmentation alone: {aug_ms:.1f} ms per batch ({aug_ms * e2e / b / 10:.1f}% of an end-to-end step)")
    print(f"end_to_end_vs_bound: {e2e / bound:.3f}")

if __name__ == "__main__":
    main()

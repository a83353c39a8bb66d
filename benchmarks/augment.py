"""Time ``selfsup.data.views.augment`` against the equivalent kornia.augmentation pipeline.

SimCLR-like views (AugConfig defaults with blur_p=0.5) of the same uint8 channels_last batch,
both timed from uint8 input to normalized float output, in the same run::

    python benchmarks/augment.py --batch 256 --size 32 --iters 20 --device cpu

kornia is optional: without it only our pipeline is timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

from selfsup.data.views import AugConfig, augment


def time_ms(fn: Callable[[], torch.Tensor], iters: int, device: torch.device) -> float:
    """Mean milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters * 1e3


def kornia_pipeline(cfg: AugConfig, kernel_size: int) -> torch.nn.Module:
    import kornia.augmentation as K

    return torch.nn.Sequential(
        K.RandomResizedCrop((cfg.size, cfg.size), scale=cfg.crop_scale, ratio=cfg.crop_ratio),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.gray_p),
        K.RandomGaussianBlur((kernel_size, kernel_size), cfg.blur_sigma, p=cfg.blur_p),
        K.Normalize(mean=torch.tensor(cfg.mean), std=torch.tensor(cfg.std)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="input and output side")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cfg = AugConfig(size=args.size, blur_p=0.5)
    nhwc = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
    images = nhwc.to(device).permute(0, 3, 1, 2)  # uint8, channels_last
    generator = torch.Generator(device=device).manual_seed(0)

    threads = torch.get_num_threads()
    print(f"batch={args.batch} size={args.size} iters={args.iters} device={device} threads={threads}")
    ours = time_ms(lambda: augment(images, cfg, generator), args.iters, device)
    print(f"ours:   {ours:.2f} ms/batch")

    try:
        import kornia
    except ImportError:
        print("kornia is not installed (pip install kornia): skipping the comparison")
        return 0
    kernel_size = max(3, int(0.1 * args.size) // 2 * 2 + 1)  # as gaussian_blur's default
    pipeline = kornia_pipeline(cfg, kernel_size).to(device)
    with torch.no_grad():
        theirs = time_ms(lambda: pipeline(images.float().div_(255)), args.iters, device)
    print(f"kornia: {theirs:.2f} ms/batch (kornia {kornia.__version__})")
    print(f"ours_vs_kornia_speedup: {theirs / ours:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

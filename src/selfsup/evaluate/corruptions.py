"""Common corruptions in the style of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019, arXiv 1903.12261),
computed in torch on whole batches, on any device.

``corrupt(x, name, severity, generator)`` takes float RGB images ``(B, 3, H, W)`` in [0, 1] and returns
corrupted images in [0, 1]. Severity 0 is the identity; 1..5 follow the CIFAR-10-C parameters of the
reference code (``make_cifar_c.py``) where the operation is the same, with spatial sizes (blur radii,
motion length) scaled by ``H / 32`` so larger images get comparable damage. Differences from the
reference, stated: the fog is a smooth random haze (upsampled multi-octave noise) rather than the
diamond-square plasma fractal; motion blur is a line kernel at a random angle rather than ImageMagick's
motion blur; brightness is applied to HSV value exactly as the reference does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# severity 1..5 parameters (CIFAR-10-C)
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive noise
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson photon count scale
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper fraction
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),  # (radius, sigma) -> length ~ sigma*2+1
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor around the per-image mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # haze strength, decay of octaves
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}
CORRUPTIONS = tuple(PARAMS)


def _rand(shape, generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _conv_per_image(x: Tensor, kernels: Tensor) -> Tensor:
    """Convolve each image with its own 2-D kernel ``(B, k, k)`` (same kernel for the 3 channels)."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    y = F.conv2d(F.pad(x.reshape(1, b * c, h, w), [k // 2] * 4, mode="reflect"), weight, groups=b * c)
    return y.reshape(b, c, h, w)


def _disk(radius: float, alias_sigma: float, device) -> Tensor:
    r = max(1, math.ceil(radius))
    ax = torch.arange(-r - 1, r + 2, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    k = ((xx ** 2 + yy ** 2) <= radius ** 2).float()
    k = k / k.sum()
    # anti-alias with a small Gaussian, as the reference does (cv2.GaussianBlur(disk, sigma))
    g = torch.exp(-(ax ** 2) / (2 * alias_sigma ** 2))
    g = g / g.sum()
    k = F.conv2d(k[None, None], g.view(1, 1, 1, -1), padding=(0, len(ax) // 2))
    k = F.conv2d(k, g.view(1, 1, -1, 1), padding=(len(ax) // 2, 0))[0, 0]
    return k / k.sum()


def _line_kernels(length: float, angles: Tensor) -> Tensor:
    """Normalised line kernels of ``length`` pixels at the given angles (radians): ``(B, k, k)``."""
    half = max(1, math.ceil(length / 2))
    ax = torch.arange(-half, half + 1, dtype=torch.float32, device=angles.device)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    dx, dy = torch.cos(angles).view(-1, 1, 1), torch.sin(angles).view(-1, 1, 1)
    along = xx * dx + yy * dy
    across = -xx * dy + yy * dx
    k = torch.clamp(1 - across.abs(), min=0) * (along.abs() <= length / 2).float()
    return k / k.sum(dim=(1, 2), keepdim=True)


def _haze(b: int, h: int, w: int, decay: float, generator: torch.Generator, device) -> Tensor:
    """Smooth random field in [0, 1]: octaves of upsampled uniform noise, amplitude / decay per octave."""
    field = torch.zeros(b, 1, h, w, device=device)
    amp, size, total = 1.0, 2, 0.0
    while size <= max(h, w):
        noise = _rand((b, 1, size, size), generator, device)
        field += amp * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
        total += amp
        amp /= decay
        size *= 2
    field = field / total
    lo = field.amin(dim=(2, 3), keepdim=True)
    hi = field.amax(dim=(2, 3), keepdim=True)
    return (field - lo) / (hi - lo).clamp_min(1e-6)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    out = decode_jpeg(encode_jpeg(list(u8), quality=quality))
    return torch.stack(out).to(x.device, torch.float32) / 255


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """Corrupt float images ``(B, 3, H, W)`` in [0, 1]; severity 0 returns ``x`` unchanged."""
    if name not in PARAMS:
        raise ValueError(f"unknown corruption '{name}'; choose one of {', '.join(CORRUPTIONS)}")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be 0..5, got {severity}")
    if severity == 0:
        return x
    c = PARAMS[name][severity - 1]
    b, _, h, w = x.shape
    scale = h / 32
    dev = x.device
    with torch.autocast(dev.type, enabled=False):
        x = x.float()
        if name == "gaussian_noise":
            noise = torch.randn(x.shape, generator=generator, device=generator.device).to(dev)
            y = x + c * noise
        elif name == "shot_noise":
            y = torch.poisson(x.cpu() * c, generator=generator if generator.device.type == "cpu" else None).to(dev) / c
        elif name == "impulse_noise":
            u = _rand(x.shape, generator, dev)
            y = torch.where(u < c / 2, torch.zeros_like(x), torch.where(u < c, torch.ones_like(x), x))
        elif name == "defocus_blur":
            k = _disk(c[0] * scale, c[1] * max(scale, 1), dev)
            y = _conv_per_image(x, k.expand(b, -1, -1))
        elif name == "motion_blur":
            angles = (_rand((b,), generator, dev) * 2 - 1) * math.pi / 4  # reference: uniform(-45, 45) degrees
            y = _conv_per_image(x, _line_kernels((2 * c[1] + 1) * scale, angles))
        elif name == "contrast":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            y = (x - mean) * c + mean
        elif name == "brightness":
            v = x.amax(dim=1, keepdim=True)
            new_v = (v + c).clamp(0, 1)
            y = torch.where(v > 0, x * new_v / v.clamp_min(1e-6), new_v.expand_as(x))
        elif name == "fog":
            haze = _haze(b, h, w, c[1], generator, dev)
            peak = x.amax(dim=(1, 2, 3), keepdim=True)
            y = (x + c[0] * haze) * peak / (peak + c[0])
        elif name == "pixelate":
            small = (max(1, int(h * c)), max(1, int(w * c)))
            y = F.interpolate(F.interpolate(x, size=small, mode="area"), size=(h, w), mode="nearest")
        else:  # jpeg
            y = _jpeg(x, c)
        return y.clamp(0, 1)

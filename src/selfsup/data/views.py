"""Batched, on-device data augmentation for self-supervised views.

Design
------
Contrastive and distillation methods augment every image of every batch (often
twice), so the augmentation pipeline is on the critical path of each training
step.  Per-sample PIL/torchvision transforms in data-loader workers are slow for
small images and waste the accelerator; instead this module augments a whole
batch at once, on whatever device the batch lives on (CPU or CUDA, same code):

* every op is a handful of whole-batch tensor operations with the per-sample
  randomness expressed as parameter tensors of shape (B,) or (B, 4) that
  broadcast against the images -- there are no Python loops over samples;
* the random resized crop and the horizontal flip are a single affine
  ``grid_sample`` (the flip is a sign in the affine matrix), so the crop costs
  O(output pixels) whatever the input size;
* the Gaussian blur builds one separable kernel per sample and runs the whole
  batch as one grouped convolution (batch folded into the channel dimension);
* an op whose probability or strength is 0 is skipped entirely, and an op
  applied with probability p is computed for the whole batch and selected per
  sample (identity parameters, or a 0/1 blend weight), which keeps CUDA free
  of host synchronisation (no ``nonzero``/boolean indexing);
* after the crop, the ops write into the batch in place (``out=x``) to limit
  allocations, and the final normalisation writes the channels_last output.

Parameter sampling
------------------
All randomness comes from the ``torch.Generator`` passed in -- never from the
global RNG -- so a seed fully determines the views.  Parameters are drawn on the
generator's device (a CPU generator works for CUDA data and then gives the same
parameters as on CPU) and moved to the data's device.  ``augment`` draws them in
a fixed order (crop boxes, flips, jitter, grayscale, blur, solarize), skipping
the draws of disabled ops.  Crop boxes follow torchvision's ``RandomResizedCrop``
(up to 10 tries of a random area fraction and log-uniform aspect ratio, then a
central crop fallback), vectorised over the batch and expressed as continuous
fractions of the image instead of rounded pixel counts.  Colour jitter applies
brightness, contrast, saturation and hue in this fixed order (torchvision's
``ColorJitter`` permutes it randomly), each with the semantics of
``torchvision.transforms.functional``.

Images are uint8 (B, 3, H, W) tensors -- possibly channels_last, e.g. an NHWC
numpy array permuted -- or floats in [0, 1].  Outputs are float32 tensors in
channels_last memory format, ready for a channels_last network.  The crop's
resize is bilinear without antialiasing: right for upsampling and the mild
downscaling of small-image training, aliasing for large downscales.  The
individual ops are public and take explicit per-sample parameters; like torch
ops they accept ``out=`` (which may be the input itself, for in-place use).
Autocast is disabled inside the ops, which stay in float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugConfig",
    "to_float",
    "normalize",
    "augment",
    "eval_view",
    "sample_crop_boxes",
    "resized_crop",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "grayscale",
    "gaussian_blur",
    "solarize",
    "augment_input",
    "sample_cutout_boxes",
    "cutout",
]

# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)
_CROP_TRIES = 10


@dataclass
class AugConfig:
    """Parameters of the random view pipeline (SimCLR-style defaults)."""

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _rand(shape: Sequence[int], generator: torch.Generator, device: torch.device | str) -> Tensor:
    """U[0, 1) drawn from ``generator`` on its own device, then moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _per_sample(value: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or (B,) parameter as a (B, 1, 1, 1) tensor broadcastable against ``x``."""
    return torch.as_tensor(value, device=x.device).to(x.dtype).reshape(-1, 1, 1, 1)


def _luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) grayscale of an RGB batch."""
    return (x[:, 0:1] * _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def _blend(x: Tensor, other: Tensor, factor: Tensor, out: Tensor | None) -> Tensor:
    """clamp(factor * x + (1 - factor) * other, 0, 1) with per-sample ``factor``; overwrites ``other``."""
    return torch.addcmul(other.mul_(1 - factor), x, factor, out=out).clamp_(0, 1)


def _select(weight: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a`` where the float 0/1 ``weight`` is 1, else ``b`` (broadcasting).

    ``torch.lerp`` is exact at weights 0 and 1 and, unlike ``torch.where``, is
    vectorised on CPU (several times faster there).
    """
    return torch.lerp(b, a, weight, out=out)


# --------------------------------------------------------------------------- #
# conversion / normalisation
# --------------------------------------------------------------------------- #
def to_float(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; float32 passes through, other floats are cast."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images.float()
    raise TypeError(f"expected uint8 or floating point images, got {images.dtype}")


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], *, out: Tensor | None = None) -> Tensor:
    """Per-channel ``(x - mean) / std``; keeps the memory format of ``x`` (or that of ``out``)."""
    inv_std = 1.0 / torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return torch.addcmul(-mean_t * inv_std, x, inv_std, out=out)


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The inverse of :func:`normalize`: ``x * std + mean`` per channel, in float32, not clamped."""
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    return x.float() * std_t + mean_t


# --------------------------------------------------------------------------- #
# geometry
# --------------------------------------------------------------------------- #
def sample_crop_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str,
    image_aspect: float = 1.0,
) -> Tensor:
    """Random resized crop boxes ``(x0, y0, w, h)`` as fractions of the image, shape (n, 4).

    torchvision ``RandomResizedCrop`` semantics, vectorised: each sample gets 10
    tries of an area fraction ~ U(scale) and an aspect ratio (width/height in
    pixels) log-uniform in ``ratio``; the first try that fits in the image wins,
    otherwise the central crop with the aspect clamped to ``ratio`` is used.
    ``image_aspect`` is the input's W / H (the fractions depend on it only for
    non-square images).
    """
    u = _rand((n, _CROP_TRIES, 2), generator, device)
    area = scale[0] + (scale[1] - scale[0]) * u[..., 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1]) / image_aspect
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting try
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    offset = _rand((n, 2), generator, device)
    x0 = offset[:, 0] * (1 - w)
    y0 = offset[:, 1] * (1 - h)
    boxes = torch.stack([x0, y0, w, h], dim=1)

    # central crop, aspect clamped to ``ratio``, where no try fitted
    if image_aspect < ratio[0]:
        fw, fh = 1.0, image_aspect / ratio[0]
    elif image_aspect > ratio[1]:
        fw, fh = ratio[1] / image_aspect, 1.0
    else:
        fw, fh = 1.0, 1.0
    fallback = torch.tensor([(1 - fw) / 2, (1 - fh) / 2, fw, fh], device=boxes.device)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def resized_crop(
    x: Tensor, boxes: Tensor, size: int | tuple[int, int], flip: Tensor | bool | None = None
) -> Tensor:
    """Crop each image to its box ``(x0, y0, w, h)`` (image fractions) and resize to ``size``.

    One ``affine_grid`` + bilinear ``grid_sample`` (align_corners=False) for the
    whole batch; ``flip`` (per-sample bool, or a bool for all) mirrors the crop
    horizontally by negating the x scale of the affine.  A full box at the input
    size is the identity.
    """
    if not x.is_floating_point():
        raise TypeError("resized_crop expects float images; use to_float first")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x0, y0, w, h = boxes.to(device=x.device, dtype=x.dtype).unbind(1)
    sx = w if flip is None else torch.where(torch.as_tensor(flip, device=x.device), -w, w)
    zero = torch.zeros_like(w)
    # output coordinate u in [-1, 1] -> input coordinate 2 * x0 + w * (u + 1) - 1
    theta = torch.stack(
        [
            torch.stack([sx, zero, 2 * x0 + w - 1], dim=1),
            torch.stack([zero, h, 2 * y0 + h - 1], dim=1),
        ],
        dim=1,
    )
    with torch.autocast(x.device.type, enabled=False):  # keep the grid in float32
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- #
# colour (``out`` may be ``x`` itself for in-place use)
# --------------------------------------------------------------------------- #
def adjust_brightness(x: Tensor, factor: Tensor | float, *, out: Tensor | None = None) -> Tensor:
    """Multiply by a per-sample factor, clamp to [0, 1]."""
    return torch.mul(x, _per_sample(factor, x), out=out).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor | float, *, out: Tensor | None = None) -> Tensor:
    """Blend each image with the mean of its grayscale."""
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    mean = (x.mean(dim=(2, 3)) * weights).sum(dim=1).view(-1, 1, 1, 1)
    return _blend(x, mean, _per_sample(factor, x), out)


def adjust_saturation(x: Tensor, factor: Tensor | float, *, out: Tensor | None = None) -> Tensor:
    """Blend each image with its grayscale."""
    return _blend(x, _luma(x), _per_sample(factor, x), out)


def adjust_hue(x: Tensor, shift: Tensor | float, *, out: Tensor | None = None) -> Tensor:
    """Rotate the HSV hue by a per-sample ``shift`` in [-0.5, 0.5] (fraction of a turn).

    Value and saturation are kept, so only max, chroma (max - min) and hue of
    each pixel are needed: with the new hue ``h`` in [0, 6) (sixths of a turn),
    channel ``n`` (R=5, G=3, B=1) is ``max - chroma * clamp(min(k, 4 - k), 0, 1)``
    where ``k = (n + h) mod 6``, i.e. ``max - chroma * clamp(2 - d, 0, 1)`` with
    ``d = |3 - |h + n - 5||`` the circular distance of ``k`` to 2.  It is all
    whole-batch arithmetic (no ``where``, no branches), mostly in place.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(dim=1, keepdim=True)
    chroma = torch.sub(maxc, x.amin(dim=1, keepdim=True))
    w_r = torch.eq(r, maxc, out=torch.empty_like(maxc))  # float 0/1 selection weights
    w_g = torch.eq(g, maxc, out=torch.empty_like(maxc))
    # hue * chroma, from the sector of the max channel (R wins ties): B, else G, else R
    h = torch.sub(r, g).add_(chroma, alpha=4)
    h.lerp_(torch.sub(b, r).add_(chroma, alpha=2), w_g)
    h.lerp_(torch.sub(g, b), w_r)
    h.div_(torch.clamp_min(chroma, 1e-12, out=w_r))  # chroma == 0: the hue is irrelevant, h is 0
    h.add_(_per_sample(shift, x), alpha=6)
    h.sub_(torch.div(h, 6, out=w_g).floor_(), alpha=6)  # wrap to [0, 6)
    n_minus_5 = torch.tensor([0.0, -2.0, -4.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    d = torch.add(h, n_minus_5).abs_().sub_(3).abs_()
    return torch.addcmul(maxc, d.sub_(2).clamp_(-1, 0), chroma, out=out)  # max - chroma * clamp(2 - d, 0, 1)


def grayscale(x: Tensor, mask: Tensor | bool, *, out: Tensor | None = None) -> Tensor:
    """Replace masked samples by their luma replicated to 3 channels."""
    return _select(_per_sample(mask, x), _luma(x).expand_as(x), x, out)


def gaussian_blur(
    x: Tensor,
    sigma: Tensor | float,
    mask: Tensor | bool,
    kernel_size: int | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` on masked samples.

    Reflect padding; ``kernel_size`` defaults to ~10% of the image side, odd, at
    least 3.  The batch is folded into channels so that the whole batch is one
    grouped convolution per direction.
    """
    b, c, height, width = x.shape
    if kernel_size is None:
        kernel_size = max(3, int(0.1 * min(height, width)) // 2 * 2 + 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    half = kernel_size // 2
    sigma = _per_sample(sigma, x).view(-1, 1).expand(b, 1)
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)

    y = F.pad(x.reshape(1, b * c, height, width), (half, half, half, half), mode="reflect")
    with torch.autocast(x.device.type, enabled=False):  # stay in the dtype of x
        y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
        y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return _select(_per_sample(mask, x), y.view(b, c, height, width), x, out)


def solarize(x: Tensor, mask: Tensor | bool, threshold: float = 0.5, *, out: Tensor | None = None) -> Tensor:
    """``x -> 1 - x`` where ``x >= threshold``, on masked samples."""
    weight = torch.ge(x, threshold, out=torch.empty_like(x)).mul_(_per_sample(mask, x))
    return _select(weight, 1 - x, x, out)


# --------------------------------------------------------------------------- #
# pipelines
# --------------------------------------------------------------------------- #
# colour jitter, in its fixed order: (name, identity parameter, op)
_JITTER_OPS: tuple[tuple[str, float, Callable[..., Tensor]], ...] = (
    ("brightness", 1.0, adjust_brightness),
    ("contrast", 1.0, adjust_contrast),
    ("saturation", 1.0, adjust_saturation),
    ("hue", 0.0, adjust_hue),
)


def _normalize_channels_last(x: Tensor, cfg: AugConfig) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.channels_last)
    return normalize(x, cfg.mean, cfg.std, out=out)


def augment(
    images: Tensor, cfg: AugConfig, generator: torch.Generator, return_params: bool = False
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """One random view of each image: float32 (B, 3, size, size), channels_last.

    Resized crop (+ flip) -> colour jitter (p=jitter_p) -> grayscale (gray_p)
    -> Gaussian blur (blur_p) -> solarize (solarize_p) -> normalize.

    With ``return_params`` also returns the sampled per-sample parameters:
    ``boxes`` (B, 4) and ``flip`` always; ``jitter`` (mask) with the effective
    ``brightness``/``contrast``/``saturation`` factors and ``hue`` shift (identity
    where the mask is off) for the enabled ones; ``gray``; ``blur`` (mask) and
    ``blur_sigma``; ``solarize``.  Keys of disabled ops are absent.
    """
    x = to_float(images)
    b, _, height, width = x.shape
    dev = x.device
    params: dict[str, Tensor] = {}

    boxes = sample_crop_boxes(b, cfg.crop_scale, cfg.crop_ratio, generator, dev, width / height)
    flip = _rand((b,), generator, dev) < cfg.flip_p
    x = resized_crop(x, boxes, cfg.size, flip)  # a fresh tensor: the ops below write into it
    params.update(boxes=boxes, flip=flip)

    strengths = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    if cfg.jitter_p > 0 and any(s > 0 for s in strengths):
        u = _rand((b, 5), generator, dev)
        on = u[:, 0] < cfg.jitter_p
        params["jitter"] = on
        for i, (s, (name, identity, op)) in enumerate(zip(strengths, _JITTER_OPS), start=1):
            if s > 0:
                value = torch.where(on, identity + s * (2 * u[:, i] - 1), identity)
                op(x, value, out=x)
                params[name] = value

    if cfg.gray_p > 0:
        gray = _rand((b,), generator, dev) < cfg.gray_p
        grayscale(x, gray, out=x)
        params["gray"] = gray

    if cfg.blur_p > 0:
        u = _rand((b, 2), generator, dev)
        blur = u[:, 0] < cfg.blur_p
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, 1]
        gaussian_blur(x, sigma, blur, out=x)
        params.update(blur=blur, blur_sigma=sigma)

    if cfg.solarize_p > 0:
        sol = _rand((b,), generator, dev) < cfg.solarize_p
        solarize(x, sol, out=x)
        params["solarize"] = sol

    out = _normalize_channels_last(x, cfg)
    return (out, params) if return_params else out


def eval_view(images: Tensor, cfg: AugConfig) -> Tensor:
    """Deterministic view: resize to (size, size) if needed (bilinear, antialiased), normalize.

    Returns float32 (B, 3, size, size) in channels_last memory format.
    """
    x = to_float(images)
    if x.shape[-2:] != (cfg.size, cfg.size):
        x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False, antialias=True)
    return _normalize_channels_last(x, cfg)


INPUT_CHANNELS = {"rgb": 3, "lab_l": 1}  # what a backbone can be trained to see (Method.input_mode)


def eval_input(images: Tensor, cfg: AugConfig, mode: str = "rgb") -> Tensor:
    """The deterministic evaluation input of a backbone trained on ``mode``: ``"rgb"`` is
    :func:`eval_view`; ``"lab_l"`` is the L channel of the resized image scaled to [-1, 1]
    (colorization's input, see ``data.color.lightness``)."""
    if mode == "rgb":
        return eval_view(images, cfg)
    if mode == "lab_l":
        from .color import lightness

        x = to_float(images)
        if x.shape[-2:] != (cfg.size, cfg.size):
            x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False, antialias=True)
        return lightness(x).contiguous(memory_format=torch.channels_last)
    raise ValueError(f"unknown input mode '{mode}'; choose one of {', '.join(INPUT_CHANNELS)}")


def augment_input(images: Tensor, cfg: AugConfig, generator: torch.Generator, mode: str = "rgb") -> Tensor:
    """A random view of each image as the input of a backbone trained on ``mode`` (the training-time
    counterpart of :func:`eval_input`): ``"rgb"`` is :func:`augment`; ``"lab_l"`` augments in RGB
    (``cfg``'s colour ops included, its mean/std ignored) and returns the L channel scaled to [-1, 1]."""
    if mode == "rgb":
        return augment(images, cfg, generator)
    if mode == "lab_l":
        from .color import lightness

        x = augment(images, dataclasses.replace(cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), generator)
        return lightness(x).contiguous(memory_format=torch.channels_last)
    raise ValueError(f"unknown input mode '{mode}'; choose one of {', '.join(INPUT_CHANNELS)}")


def sample_cutout_boxes(n: int, height: int, width: int, side: tuple[float, float], generator: torch.Generator,
                        device: torch.device | str) -> Tensor:
    """Cutout squares ``(top, left, side)`` in pixels, int64 ``(n, 3)``: the side a uniform fraction
    ``side`` of the image's shorter side (rounded, at least 1 px), placed uniformly inside the image."""
    u = _rand((n, 3), generator, device)
    short = min(height, width)
    s = (side[0] + (side[1] - side[0]) * u[:, 0]) * short
    s = s.add_(0.5).floor_().clamp_(1, short).long()
    top = (u[:, 1] * (height - s + 1)).long().clamp_max_(height - s)
    left = (u[:, 2] * (width - s + 1)).long().clamp_max_(width - s)
    return torch.stack([top, left, s], dim=1)


def cutout(x: Tensor, boxes: Tensor, fill: float = 0.0, *, out: Tensor | None = None) -> Tensor:
    """Cutout (DeVries & Taylor 2017): set one square per image, ``boxes`` ``(top, left, side)`` in
    pixels (see :func:`sample_cutout_boxes`), to ``fill`` in every channel. One whole-batch mask; on a
    normalised view ``fill=0`` is the dataset's mean colour."""
    height, width = x.shape[-2:]
    top, left, side = (v.view(-1, 1, 1, 1) for v in boxes.to(x.device).unbind(1))
    ys = torch.arange(height, device=x.device).view(1, 1, height, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, 1, width)
    inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    if out is None:
        out = x.clone()  # keeps the memory format
    elif out is not x:
        out.copy_(x)
    return out.masked_fill_(inside, fill)


def two_views(images: Tensor, cfg: AugConfig, generator: torch.Generator,
              view2_blur_p: float | None = None, view2_solarize_p: float | None = None) -> Tensor:
    """Two views of each image, concatenated ``[x1; x2]`` (``2B`` images): view 1 with ``cfg``, view 2
    with ``cfg`` except the blur / solarize probabilities given here (``None`` keeps ``cfg``'s), which
    expresses BYOL's asymmetric augmentations (Grill et al. 2020, Table 6)."""
    changes = {k: v for k, v in (("blur_p", view2_blur_p), ("solarize_p", view2_solarize_p)) if v is not None}
    x1 = augment(images, cfg, generator)
    x2 = augment(images, dataclasses.replace(cfg, **changes) if changes else cfg, generator)
    return torch.cat([x1, x2])


def multi_crop(images: Tensor, cfg: AugConfig, generator: torch.Generator, n_global: int = 2, n_local: int = 6,
               global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
               local_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Multi-crop views (SwAV, Caron et al. 2020, Sec. 3.2; DINO): ``n_global`` views at ``cfg.size``
    from crops of ``global_scale`` of the image and ``n_local`` views at ``local_size`` (default
    ``cfg.size * 3 // 7`` rounded down to a multiple of 4, i.e. 96 of 224 px, 12 of 32 px) from crops of
    ``local_scale``.
    Returns ``(globals, locals)``, each concatenated view-major: ``globals[v * B + i]`` is view ``v`` of
    image ``i`` (``locals`` is None when ``n_local == 0``)."""
    if n_global < 1 or n_local < 0:
        raise ValueError(f"multi_crop needs n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")
    gcfg = dataclasses.replace(cfg, crop_scale=tuple(global_scale))
    glob = torch.cat([augment(images, gcfg, generator) for _ in range(n_global)])
    if n_local == 0:
        return glob, None
    return glob, local_crops(images, cfg, generator, n_local, local_scale, local_size or max(8, cfg.size * 3 // 7 // 4 * 4))


def local_crops(images: Tensor, cfg: AugConfig, generator: torch.Generator, n: int, scale: tuple[float, float],
                size: int) -> Tensor:
    """``n`` small views of each image at ``size`` px from crops of ``scale`` of it (``cfg``'s other
    augmentations), concatenated view-major: multi-crop's local crops."""
    lcfg = dataclasses.replace(cfg, crop_scale=tuple(scale), size=size)
    return torch.cat([augment(images, lcfg, generator) for _ in range(n)])

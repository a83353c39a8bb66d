"""Colorful Image Colorization: predict the colours (ab of CIE Lab) of a grayscale image (L) as a
classification over quantised ab bins (Zhang, Isola & Efros, ECCV 2016, arXiv:1603.08511).

Algorithm (Sec. 2 of the paper)::

    x       = augment(images)                        # random crop + flip, RGB in [0, 1]
    L, ab   = rgb_to_lab(x)                          # the network sees L only (1 input channel)
    Z       = soft_encode(downsample(ab))            # 5 nearest of the Q in-gamut bins, Gaussian sigma=5
    Zhat    = softmax(decoder(f(L)))                 # per-pixel distribution over the Q bins
    v       = w[argmax_q Z]                          # class rebalancing (Eq. 3-4)
    loss    = -mean_hw v * sum_q Z log Zhat          # Eq. 2 (averaged, not summed, over pixels)
    colours = annealed_mean(Zhat, T=0.38)            # Eq. 5, for the figures

The bins: the ab plane is quantised with grid size 10 (bin centres at multiples of 10); the in-gamut
set is every bin whose cell holds the ab of some sRGB colour (the 128^3 colours ``k/127``, computed
once and cached): 262 bins here, 313 in the paper (whose set came from a differently sampled gamut;
the spec allows the count to differ). Rebalancing: ``p`` is the empirical distribution of the
nearest bins, smoothed with a Gaussian (sigma=5) over the bin centres (each bin's mass spread over its
in-gamut neighbours, so it stays a distribution), mixed with the uniform one,
``w ~ ((1 - lambda) p + lambda / Q)^-1`` with lambda = 0.5, normalised so that ``sum_q p_q w_q = 1``.
``p`` is estimated once, at the start of training (``on_epoch_start`` of the first epoch), from the
target-resolution ab of ``prior_images`` training images, and kept in buffers that the checkpoint
saves (a resumed run does not redo it). Used outside the trainer, the first batch gives it.

Scaling for 32-96 px images (the paper: 224 px, VGG-style net, targets at 1/4 resolution, 56 x 56):
the backbone's last stage map (1/8 of the image, 4 x 4 at 32 px) feeds a small decoder (1x1 conv,
bilinear upsampling, 3x3 conv, 1x1 conv to Q logits) predicting the bins at 1/2 resolution
(``out_stride=2``: 16 x 16 at 32 px; at 96 px, ``out_stride=4`` keeps the paper's 1/4 and the target
encoding 4x cheaper). Backbone features for downstream tasks are ``f(L)``;
evaluation feeds the L channel too (``input_mode = "lab_l"``, saved in the checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.color import lab_to_rgb, rgb_to_lab
from ..data.views import augment, to_float
from ..figures import image_grid, sample_batch
from .base import Method


# --------------------------------------------------------------------------------------------------
# the ab bins


@functools.lru_cache(maxsize=4)
def _gamut_bins(grid: float, levels: int) -> torch.Tensor:
    v = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    half = int(200 // grid) + 1  # |a|, |b| < 200 covers every Lab colour of sRGB
    seen = torch.zeros((2 * half + 1) ** 2, dtype=torch.bool)
    for r in v.split(max(1, levels // 8)):  # a slab of the sRGB cube at a time
        rgb = torch.stack(torch.meshgrid(r, v, v, indexing="ij")).reshape(1, 3, -1, 1)
        q = torch.round(rgb_to_lab(rgb)[0, 1:, :, 0] / grid).long() + half
        seen[q[0] * (2 * half + 1) + q[1]] = True
    cells = seen.nonzero()[:, 0]  # sorted: by a, then b
    return torch.stack([cells // (2 * half + 1), cells % (2 * half + 1)], 1).float().sub(half) * grid


def ab_bins(grid: float = 10.0, levels: int = 128) -> torch.Tensor:
    """Centres ``(Q, 2)`` of the in-gamut ab bins (multiples of ``grid``, sorted by a then b): the
    bins whose cell holds the ab of one of the ``levels^3`` sRGB colours. Deterministic, cached."""
    return _gamut_bins(float(grid), int(levels)).clone()


def _sq_dist(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(N, Q)`` of points ``(N, 2)`` to bin centres ``(Q, 2)``."""
    c = centres.to(ab)
    return (ab.square().sum(1, keepdim=True) - 2 * ab @ c.t() + c.square().sum(1)).clamp_min(0)


def _pixels(ab: torch.Tensor) -> torch.Tensor:
    return ab.permute(0, 2, 3, 1).reshape(-1, 2).float()


def hard_encode(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin of each pixel: ab ``(B, 2, h, w)`` -> ``(B, h, w)`` long."""
    b, _, h, w = ab.shape
    return _sq_dist(_pixels(ab), centres).argmin(1).view(b, h, w)


def soft_encode(ab: torch.Tensor, centres: torch.Tensor, k: int = 5, sigma: float = 5.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's soft targets: the ``k`` nearest bins of each pixel (nearest first) and their
    weights, a Gaussian of the distance (``sigma``) normalised to sum 1. Both ``(B, k, h, w)``."""
    b, _, h, w = ab.shape
    d2, idx = _sq_dist(_pixels(ab), centres).topk(k, dim=1, largest=False, sorted=True)
    weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)
    return (idx.view(b, h, w, k).permute(0, 3, 1, 2).contiguous(),
            weights.view(b, h, w, k).permute(0, 3, 1, 2).contiguous())


def decode(logits: torch.Tensor, centres: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Annealed mean (Eq. 5): ``H(Z) = sum_q f_T(Z)_q c_q`` with ``f_T(z) = z^(1/T) / sum z^(1/T)``,
    which is ``softmax(logits / T)``; ab ``(B, 2, h, w)``. T=1 is the mean, T -> 0 the mode."""
    p = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", p, centres.to(p))


def smoothed_prior(counts: torch.Tensor, centres: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """The empirical bin distribution ``counts / sum`` smoothed by a Gaussian (``sigma``) over the bin
    centres; each bin's mass is spread over the in-gamut bins, so the result sums to 1."""
    p = counts.float() / counts.sum().clamp_min(1)
    kernel = torch.exp(-_sq_dist(centres.float(), centres) / (2 * sigma**2)).to(p)  # (Q, Q), symmetric
    kernel = kernel / kernel.sum(0, keepdim=True)  # column q': where bin q' sends its mass
    out = kernel @ p
    return out / out.sum()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Eq. 4: ``w ~ ((1 - lam) p + lam / Q)^-1``, normalised so ``E_p[w] = sum_q p_q w_q = 1``."""
    w = 1.0 / ((1 - lam) * prior + lam / prior.numel())
    return w / (prior * w).sum()


# --------------------------------------------------------------------------------------------------
# the method


class ColorDecoder(nn.Module):
    """Per-pixel bin logits at ``size`` from the backbone's last stage map."""

    def __init__(self, in_dim: int, dim: int, num_bins: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.refine = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                                    nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(dim, num_bins, 1)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(self.reduce(feats), size=size, mode="bilinear", align_corners=False)
        return self.classify(self.refine(x))


class Colorization(Method):
    name = "colorization"
    family = "generation-based"
    summary = ("Colorization (Zhang et al. 2016): predict ab colours from L as a rebalanced "
               "classification over quantised ab bins")
    input_mode = "lab_l"

    @dataclass
    class Params:
        grid: float = 10.0  # ab quantisation step (the paper's grid size 10)
        num_soft: int = 5  # nearest bins in a soft-encoded target (paper: 5)
        soft_sigma: float = 5.0  # Gaussian kernel of the soft encoding, in ab units (paper: 5)
        rebalance: bool = True  # class rebalancing (Eq. 3-4); false: plain soft cross-entropy
        rebalance_lambda: float = 0.5  # mix of the smoothed prior with the uniform one (paper: 0.5)
        prior_sigma: float = 5.0  # Gaussian smoothing of the empirical bin distribution (paper: 5)
        prior_images: int = 4096  # training images the bin distribution is estimated on
        out_stride: int = 2  # targets at 1/out_stride of the image (paper: 4 at 224 px)
        decoder_dim: int = 128  # width of the decoder head
        temperature: float = 0.38  # annealed-mean temperature of the figures (paper: 0.38)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("bins", ab_bins(self.hp.grid))  # (Q, 2) ab centres
        q = len(self.bins)
        self.decoder = ColorDecoder(self.backbone.stage_dims[-1], self.hp.decoder_dim, q)
        self.register_buffer("prior", torch.full((q,), 1.0 / q))  # smoothed empirical bin distribution
        self.register_buffer("class_weights", torch.ones(q))  # Eq. 4's w
        self.register_buffer("prior_pixels", torch.zeros((), dtype=torch.long))  # 0: not estimated yet
        self._prior_checked = False  # mirror of prior_pixels > 0, so the step does not sync on it
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_prior_checked", False))
        self._rgb01 = dataclasses.replace(cfg.aug, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # views in [0, 1]

    # -- the prior -----------------------------------------------------------------------------
    def target_ab(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L scaled to [-1, 1] ``(B, 1, H, W)`` and ab at the target resolution ``(B, 2, h, w)``."""
        lab = rgb_to_lab(rgb)
        return lab[:, :1] / 50 - 1, F.avg_pool2d(lab[:, 1:], self.hp.out_stride)

    @torch.no_grad()
    def set_prior(self, counts: torch.Tensor) -> None:
        """Set the rebalancing from bin counts ``(Q,)`` (how often each bin is a pixel's nearest)."""
        self.prior.copy_(smoothed_prior(counts, self.bins, self.hp.prior_sigma))
        self.class_weights.copy_(rebalance_weights(self.prior, self.hp.rebalance_lambda))
        self.prior_pixels.fill_(int(counts.sum()))
        self._prior_checked = True

    def bin_counts(self, hard: torch.Tensor) -> torch.Tensor:
        flat = hard.reshape(-1)
        ones = torch.ones_like(flat, dtype=torch.float)
        return torch.zeros(len(self.bins), device=flat.device).scatter_add_(0, flat, ones)

    @torch.no_grad()
    def on_epoch_start(self, run, epoch: int) -> None:
        if int(self.prior_pixels) > 0:  # estimated already (possibly before a resume)
            self._prior_checked = True
            return
        images = run.images
        g = torch.Generator().manual_seed(run.seed + 2)
        idx = torch.randperm(len(images), generator=g)[:self.hp.prior_images].sort().values.numpy()
        counts = torch.zeros(len(self.bins), device=run.device)
        for chunk in torch.from_numpy(idx).split(256):
            x = torch.from_numpy(images[chunk.numpy()]).permute(0, 3, 1, 2).to(run.device)
            counts += self.bin_counts(hard_encode(self.target_ab(to_float(x))[1], self.bins))
        self.set_prior(counts)

    # -- training ------------------------------------------------------------------------------
    def prepare(self, images, generator):
        x = augment(images, self._rgb01, generator)  # crop + flip (colour ops off in the preset), [0, 1]
        lightness, ab = self.target_ab(x)
        idx, weights = soft_encode(ab, self.bins, self.hp.num_soft, self.hp.soft_sigma)
        return self.fmt(lightness), idx, weights

    def logits(self, lightness: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.decoder(self.backbone.forward_stages(lightness)[-1], size)

    def training_step(self, batch):
        lightness, idx, weights = batch
        hard = idx[:, 0]  # the nearest bin, argmax_q Z
        if not self._prior_checked and int(self.prior_pixels) == 0:  # used outside the trainer
            self.set_prior(self.bin_counts(hard))
        self._prior_checked = True
        logits = self.logits(lightness, tuple(idx.shape[-2:])).float()
        log_p = F.log_softmax(logits, dim=1)
        ce = -(weights * log_p.gather(1, idx)).sum(1)  # (B, h, w): -sum_q Z log Zhat
        v = self.class_weights[hard] if self.hp.rebalance else torch.ones_like(ce)
        loss = (v * ce).mean()
        with torch.no_grad():
            acc = (logits.argmax(1) == hard).float().mean()
            majority = self.bin_counts(hard).max() / hard.numel()  # always guessing the batch's commonest bin
        return {"loss": loss, "pretext_acc": acc, "majority_acc": majority}

    # -- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def colorize(self, rgb: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """RGB in [0, 1] -> the model's colouring of its L: annealed-mean ab, upsampled, with the
        original L, back to RGB."""
        lab = rgb_to_lab(rgb)
        h, w = rgb.shape[-2] // self.hp.out_stride, rgb.shape[-1] // self.hp.out_stride
        logits = self.logits(self.fmt(lab[:, :1] / 50 - 1), (h, w))
        ab = decode(logits, self.bins, self.hp.temperature if temperature is None else temperature)
        ab = F.interpolate(ab, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], 1))

    @torch.no_grad()
    def figures(self, data, out_dir: Path, device) -> list[Path]:
        x = to_float(sample_batch(data, 10, device))
        gray = rgb_to_lab(x)[:, :1] / 100
        path = image_grid([gray, self.colorize(x), x], Path(out_dir) / "colorization.png",
                          row_titles=["input L", f"colorized\n(T={self.hp.temperature})", "original"],
                          title="Colorization: annealed-mean colours predicted from lightness")
        return [path]

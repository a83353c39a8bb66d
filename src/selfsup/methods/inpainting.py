"""Context encoders: fill in a missing region of an image from its context
(Pathak, Krähenbühl, Donahue, Darrell & Efros, CVPR 2016, arXiv:1604.07379).

Algorithm (Sec. 3 of the paper; phases "g" then "d", one optimizer each)::

    x      = augment(images)                       # random crop + flip, normalised
    M      = mask(x)                               # 1 in the dropped region: the central square
                                                   # (1/4 of the area) and/or random blocks (~1/4)
    x_hat  = (1 - M) * x                           # the region filled with the dataset mean (0)
    pred   = decoder(bottleneck(f(x_hat)))         # encoder f = the backbone's last stage map
    L_rec  = ||M * (x - pred)||^2 / ||M||          # Eq. 1, normalised masked L2
    fake   = M * pred + (1 - M) * x                # the completed image
    g:  L  = (1 - a) L_rec + a * -log D(fake)      # Eq. 3 with a = adv_weight (paper: 0.999 / 0.001)
    d:  L  = -log D(x) - log(1 - D(fake))          # Eq. 2, DCGAN discriminator

Encoder, bottleneck and decoder as in the paper at a smaller scale: the backbone's last map (C x s x s)
goes through a channel-wise fully-connected layer (each channel's s*s map mixed by its own s^2 x s^2
matrix, so every position sees the whole context without a dense C s^2 x C s^2 layer) and a 1x1 conv
(``bottleneck_dim`` channels), then transposed convs (4x4, stride 2, BN, ReLU) up to the image size and
a 3x3 conv to RGB (the normalised image, no tanh).

Choices (documented departures):

* The discriminator judges the *completed image* (context + predicted region) against the real one,
  so one network serves central and random masks; the paper's central-region D saw the 64 x 64 patch
  alone. Its gradient reaches the generator only through the masked region.
* ``adv_weight = 0`` switches the adversarial term off: then no discriminator is built and the
  instance's ``phases`` is ``("g",)``, i.e. the plain single-optimizer loop (the class attribute names
  both phases of the adversarial variant). A run's phases follow its config, so resume is unaffected.
* The "random region" masks are ``random_blocks`` random rectangles (sides 18-36% of the image's, so
  the union covers about 1/4 on average), as in the paper's random-block variant; the paper's random
  regions shaped like PASCAL segmentations need a mask data set. ``mask="both"`` draws central or
  random per image with probability 1/2.
* ``overlap_px > 0`` is the paper's overlap weighting: the loss also covers a band of
  ``overlap_px`` visible pixels around the hole, weighted ``overlap_weight`` (paper: 4 px at 128 px, x10).

Scaling: the paper trains 128 px images (centre 64 px), Adam lr 2e-4, beta1 0.5; here 32-96 px images
with the same mask fractions and Adam beta1 0.5 for both players.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.views import augment, eval_view
from ..figures import image_grid, sample_batch
from .base import Method, split_decay

MASKS = ("center", "random", "both")


# --------------------------------------------------------------------------------------------------
# masks and the loss


def center_mask(b: int, h: int, w: int, device=None) -> torch.Tensor:
    """``(B, 1, H, W)`` float, 1 on the central square of half the side (a quarter of the area)."""
    m = torch.zeros(b, 1, h, w, device=device)
    top, left = (h - h // 2) // 2, (w - w // 2) // 2
    m[:, :, top:top + h // 2, left:left + w // 2] = 1
    return m


def random_block_mask(b: int, h: int, w: int, generator: torch.Generator, device=None, blocks: int = 4,
                      side: tuple[float, float] = (0.18, 0.36)) -> torch.Tensor:
    """``(B, 1, H, W)``: the union of ``blocks`` random rectangles per image, each side a uniform
    fraction ``side`` of the image's, placed uniformly inside it (about 1/4 of the area on average)."""
    u = torch.rand(b, blocks, 4, generator=generator, device=generator.device).to(device)
    bh = (side[0] + (side[1] - side[0]) * u[..., 0]) * h
    bw = (side[0] + (side[1] - side[0]) * u[..., 1]) * w
    top, left = u[..., 2] * (h - bh), u[..., 3] * (w - bw)
    ys = torch.arange(h, device=device).view(1, 1, h, 1) + 0.5  # pixel centres
    xs = torch.arange(w, device=device).view(1, 1, 1, w) + 0.5
    inside = ((ys >= top[..., None, None]) & (ys < (top + bh)[..., None, None])
              & (xs >= left[..., None, None]) & (xs < (left + bw)[..., None, None]))
    return inside.any(1, keepdim=True).float()


def make_masks(kind: str, b: int, h: int, w: int, generator: torch.Generator, device=None,
               blocks: int = 4) -> torch.Tensor:
    """The masks of a batch for ``kind`` in ``MASKS``; randomness only from ``generator``."""
    if kind == "center":
        return center_mask(b, h, w, device)
    rand = random_block_mask(b, h, w, generator, device, blocks)
    if kind == "random":
        return rand
    pick = torch.rand(b, generator=generator, device=generator.device).to(device) < 0.5
    return torch.where(pick.view(b, 1, 1, 1), center_mask(b, h, w, device), rand)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` with the masked region set to ``fill`` (0: the dataset mean after normalisation)."""
    return torch.where(mask.bool(), torch.full_like(x, fill), x)


def loss_weights(mask: torch.Tensor, overlap_px: int = 0, overlap_weight: float = 10.0) -> torch.Tensor:
    """Per-pixel weights of the reconstruction loss: 1 in the hole, ``overlap_weight`` on a band of
    ``overlap_px`` pixels around it (the paper's overlap), 0 elsewhere."""
    if overlap_px <= 0:
        return mask
    grown = F.max_pool2d(mask, 2 * overlap_px + 1, stride=1, padding=overlap_px)
    return mask + overlap_weight * (grown - mask)


def masked_l2(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Normalised weighted L2: ``sum w (pred - target)^2 / (C sum w)``, the mean squared error over
    the weighted region (Eq. 1)."""
    err = (pred.float() - target.float()).square() * weights
    return err.sum() / (weights.sum() * pred.shape[1]).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# networks


class ChannelwiseFC(nn.Module):
    """Each channel's ``s x s`` map is mixed by its own fully-connected ``s^2 x s^2`` layer."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        n = size * size
        self.weight = nn.Parameter(torch.randn(channels, n, n) / math.sqrt(n))
        self.bias = nn.Parameter(torch.zeros(channels, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = torch.einsum("bcn,cnm->bcm", x.reshape(b, c, h * w), self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return y.view(b, c, h, w)


class ContextDecoder(nn.Module):
    """Bottleneck (channel-wise FC, 1x1 conv) then transposed convs up to ``image_size``, RGB out."""

    def __init__(self, in_dim: int, map_size: int, image_size: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.bottleneck = nn.Sequential(
            ChannelwiseFC(in_dim, map_size), nn.BatchNorm2d(in_dim), nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, bottleneck_dim, 1, bias=False), nn.BatchNorm2d(bottleneck_dim), nn.ReLU(inplace=True))
        ups: list[nn.Module] = []
        c, s = bottleneck_dim, map_size
        while s < image_size:
            out = max(c // 2, 32)
            ups += [nn.ConvTranspose2d(c, out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True)]
            c, s = out, s * 2
        self.up = nn.Sequential(*ups)
        self.to_rgb = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        y = self.up(self.bottleneck(feats))
        if y.shape[-1] != self.image_size:  # sizes that are not a power of 2 times the map's
            y = F.interpolate(y, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.to_rgb(y)


class Discriminator(nn.Sequential):
    """DCGAN discriminator: 4x4 stride-2 convs (BN after the first, LeakyReLU 0.2) down to at most
    4 x 4, then a conv over the whole map to one logit."""

    def __init__(self, image_size: int, dim: int = 64) -> None:
        layers: list[nn.Module] = []
        c, s = 3, image_size
        while s > 4:
            out = min(dim * 2 ** (len(layers) // 3), 8 * dim)
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1, bias=c == 3),
                       nn.BatchNorm2d(out) if c != 3 else nn.Identity(), nn.LeakyReLU(0.2, inplace=True)]
            c, s = out, s // 2
        layers += [nn.Conv2d(c, 1, s), nn.Flatten()]
        super().__init__(*layers)


# --------------------------------------------------------------------------------------------------
# the method


class Inpainting(Method):
    name = "inpainting"
    family = "generation-based"
    summary = ("Context encoder (Pathak et al. 2016): reconstruct a masked region (L2 + adversarial), "
               "encoder = backbone")
    phases = ("g", "d")  # the adversarial variant; ("g",) on instances with adv_weight = 0

    @dataclass
    class Params:
        mask: str = "center"  # center (central square, 1/4 of the area) | random (blocks) | both
        random_blocks: int = 4  # rectangles per random mask
        adv_weight: float = 0.001  # weight of the adversarial term (paper: 0.001 vs 0.999); 0: L2 only
        overlap_px: int = 0  # band around the hole also reconstructed (paper: 4 px at 128 px); 0: off
        overlap_weight: float = 10.0  # loss weight of that band (paper: 10)
        bottleneck_dim: int = 256  # channels of the bottleneck after the channel-wise FC
        disc_dim: int = 64  # width of the discriminator's first layer (DCGAN: 64)
        beta1: float = 0.5  # Adam beta1 of both players (DCGAN / paper); used by optim.name=adamw

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if self.hp.mask not in MASKS:
            raise ConfigError(f"params.mask must be one of {', '.join(MASKS)}, got '{self.hp.mask}'")
        size = cfg.data.image_size
        side = self.backbone.last_map_shape(size)[-1]  # the last map's side, measured
        self.decoder = ContextDecoder(self.backbone.stage_dims[-1], side, size, self.hp.bottleneck_dim)
        self.adversarial = self.hp.adv_weight > 0
        self.disc = Discriminator(size, self.hp.disc_dim) if self.adversarial else None
        self.phases = ("g", "d") if self.adversarial else ("g",)
        self._fake: torch.Tensor | None = None  # the g phase's completed images, for the d phase

    def param_groups(self):
        betas = {"betas": (self.hp.beta1, 0.999)}
        groups = split_decay(list(self.backbone.parameters()) + list(self.decoder.parameters()), phase="g", **betas)
        if self.disc is not None:
            groups += split_decay(self.disc.parameters(), phase="d", **betas)
        return groups

    def prepare(self, images, generator):
        x = augment(images, self.cfg.aug, generator)
        b, _, h, w = x.shape
        mask = make_masks(self.hp.mask, b, h, w, generator, x.device, self.hp.random_blocks)
        return self.fmt(apply_mask(x, mask)), x, mask

    def reconstruct(self, masked: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.forward_stages(masked)[-1])

    def _adv(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))

    def training_step(self, batch):
        """The generator's objective (the whole step when the adversarial term is off)."""
        masked, x, mask = batch
        pred = self.reconstruct(masked).float()
        rec = masked_l2(pred, x, loss_weights(mask, self.hp.overlap_px, self.hp.overlap_weight))
        out = {"rec_loss": rec, "fill_loss": masked_l2(torch.zeros_like(x), x, mask)}  # fill: predicting the mean
        if not self.adversarial:
            return {"loss": rec, **out}
        fake = mask * pred + (1 - mask) * x
        self._fake = fake.detach()
        adv = self._adv(self.disc(fake), True)
        return {"loss": (1 - self.hp.adv_weight) * rec + self.hp.adv_weight * adv, "adv_loss": adv, **out}

    def phase_step(self, batch, phase):
        if phase == "g":
            return self.training_step(batch)
        _, x, mask = batch
        if self._fake is None:  # d phase on its own
            with torch.no_grad():
                self._fake = mask * self.reconstruct(batch[0]).float() + (1 - mask) * x
        real_logits, fake_logits = self.disc(x), self.disc(self._fake.to(x.dtype))
        self._fake = None
        loss = self._adv(real_logits, True) + self._adv(fake_logits, False)
        with torch.no_grad():
            acc = ((real_logits.float() > 0).float().mean() + (fake_logits.float() < 0).float().mean()) / 2
        return {"loss": loss, "d_acc": acc}

    # -- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def figures(self, data, out_dir: Path, device) -> list[Path]:
        images = sample_batch(data, 10, device)
        x = eval_view(images, self.cfg.aug)
        b, _, h, w = x.shape
        mean = torch.tensor(self.cfg.aug.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.aug.std, device=device).view(1, 3, 1, 1)
        show = lambda t: t * std + mean  # noqa: E731 - back to [0, 1] RGB
        kinds = ["center", "random"] if self.hp.mask == "both" else [self.hp.mask]
        rows, titles = [show(x)], ["original"]
        for kind in kinds:
            g = torch.Generator(device=device).manual_seed(0)
            mask = make_masks(kind, b, h, w, g, device, self.hp.random_blocks)
            masked = apply_mask(x, mask)
            pred = self.reconstruct(self.fmt(masked)).float()
            rows += [show(masked), show(mask * pred + (1 - mask) * x)]
            titles += [f"masked\n({kind})", "inpainted"]
        path = image_grid(rows, Path(out_dir) / "inpainting.png", row_titles=titles,
                          title="Context encoder: masked region filled from its context")
        return [path]

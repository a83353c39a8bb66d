"""MAE: masked autoencoders, reconstruct the pixels of randomly masked patches
(He, Chen, Xie, Li, Dollár & Girshick, CVPR 2022, arXiv:2111.06377).

Algorithm (Sec. 3 of the paper)::

    x        = augment(images)                        # random resized crop (0.2-1) + flip only
    shuffle  = argsort(uniform noise (B, N))          # a random order of the N patches, per image
    keep     = shuffle[:, :N * (1 - mask_ratio)]      # the first 25%: the visible patches
    latent   = encoder(x, keep)                       # the ViT backbone on the visible patches only
    tokens   = decoder_embed(latent) + mask tokens    # back to N tokens in the original order
    pred     = decoder(tokens + pos)                  # (B, N, p*p*3) pixels of every patch
    target   = norm_pix(patchify(x))                  # each patch minus its mean, over its std
    loss     = mean over masked patches of mean_pixels (pred - target)^2

The encoder is the run's ViT backbone (``vit_tiny`` by default; other backbones are refused): only the
visible patches (plus the class token) go through it, which is what makes MAE cheap. The decoder is a
few pre-norm transformer blocks (torchvision's ``EncoderBlock``) on all N tokens and is discarded
after pre-training. Features for evaluation (kNN, linear probe, the per-epoch health) are
``ViT.forward``: the class token after the encoder's final norm. As in the paper (App. A.1) it is an
auxiliary token appended to the encoder's input whose output reaches the pre-training loss only
through the decoder (which receives it), and the token that the paper's linear probe and fine-tuning
read; the paper notes that average-pooling the patch tokens works about as well.

The loss is a mean over the masked patches of the batch, whose number is fixed (B * (N - k)), so it
couples no samples: averaging gradients over processes equals one process on the global batch.

Position embeddings: fixed 2-D sine-cosine for the decoder and (``fixed_pos_embed``, the default) for
the encoder as in the paper (App. A.1); the encoder's is written into the backbone's position
embedding, which is then frozen, so evaluation and fine-tuning load the same values. The class
token's position is 0, as in the reference code.

Paper defaults (ImageNet, 224 px, ViT-B/16 .. ViT-H/14): mask ratio 75%, decoder 8 blocks x 512 wide,
normalised pixel targets, AdamW lr 1.5e-4 per 256 images, betas (0.9, 0.95), weight decay 0.05,
batch 4096, 40 warm-up epochs of 800-1600, cosine decay. Scaled here for 32-96 px images: ViT-Tiny
with 4 px patches at 32 px (64 tokens, 16 visible), 8 px up to 96 px (see ``backbones.vit_patch_size``),
a 4-block, 128-wide decoder (4 heads), the same mask ratio, loss and optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..backbones import VITS
from ..config import ConfigError
from ..data.views import augment, eval_view
from ..figures import image_grid, sample_batch
from ..losses import mae_loss
from .base import Method, split_decay

# --------------------------------------------------------------------------------------------------
# patches, masks, position embeddings (pure functions)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)``: the ``p x p`` patches in row-major order (the ViT's
    token order), each flattened as (row, column, channel) like MAE's ``patchify``."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, N, p*p*C)`` -> ``(B, C, h*p, w*p)`` for an ``h x w``
    patch grid."""
    b, n, d = patches.shape
    c = d // (p * p)
    if n != h * w or d != p * p * c:
        raise ValueError(f"{n} patches of {d} values do not make a {h}x{w} grid of {p}x{p} patches")
    x = patches.reshape(b, h, w, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * p, w * p)


def random_shuffle(b: int, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """A uniformly random order of the ``n`` patches of each of ``b`` images, ``(B, N)`` int64: the
    argsort of uniform noise (MAE's ``random_masking``), drawn from ``generator`` only."""
    noise = torch.rand(b, n, generator=generator, device=generator.device)
    return torch.argsort(noise.to(device), dim=1)


def num_visible(n: int, mask_ratio: float) -> int:
    """How many of ``n`` patches stay visible: ``int(n * (1 - mask_ratio))`` (at least 1, at most n-1)."""
    return min(n - 1, max(1, int(n * (1 - mask_ratio) + 1e-9)))


def patch_mask(shuffle: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N)`` float, 0 on the ``k`` visible patches ``shuffle[:, :k]`` and 1 on the masked ones."""
    mask = torch.ones(shuffle.shape, device=shuffle.device)
    return mask.scatter_(1, shuffle[:, :k], 0.0)


def sincos_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``(h*w, dim)`` of an ``h x w`` grid in row-major order
    (MAE's ``get_2d_sincos_pos_embed``): the first half of the dimensions encodes the column, the
    second half the row, each as ``[sin(pos * omega), cos(pos * omega)]`` with
    ``omega_i = 10000^(-i / (dim/4))``, i = 0 .. dim/4 - 1."""
    if dim % 4:
        raise ValueError(f"the sine-cosine embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


# --------------------------------------------------------------------------------------------------
# the decoder


class MAEDecoder(nn.Module):
    """Embed the encoder's tokens to ``dim``, append a shared learned mask token for every removed
    patch, restore the original patch order, add fixed sine-cosine positions, run ``depth`` pre-norm
    transformer blocks and predict each patch's ``p*p*3`` pixels (the class token's output is dropped)."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: int, patch_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, grid, grid)])
        self.register_buffer("pos", pos.unsqueeze(0), persistent=False)  # fixed: not in checkpoints
        from torchvision.models.vision_transformer import EncoderBlock  # here: torchvision.models costs 2 s to import

        self.blocks = nn.Sequential(*[EncoderBlock(heads, dim, 4 * dim, 0.0, 0.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        for m in [self.embed, self.pred]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """``latent`` ``(B, 1 + k, D_enc)`` (class token first, then the visible patches in shuffled
        order), ``restore`` ``(B, N)`` = argsort of the shuffle -> predictions ``(B, N, patch_dim)``."""
        t = self.embed(latent)
        b, n = restore.shape
        k = t.shape[1] - 1
        patches = torch.cat([t[:, 1:], self.mask_token.to(t.dtype).expand(b, n - k, -1)], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # unshuffle
        t = torch.cat([t[:, :1], patches], dim=1) + self.pos.to(t.dtype)
        return self.pred(self.norm(self.blocks(t)))[:, 1:]


# --------------------------------------------------------------------------------------------------
# the method


class MAE(Method):
    name = "mae"
    family = "generation-based"
    summary = ("MAE (He et al. 2022): ViT encoder on 25% visible patches, light decoder reconstructs the "
               "masked pixels")

    @dataclass
    class Params:
        mask_ratio: float = 0.75  # fraction of patches removed per image (paper: 0.75)
        decoder_dim: int = 128  # decoder width (paper: 512 for ViT-B..H at 224 px)
        decoder_depth: int = 4  # decoder blocks (paper: 8)
        decoder_heads: int = 4  # attention heads of the decoder (paper: 16)
        norm_pix_loss: bool = True  # per-patch normalised pixel targets (paper's default, Table 1d)
        fixed_pos_embed: bool = True  # encoder positions: frozen 2-D sin-cos (paper) instead of learned
        beta2: float = 0.95  # AdamW's second beta (paper: 0.95); betas = (0.9, beta2)

    def __init__(self, cfg) -> None:
        if cfg.model.backbone not in VITS:
            raise ConfigError(f"mae needs a Vision Transformer backbone (model.backbone={' or '.join(VITS)}); "
                              f"'{cfg.model.backbone}' has no patch tokens to mask")
        super().__init__(cfg)
        hp = self.hp
        if not 0 < hp.mask_ratio < 1:
            raise ConfigError(f"params.mask_ratio must be in (0, 1), got {hp.mask_ratio}")
        if hp.decoder_dim % 4 or hp.decoder_dim % hp.decoder_heads:
            raise ConfigError(f"params.decoder_dim ({hp.decoder_dim}) must be divisible by 4 and by "
                              f"params.decoder_heads ({hp.decoder_heads})")
        vit = self.backbone
        self.patch_size, self.grid = vit.patch_size, vit.grid
        if hp.fixed_pos_embed:
            with torch.no_grad():
                pos = torch.cat([torch.zeros(1, vit.dim), sincos_pos_embed(vit.dim, self.grid, self.grid)])
                vit.encoder.pos_embedding.copy_(pos.unsqueeze(0))
            vit.encoder.pos_embedding.requires_grad_(False)
        self.decoder = MAEDecoder(vit.dim, hp.decoder_dim, hp.decoder_depth, hp.decoder_heads, self.grid,
                                  self.patch_size ** 2 * 3)

    def param_groups(self):
        """AdamW with betas (0.9, beta2); biases and norms without weight decay (as MAE's
        ``add_weight_decay``); a frozen position embedding is left out."""
        return split_decay(self.parameters(), betas=(0.9, self.hp.beta2))

    def prepare(self, images, generator):
        x = augment(images, self.cfg.aug, generator)
        shuffle = random_shuffle(x.shape[0], self.grid * self.grid, generator, x.device)
        return self.fmt(x), shuffle

    def reconstruct(self, x: torch.Tensor, shuffle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches ``(B, N, p*p*3)`` (float32) and the mask ``(B, N)`` (1 = masked)."""
        k = num_visible(shuffle.shape[1], self.hp.mask_ratio)
        latent = self.backbone.forward_tokens(x, shuffle[:, :k])  # the encoder sees the visible patches only
        pred = self.decoder(latent, torch.argsort(shuffle, dim=1)).float()
        return pred, patch_mask(shuffle, k)

    def training_step(self, batch):
        x, shuffle = batch
        pred, mask = self.reconstruct(x, shuffle)
        target = patchify(x.float(), self.patch_size)
        loss = mae_loss(pred, target, mask, self.hp.norm_pix_loss)
        with torch.no_grad():  # reference: predicting 0 everywhere (~1 with norm_pix: the target's variance)
            zero = mae_loss(torch.zeros_like(pred), target, mask, self.hp.norm_pix_loss)
        return {"loss": loss, "zero_loss": zero}

    # -- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def figures(self, data, out_dir: Path, device) -> list[Path]:
        images = sample_batch(data, 10, device)
        x = eval_view(images, self.cfg.aug)
        b, _, h, w = x.shape
        p, gh, gw = self.patch_size, h // self.patch_size, w // self.patch_size
        shuffle = random_shuffle(b, gh * gw, torch.Generator(device=device).manual_seed(0), device)
        pred, mask = self.reconstruct(self.fmt(x), shuffle)
        target = patchify(x.float(), p)
        masked = mask.bool().unsqueeze(-1)
        rows_pred = [("reconstruction", pred)]
        if self.hp.norm_pix_loss:
            rows_pred = [("reconstruction\n(visible stats)", denormalize_with_visible(pred, target, mask)),
                         ("masked patches'\nown stats", denormalize_with_own(pred, target))]
        mean = torch.tensor(self.cfg.aug.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.aug.std, device=device).view(1, 3, 1, 1)
        show = lambda t: t * std + mean  # noqa: E731 - back to [0, 1] RGB
        grey = unpatchify(masked.expand_as(target).float(), p, gh, gw)
        rows = [show(x), torch.lerp(show(x), torch.full_like(x, 0.5), grey)]
        titles = ["original", f"masked\n({self.hp.mask_ratio:.0%})"]
        for title, pixels in rows_pred:
            rows.append(show(unpatchify(torch.where(masked, pixels, target), p, gh, gw)))
            titles.append(title)
        path = image_grid(rows, Path(out_dir) / "mae.png", row_titles=titles,
                          title="MAE: masked patches predicted from the visible ones (visible patches pasted back)")
        return [path]


def denormalize_with_visible(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                             eps: float = 1e-6) -> torch.Tensor:
    """Normalised-pixel predictions back to pixels with what a viewer of the masked image knows: each
    image's mean over its visible patches of the per-patch mean and (unbiased) variance."""
    vis = (1 - mask).unsqueeze(-1)
    n_vis = vis.sum(1, keepdim=True)
    mu = (target.mean(-1, keepdim=True) * vis).sum(1, keepdim=True) / n_vis
    var = (target.var(-1, keepdim=True) * vis).sum(1, keepdim=True) / n_vis
    return pred * (var + eps).sqrt() + mu


def denormalize_with_own(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised-pixel predictions back to pixels with each true patch's own mean and variance (the
    shape predicted within a patch, its brightness and contrast taken from the hidden patch)."""
    return pred * (target.var(-1, keepdim=True) + eps).sqrt() + target.mean(-1, keepdim=True)


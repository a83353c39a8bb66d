"""Relative patch location: where is this patch relative to that one? (Doersch, Gupta & Efros,
"Unsupervised Visual Representation Learning by Context Prediction", ICCV 2015, arXiv:1505.05192).

Algorithm (Sec. 3 of the paper)::

    x = augment(images)                            # light random crop + flip
    p = crop_patches(x)                            # 3x3 grid of cells, one jittered patch per cell, with gaps
    pairs (centre p_4, neighbour p_k), y = index of k among the 8 neighbours (0..7, raster order)
    p = color_drop(p)                              # per patch: keep 1 random channel, the other 2 -> noise
    f = fc6(backbone(resize(p)))                   # shared weights for both patches of a pair
    loss = cross_entropy(head(concat(f_centre, f_neighbour)), y)     # late fusion, 8-way

Labels: ``y`` numbers the neighbours in raster order, skipping the centre, so neighbour ``y`` sits at grid
cell ``NEIGHBOUR_CELLS[y]`` = (row, col) ``NEIGHBOUR_OFFSETS[y]`` + (1, 1)::

    0 1 2
    3 . 4
    5 6 7

Shortcuts the paper closes, and how they are scaled here:

* edge continuation: the paper leaves a gap of 48 px between 96 px patches and jitters each patch by up
  to 7 px. Here a cell is ``image_size // 3`` px, a patch ``patch_frac = 0.7`` of a cell, and each patch
  shifts inside its cell by up to ``jitter = 0.5`` of the slack: at 32 px, 7 px patches in 10 px cells,
  2 to 4 px apart; at 96 px, 22 px patches 4 to 16 px apart.
* chromatic aberration (lenses shift colour channels towards the image border, which tells where a patch
  lies): "color dropping", the paper's remedy: each patch keeps one of its 3 channels, drawn at random,
  and the other two become Gaussian noise with 1/100 the std of the kept one (in normalised space, i.e.
  around the dataset mean). ``color_drop = "gray"`` projects the patch to gray instead (the paper's other
  remedy, projection towards gray). The paper drops colour on every patch; ``color_drop_p = 0.5`` keeps
  full colour on half the patches, because 32 px images hardly carry chromatic aberration and the
  downstream evaluation feeds colour images to the backbone.

The paper uses patches of 96 px from ImageNet images of 150k-450k pixels, an AlexNet-style tower per
patch and 4096-d fc layers, one random pair per image. For 32-96 px images the patches are resized
(bilinear) to ``image_size // 2`` (7 px -> 16 px at 32 px), the head is ``MLP(2*F, 1024, 8)``, and by
default all 8 pairs of every image are used (``all_neighbours``): 8 labelled pairs for 9 patches through
the backbone, as RotNet uses all 4 rotations of every image. The preset has the paper's per-patch fc6
(``patch_fc_dim = 512``) reading, as the paper's reads pool5, the last feature map pooled to 2x2
(``patch_fc_grid = 2``); the preset says what it changed on CIFAR-10.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.views import augment, grayscale, normalize, to_float
from ..figures import image_grid, sample_batch
from ..heads import MLP
from .base import Method
from .jigsaw import TILES, _randint, assemble, crop_tiles, tile_positions, tower, tower_fc6

CENTRE = 4
NEIGHBOUR_CELLS = (0, 1, 2, 3, 5, 6, 7, 8)  # label y -> grid cell (raster order)
NEIGHBOUR_OFFSETS = tuple((c // 3 - 1, c % 3 - 1) for c in NEIGHBOUR_CELLS)  # label y -> (d_row, d_col)
NEIGHBOUR_NAMES = ("TL", "T", "TR", "L", "R", "BL", "B", "BR")
COLOR_DROPS = ("drop", "gray", "none")


def make_pairs(x: torch.Tensor, patch_frac: float, jitter: float, all_neighbours: bool,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patches and pairs of a batch ``x`` ``(B, C, S, S)``: ``patches`` ``(P, C, t, t)``, and per pair the
    index of its centre and neighbour patch in ``patches`` and its label (the neighbour's place).
    ``all_neighbours``: the 9 patches of every image (image-major), 8 pairs per image, labels 0..7 in
    turn; else 2 patches per image (centres, then neighbours) and one pair with a random label.
    Random draws, in order: patch positions, then (one neighbour only) labels."""
    b, dev = x.shape[0], x.device
    pos, tile = tile_positions(b, x.shape[-1], patch_frac, jitter, generator, dev)
    cells = torch.tensor(NEIGHBOUR_CELLS, device=dev)
    ar = torch.arange(b, device=dev)
    if all_neighbours:
        patches = crop_tiles(x, pos, tile).flatten(0, 1)  # (9B, ...)
        centre = (TILES * ar + CENTRE).repeat_interleave(len(cells))
        neighbour = (TILES * ar[:, None] + cells).flatten()
        y = torch.arange(len(cells), device=dev).repeat(b)
        return patches, centre, neighbour, y
    y = _randint(len(cells), (b,), generator, dev)
    chosen = torch.stack([torch.full_like(y, CENTRE), cells[y]], dim=1)  # (B, 2): centre cell, neighbour cell
    patches = crop_tiles(x, pos[ar[:, None], chosen], tile)  # (B, 2, ...)
    return patches.transpose(0, 1).flatten(0, 1), ar, b + ar, y


def drop_colors(x: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Doersch et al.'s color dropping on normalised patches ``x`` ``(N, 3, H, W)``: where ``mask`` is set,
    channel ``keep[i]`` stays and the two others become ``noise`` (standard normal, like ``x``) scaled to
    1/100 of the kept channel's std in that patch."""
    ch = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    kept_here = ch == keep.view(-1, 1, 1, 1)
    kept = (x * kept_here).sum(1, keepdim=True)
    scale = kept.std(dim=(2, 3), keepdim=True, unbiased=False) / 100
    return torch.where(kept_here | ~mask.view(-1, 1, 1, 1), x, noise * scale)


class RelativeLocation(Method):
    name = "relative_location"
    family = "context-based"
    summary = "Context prediction (Doersch et al. 2015): 8-way position of a neighbouring patch w.r.t. the centre"
    views_per_image = TILES

    @dataclass
    class Params:
        patch_frac: float = 0.7  # patch side / cell side (cell = image_size // 3); paper 96/144
        jitter: float = 0.5  # share of the slack (cell - patch) used for random shifts; 0: centred patches
        color_drop: str = "drop"  # "drop": keep 1 random channel, 2 -> noise (paper); "gray"; "none"
        color_drop_p: float = 0.5  # probability per patch (the paper: every patch)
        all_neighbours: bool = True  # all 8 pairs of each image; False: one random pair (paper)
        patch_size: int = 0  # side the patches are resized to for the backbone; 0: image_size // 2
        head_hidden_dim: int = 1024  # late fusion MLP(2*F, hidden, 8); paper fc7 4096
        patch_fc_dim: int = 0  # F: a per-patch layer Linear(D, F) + BN + ReLU before the fusion (the
        #                        paper's fc6, in each tower); 0: none, F = D
        patch_fc_grid: int = 0  # fc6's input: 0, the pooled features (D); g, the last feature map pooled
        #                         to g x g (g*g*D; the paper's fc6 reads AlexNet's pool5 map)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if hp.color_drop not in COLOR_DROPS:
            raise ConfigError(f"params.color_drop must be one of {', '.join(COLOR_DROPS)}, got '{hp.color_drop}'")
        if not 0 < hp.patch_frac <= 1 or not 0 <= hp.jitter <= 1 or not 0 <= hp.color_drop_p <= 1:
            raise ConfigError("params.patch_frac must be in (0, 1], params.jitter and params.color_drop_p in [0, 1]")
        if cfg.data.image_size < 3:
            raise ConfigError("relative_location needs images of at least 3 px")
        self.patch_size = hp.patch_size or max(1, cfg.data.image_size // 2)
        self.patch_fc = tower_fc6(self.backbone, hp.patch_fc_dim, hp.patch_fc_grid, "patch")
        self.head = MLP(2 * (hp.patch_fc_dim or self.backbone.out_dim), hp.head_hidden_dim, len(NEIGHBOUR_CELLS))

    def network_input(self, patches: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Patches ``(P, 3, t, t)`` in [0, 1] -> colour dropping (skipped without a generator),
        normalisation and resizing for the backbone."""
        hp, aug = self.hp, self.cfg.aug
        n, dev = patches.shape[0], patches.device
        on = generator is not None and hp.color_drop != "none" and hp.color_drop_p > 0
        if on:
            mask = torch.rand((n,), generator=generator, device=generator.device).to(dev) < hp.color_drop_p
        if on and hp.color_drop == "gray":
            patches = grayscale(patches, mask, out=torch.empty_like(patches))
        x = normalize(patches, aug.mean, aug.std)
        if on and hp.color_drop == "drop":
            keep = _randint(3, (n,), generator, dev)
            noise = torch.randn(x.shape, generator=generator, device=generator.device).to(dev)
            x = drop_colors(x, keep, mask, noise)
        if x.shape[-1] != self.patch_size:
            x = F.interpolate(x, size=(self.patch_size, self.patch_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.patch_size)
        return self.fmt(x)

    def prepare(self, images, generator):
        x = augment(images, dataclasses.replace(self.cfg.aug, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), generator)
        patches, centre, neighbour, y = make_pairs(x, self.hp.patch_frac, self.hp.jitter, self.hp.all_neighbours,
                                                   generator)
        return self.network_input(patches, generator), centre, neighbour, y

    def logits(self, x, centre, neighbour):
        f = tower(self.backbone, self.patch_fc, self.hp.patch_fc_grid, x)  # every patch once, shared weights
        return self.head(torch.cat([f[centre], f[neighbour]], dim=1)).float()  # late fusion

    def training_step(self, batch):
        x, centre, neighbour, y = batch
        logits = self.logits(x, centre, neighbour)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "pretext_acc": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        """``relative_location.png``: test images, the centre patch with its neighbour at the true place,
        and the neighbour where the model puts it (patches in full colour)."""
        n = min(8, len(data.images))
        x = to_float(sample_batch(data, n, device))
        size = self.cfg.data.image_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        patches, centre, neighbour, y = make_pairs(x, self.hp.patch_frac, self.hp.jitter, False,
                                                   torch.Generator().manual_seed(0))
        pred = self.logits(self.network_input(patches, None), centre, neighbour).argmax(1)
        cells = torch.tensor(NEIGHBOUR_CELLS, device=x.device)
        ar = torch.arange(n, device=x.device)

        def board(label):
            tiles = torch.full((n, TILES, *patches.shape[1:]), 0.5, device=x.device)
            tiles[:, CENTRE] = patches[centre]
            tiles[ar, cells[label]] = patches[neighbour]
            return assemble(tiles, gap=max(1, patches.shape[-1] // 6), fill=1.0)

        cols = [f"true {NEIGHBOUR_NAMES[a]}, pred {NEIGHBOUR_NAMES[b]}" for a, b in zip(y.tolist(), pred.tolist())]
        acc = float((pred == y).float().mean())
        path = image_grid([x, board(y), board(pred)], out_dir / "relative_location.png",
                          row_titles=["image", "true place", "predicted"], col_titles=cols,
                          title=f"relative location: {acc:.0%} of the neighbours placed right", scale=1.2)
        return [path]

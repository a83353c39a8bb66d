"""Jigsaw puzzles: recover the permutation of 9 shuffled tiles (Noroozi & Favaro, "Unsupervised Learning
of Visual Representations by Solving Jigsaw Puzzles", ECCV 2016, arXiv:1603.09246).

Algorithm (Sec. 3 of the paper; one puzzle per image)::

    P = permutation_set(N)                # N permutations of 9 tiles, greedy maximal Hamming distance
    x = augment(images)                   # light random crop + flip, in [0, 1]
    tiles = crop_tiles(x)                 # 3x3 grid of cells; a random tile inside each cell (gap + jitter)
    y ~ U{0..N-1};  t_j = tiles[P[y][j]]  # puzzle position j shows tile P[y][j]; pseudo label y
    t = gray(t, p=0.3 per tile); t = (t - mean(t)) / std(t)   # per tile, per channel
    f = fc6(backbone(resize(t)))          # siamese: the shared tower runs on all 9B tiles at once
                                          # (fc6 on the pooled features, or on the last map: tile_fc_grid)
    loss = cross_entropy(head(concat(f_0 .. f_8)), y)          # MLP on the 9*F concatenated features

The pseudo label ``y`` indexes ``P``; the tile at puzzle position ``j`` belongs at grid cell ``P[y][j]``
(cells in raster order), so :func:`assemble` with ``order = P[y]`` puts the puzzle back together.

Permutation set. The paper (Alg. 1) adds, one at a time, the permutation with the largest *average*
Hamming distance to those already chosen, starting from a random one. Taken literally that criterion
leaves near-duplicates (minimum pairwise distance 2 for N = 10, 100 or 1000, no better than a random
choice), so :func:`permutation_set` picks greedily the permutation with the largest *minimum* distance
to the chosen ones (farthest-point selection), ties broken by the paper's average distance. It gives a
minimum distance of 8 for N = 10, 6 for N = 100 and 5 for N = 1000 (random choice: 6, 3, 2). The set
is computed in code from a fixed seed (no shipped file) and cached.

Shortcuts the paper closes, and how they are scaled here:

* edge continuity and texture across tile borders: tiles of 64 px cropped at random inside 75 px cells
  (a gap of 11 px on average, the crop position is the jitter). Here a cell is ``image_size // 3`` px and a
  tile ``tile_frac = 0.85`` (64/75) of it: 8 px tiles in 10 px cells at 32 px, 27 in 32 at 96 px.
* low-level statistics: every tile is standardised by its own per-channel mean and std (the reference
  code's ``norm_tile``); std is floored at 0.02 so flat tiles are not blown up to noise.
* chromatic aberration: grayscale tiles; the reference code greys out 30% of the images, here each tile
  independently with ``gray_p = 0.3``.

The paper uses 225 px crops of ImageNet, 64 px tiles and AlexNet with 4096-d fc7 and N = 1000 (N = 100
in the ablations with similar results). For 32-96 px images the tiles are resized (bilinear) to
``image_size // 2`` so the backbone sees a map larger than a few pixels (an 8 px tile becomes 16 px at
32 px), the head is ``MLP(9*F, 1024, N)`` and N defaults to 100. fc6 (``tile_fc_dim``, 512 in the
preset) reads, as the paper's reads pool5, the last feature map pooled to ``tile_fc_grid`` x
``tile_fc_grid`` (2 in the preset: a 16 px tile's 2x2 map on the convnet) instead of the pooled features
(``tile_fc_grid = 0``); the preset says what it changed on CIFAR-10.

``params.grid = 2`` (not in the paper) makes it a 2x2 puzzle: four tiles of 0.85 of a half-image cell (13 px
in 16 px cells at 32 px, against 8 px in 10 px), labels over N <= 4! = 24 permutations. In a 5-minute
CIFAR-10 run (convnet, fp32 machine; benchmarks/results/context_fc6_5m_fp32.md) with all 24: kNN 0.414 /
linear 0.498, against 0.401-0.427 / 0.474-0.478 for three seeds of the 3x3 preset.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.views import augment, grayscale, normalize, to_float
from ..figures import image_grid, sample_batch
from ..heads import MLP, MapFC
from .base import Method

GRID = 3  # the paper's 3x3 puzzle (params.grid)
TILES = GRID * GRID
MAX_PERMUTATIONS = 1000
STD_FLOOR = 0.02  # per-tile standardisation: std floor (about 5 grey levels of 255)


# --------------------------------------------------------------------------------------------------
# the permutation set


@functools.lru_cache(maxsize=8)
def _permutation_set(n: int, seed: int, tiles: int = TILES) -> np.ndarray:
    flat = itertools.chain.from_iterable(itertools.permutations(range(tiles)))
    perms = np.fromiter(flat, dtype=np.int8, count=tiles * math.factorial(tiles)).reshape(-1, tiles)  # lexicographic
    # hamming(p, q) = 9 - matches; matches with p = sum_k [q_k == p_k], from 81 precomputed masks
    same = np.ascontiguousarray(perms.T[:, None, :] == np.arange(tiles, dtype=np.int8)[None, :, None]).view(np.int8)

    def distances(p: np.ndarray) -> np.ndarray:
        matches = same[0, p[0]].copy()
        for k in range(1, tiles):
            matches += same[k, p[k]]
        return tiles - matches.astype(np.int32)

    j = int(np.random.default_rng(seed).integers(len(perms)))  # the paper starts from a random permutation
    chosen = [j]
    d_min = distances(perms[j])  # distance of every candidate to the chosen set
    d_sum = d_min.copy()  # summed distance to the chosen ones (the paper's criterion), for ties
    for _ in range(n - 1):
        score = d_min * 16384 + d_sum  # lexicographic (min, sum); d_sum < 9 * 1000 < 16384
        score[chosen] = -1
        j = int(score.argmax())
        chosen.append(j)
        d = distances(perms[j])
        np.minimum(d_min, d, out=d_min)
        d_sum += d
    out = perms[chosen].astype(np.int64)
    out.setflags(write=False)
    return out


def permutation_set(n: int, seed: int = 0, tiles: int = TILES) -> torch.Tensor:
    """``n`` permutations of the 9 tiles (or ``tiles``), ``(n, tiles)`` long, chosen greedily by maximal
    minimum Hamming distance to those already chosen (ties: maximal summed distance, the paper's Alg. 1),
    starting from a permutation drawn with ``seed``. Deterministic and cached; the first ``k`` of a set
    are the set of size ``k``."""
    most = min(MAX_PERMUTATIONS, math.factorial(tiles))
    if not 2 <= n <= most:
        raise ConfigError(f"params.num_permutations must be in [2, {most}] for {tiles} tiles, got {n}")
    return torch.from_numpy(_permutation_set(n, seed, tiles).copy())


def hamming_distances(perms: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances ``(n, n)`` of the rows of ``perms``."""
    return (perms[:, None, :] != perms[None, :, :]).sum(-1)


# --------------------------------------------------------------------------------------------------
# tiles


def _randint(high: int, shape, generator: torch.Generator, device) -> torch.Tensor:
    """Integers in [0, high) drawn on the generator's device, then moved to ``device``."""
    return torch.randint(high, shape, generator=generator, device=generator.device).to(device)


def tile_geometry(size: int, tile_frac: float, grid: int = GRID) -> tuple[int, int, int]:
    """``(origin, cell, tile)`` in pixels: the 3x3 (``grid`` x ``grid``) grid of ``cell`` px cells is
    centred in the image (starting at ``origin``) and a tile is ``tile_frac`` of a cell."""
    cell = size // grid
    tile = max(1, min(cell, int(cell * tile_frac)))
    return (size - grid * cell) // 2, cell, tile


def tile_positions(b: int, size: int, tile_frac: float, jitter: float, generator: torch.Generator,
                   device, grid: int = GRID) -> tuple[torch.Tensor, int]:
    """Top-left corners ``(B, grid**2, 2)`` (row, col; cells in raster order) of one tile per cell, and the
    tile side. Inside its cell a tile starts at an offset drawn uniformly from ``[lo, slack - lo]``
    with ``slack = cell - tile`` and ``lo = round(slack * (1 - jitter) / 2)``: ``jitter = 1`` is a random
    crop anywhere in the cell, ``jitter = 0`` a centred tile; the gap between neighbouring tiles is
    ``slack`` on average."""
    origin, cell, tile = tile_geometry(size, tile_frac, grid)
    slack = cell - tile
    lo = int(round(slack * (1 - jitter) / 2))
    offset = lo + _randint(slack - 2 * lo + 1, (b, grid * grid, 2), generator, device)
    k = torch.arange(grid * grid, device=device)
    corner = origin + cell * torch.stack([k // grid, k % grid], dim=1)  # (9, 2)
    return corner + offset, tile


def crop_tiles(x: torch.Tensor, pos: torch.Tensor, tile: int) -> torch.Tensor:
    """Integer-pixel crops ``(B, K, C, tile, tile)`` of ``x`` ``(B, C, H, W)`` at top-left ``pos`` ``(B, K, 2)``
    (one gather for the whole batch, no resampling)."""
    ar = torch.arange(tile, device=x.device)
    rows = (pos[..., 0, None] + ar)[..., :, None]  # (B, K, t, 1)
    cols = (pos[..., 1, None] + ar)[..., None, :]  # (B, K, 1, t)
    bi = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1)
    return x[bi, :, rows, cols].permute(0, 1, 4, 2, 3)  # advanced indices first: (B, K, t, t, C)


def make_puzzles(x: torch.Tensor, perms: torch.Tensor, tile_frac: float, jitter: float, gray_p: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzles of a batch of images ``x`` ``(B, 3, S, S)`` in [0, 1]: the shuffled tiles ``(B, 9, 3, t, t)``
    (position ``j`` holds the tile of cell ``perms[y][j]``, greyed with probability ``gray_p`` per tile)
    and the pseudo labels ``y`` ``(B,)``. ``perms`` ``(N, K)`` of K = 4, 9, 16, ... tiles sets the grid.
    Random draws, in order: tile positions, labels, grey masks."""
    b, dev, k = x.shape[0], x.device, perms.shape[1]
    pos, tile = tile_positions(b, x.shape[-1], tile_frac, jitter, generator, dev, _grid_of(k))
    tiles = crop_tiles(x, pos, tile)
    y = _randint(len(perms), (b,), generator, dev)
    order = perms.to(dev)[y]  # (B, 9)
    tiles = tiles[torch.arange(b, device=dev)[:, None], order]
    if gray_p > 0:
        gray = torch.rand((b, k), generator=generator, device=generator.device).to(dev) < gray_p
        flat = tiles.flatten(0, 1)
        tiles = grayscale(flat, gray.flatten(), out=torch.empty_like(flat)).view_as(tiles)
    return tiles, y


def assemble(tiles: torch.Tensor, order: torch.Tensor | None = None, gap: int = 0,
             fill: float = 1.0) -> torch.Tensor:
    """Lay the tiles ``(B, 9, C, t, t)`` out on the 3x3 grid (K = g*g tiles: g x g): tile ``j`` goes to cell ``order[:, j]``
    (default: cell ``j``), with ``gap`` px of ``fill`` between tiles. ``assemble(puzzle, P[y])`` undoes
    the shuffle of :func:`make_puzzles`."""
    b, k, c, t, _ = tiles.shape
    if order is not None:
        inverse = torch.argsort(order.to(tiles.device), dim=1)  # cell -> the puzzle position holding its tile
        tiles = tiles[torch.arange(b, device=tiles.device)[:, None], inverse]
    if gap:
        tiles = F.pad(tiles.flatten(0, 1), (0, gap, 0, gap), value=fill).view(b, k, c, t + gap, t + gap)
    s, g = tiles.shape[-1], _grid_of(k)
    grid = tiles.view(b, g, g, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * s, g * s)
    return grid[..., :g * s - gap, :g * s - gap]


def _grid_of(k: int) -> int:
    """The side of a square puzzle of ``k`` tiles."""
    g = math.isqrt(k)
    if g * g != k:
        raise ValueError(f"{k} tiles are not a square grid")
    return g


def standardize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile ``(..., C, H, W)``, each channel, to zero mean and unit std (std floored at STD_FLOOR)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True, unbiased=False).clamp_min(STD_FLOOR)
    return (tiles - mean) / std


def tower_fc6(backbone: nn.Module, dim: int, grid: int, name: str) -> nn.Module:
    """The per-tile (per-patch) fc6 of a context tower: :class:`MapFC` of ``dim`` units on the last map
    pooled to ``grid`` x ``grid`` (``grid > 0``) or on the pooled features; ``nn.Identity`` when ``dim`` is
    0. ``name``: the params' prefix, for the error message."""
    if grid < 0 or (grid and not dim):
        raise ConfigError(f"params.{name}_fc_grid must be >= 0 and needs params.{name}_fc_dim > 0")
    if not dim:
        return nn.Identity()
    return MapFC(backbone.stage_dims[-1] if grid else backbone.out_dim, grid, dim)


def tower(backbone: nn.Module, fc6: nn.Module, grid: int, x: torch.Tensor) -> torch.Tensor:
    """Every tile through the shared tower up to fc6: on the last feature map (``grid > 0``) or on the
    pooled features."""
    return fc6(backbone.forward_stages(x)[-1] if grid else backbone(x))


# --------------------------------------------------------------------------------------------------
# the method


class Jigsaw(Method):
    name = "jigsaw"
    family = "context-based"
    summary = "Jigsaw (Noroozi & Favaro 2016): which of N permutations shuffled the 3x3 tiles of an image"
    views_per_image = TILES

    @dataclass
    class Params:
        num_permutations: int = 100  # N, the classes; paper 1000 (100 in its ablations), at most 1000
        tile_frac: float = 0.85  # tile side / cell side (cell = image_size // 3); paper 64/75
        jitter: float = 1.0  # 1: tile cropped anywhere in its cell (paper); 0: centred
        gray_p: float = 0.3  # probability that a tile is greyed (chromatic aberration shortcut)
        tile_norm: bool = True  # standardise each tile per channel (paper); else the dataset's mean/std
        tile_size: int = 0  # side the tiles are resized to for the backbone; 0: image_size // 2
        head_hidden_dim: int = 1024  # MLP(9*F, hidden, N) on the concatenated features; paper fc7 4096
        tile_fc_dim: int = 0  # F: a per-tile layer Linear(D, F) + BN + ReLU before the concatenation
        #                       (the paper's fc6, 512 units); 0: none, F = D
        tile_fc_grid: int = 0  # fc6's input: 0, the pooled features (D); g, the last feature map pooled
        #                        to g x g (g*g*D; the paper's fc6 reads pool5, 2x2 for a 64 px tile)
        perm_seed: int = 0  # seed of the first permutation of the set (the rest is greedy)
        grid: int = 3  # the puzzle's side in tiles: 3 (paper), 2: four tiles of 0.85 * S/2 px, N <= 24

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        if not 0 < hp.tile_frac <= 1 or not 0 <= hp.jitter <= 1 or not 0 <= hp.gray_p <= 1:
            raise ConfigError("params.tile_frac must be in (0, 1], params.jitter and params.gray_p in [0, 1]")
        if hp.grid < 2:
            raise ConfigError(f"params.grid must be at least 2, got {hp.grid}")
        if cfg.data.image_size < hp.grid:
            raise ConfigError(f"jigsaw needs images of at least {hp.grid} px")
        self.views_per_image = hp.grid * hp.grid  # encoder inputs per source image
        self.register_buffer("perms", permutation_set(hp.num_permutations, hp.perm_seed, hp.grid * hp.grid),
                             persistent=False)
        self.tile_size = hp.tile_size or max(1, cfg.data.image_size // 2)
        self.tile_fc = tower_fc6(self.backbone, hp.tile_fc_dim, hp.tile_fc_grid, "tile")
        self.head = MLP(self.views_per_image * (hp.tile_fc_dim or self.backbone.out_dim), hp.head_hidden_dim,
                        hp.num_permutations)

    def _aug01(self):
        """The run's augmentation without its normalisation: views in [0, 1]."""
        return dataclasses.replace(self.cfg.aug, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def network_input(self, tiles: torch.Tensor) -> torch.Tensor:
        """Puzzles ``(B, 9, 3, t, t)`` in [0, 1] -> the backbone's batch ``(9B, 3, s, s)``, image-major."""
        x = tiles.flatten(0, 1)
        x = standardize_tiles(x) if self.hp.tile_norm else normalize(x, self.cfg.aug.mean, self.cfg.aug.std)
        if x.shape[-1] != self.tile_size:
            x = F.interpolate(x, size=(self.tile_size, self.tile_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.tile_size)
        return self.fmt(x)

    def tile_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(9B, F)``: the siamese tower (shared weights) on every tile, up to fc6."""
        return tower(self.backbone, self.tile_fc, self.hp.tile_fc_grid, x)

    def prepare(self, images, generator):
        x = augment(images, self._aug01(), generator)
        tiles, y = make_puzzles(x, self.perms, self.hp.tile_frac, self.hp.jitter, self.hp.gray_p, generator)
        return self.network_input(tiles), y

    def training_step(self, batch):
        x, y = batch
        f = self.tile_features(x)  # (9B, F): the siamese tower, shared weights
        logits = self.head(f.reshape(-1, self.views_per_image * f.shape[1])).float()  # concat(f_0, ..., f_8) per image
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "pretext_acc": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        """``jigsaw.png``: test images, their puzzle (tiles in the shuffled order) and the puzzle put back
        in the order the model predicts (right when it matches the image's tiles)."""
        n = min(8, len(data.images))
        x = sample_batch(data, n, device)
        x = to_float(x)
        size = self.cfg.data.image_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        tiles, y = make_puzzles(x, self.perms, self.hp.tile_frac, self.hp.jitter, self.hp.gray_p,
                                torch.Generator().manual_seed(0))
        pred = self.head(self.tile_features(self.network_input(tiles)).reshape(n, -1)).float().argmax(1)
        gap = max(1, tiles.shape[-1] // 8)
        rows = [x, assemble(tiles, gap=gap), assemble(tiles, self.perms[pred], gap=gap)]
        cols = [f"perm {int(a)}: {'ok' if a == b else f'pred {int(b)}'}" for a, b in zip(y, pred)]
        acc = float((pred == y).float().mean())
        path = image_grid(rows, out_dir / "jigsaw.png", row_titles=["image", "puzzle", "model's order"],
                          col_titles=cols, title=f"jigsaw, {len(self.perms)} permutations: {acc:.0%} solved",
                          scale=1.2)
        return [path]

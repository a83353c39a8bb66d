"""Context-based pretext tasks: jigsaw puzzles (Noroozi & Favaro 2016) and relative patch location
(Doersch et al. 2015). Pseudo labels are checked against their construction on images whose pixels
encode their own coordinates; tiny runs learn each task above chance, draw their figures, evaluate
with kNN and resume exactly."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import stop_at, assert_backbone_moved
from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.evaluate import evaluate
from selfsup.methods import METHODS
from selfsup.methods.jigsaw import (_permutation_set, assemble, hamming_distances, make_puzzles, permutation_set,
                                    standardize_tiles, tile_geometry)
from selfsup.methods.relative_location import NEIGHBOUR_OFFSETS, drop_colors, make_pairs
from selfsup.train import Trainer, TrainingInterrupted, load_checkpoint
from selfsup.run import read_metrics


def coordinate_image(b: int, size: int) -> torch.Tensor:
    """``(b, 3, size, size)`` float: channel 0 holds the row, channel 1 the column, channel 2 the image index."""
    r = torch.arange(size, dtype=torch.float32)
    x = torch.empty(b, 3, size, size)
    x[:, 0] = r[:, None]
    x[:, 1] = r[None, :]
    x[:, 2] = torch.arange(b, dtype=torch.float32)[:, None, None]
    return x


def corners(patches: torch.Tensor) -> torch.Tensor:
    """Top-left (row, col) of patches cut from a :func:`coordinate_image`, after checking that each is a
    contiguous crop (row and column grow by one per pixel)."""
    t = patches.shape[-1]
    rc = patches[..., :2, 0, 0]
    ar = torch.arange(t, dtype=torch.float32)
    assert torch.equal(patches[..., 0, :, :], rc[..., 0, None, None] + ar[:, None].expand(t, t))
    assert torch.equal(patches[..., 1, :, :], rc[..., 1, None, None] + ar[None, :].expand(t, t))
    return rc.long()


# --------------------------------------------------------------------------------------------------
# jigsaw: permutation set


def test_permutation_set_is_greedy_max_min_hamming_distinct_and_deterministic():
    p = permutation_set(100)
    assert p.shape == (100, 9) and p.dtype == torch.long
    assert all(sorted(row) == list(range(9)) for row in p.tolist())  # each row is a permutation
    assert len({tuple(r) for r in p.tolist()}) == 100  # distinct
    _permutation_set.cache_clear()
    assert torch.equal(permutation_set(100), p)  # recomputed from scratch: the same set
    assert torch.equal(permutation_set(10), p[:10])  # greedy: a smaller set is a prefix
    assert not torch.equal(permutation_set(10, seed=1), p[:10])

    # the greedy rule, checked against all 9! candidates: each new permutation is one of those farthest
    # (in minimum Hamming distance) from the ones chosen before it
    flat = itertools.chain.from_iterable(itertools.permutations(range(9)))
    everything = torch.from_numpy(np.fromiter(flat, dtype=np.int8, count=9 * 362880).reshape(-1, 9))
    small = p[:12].to(torch.int8)
    d_min = torch.full((len(everything),), 9)  # distance of every candidate to the chosen ones
    for i in range(1, len(small)):
        d_min = torch.minimum(d_min, (everything != small[i - 1]).sum(1))  # chosen ones get 0
        assert int((small[i] != small[:i]).sum(-1).min()) == int(d_min.max()), i

    def min_distance(perms):
        d = hamming_distances(perms)
        d.fill_diagonal_(99)
        return int(d.min())

    assert min_distance(p[:10]) == 8  # max-min selection: 10 derangements of each other
    assert min_distance(p) >= 6
    g = torch.Generator().manual_seed(0)
    random_choice = everything[torch.randperm(len(everything), generator=g)[:100]].long()
    assert min_distance(random_choice) < min_distance(p)  # random: typically 2 or 3

    with pytest.raises(ConfigError, match="num_permutations"):
        permutation_set(1001)


def test_hamming_distance_by_hand():
    p = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1, 0]])
    assert hamming_distances(p).tolist() == [[0, 2, 8], [2, 0, 8], [8, 8, 0]]


# --------------------------------------------------------------------------------------------------
# jigsaw: tiles and puzzles


def test_jigsaw_inverse_permutation_reassembles_the_image_exactly():
    perms = permutation_set(10)
    x = torch.rand(6, 3, 17, 17)
    origin, cell, tile = tile_geometry(17, 1.0)
    assert (origin, cell, tile) == (1, 5, 5)
    tiles, y = make_puzzles(x, perms, tile_frac=1.0, jitter=1.0, gray_p=0.0,
                            generator=torch.Generator().manual_seed(0))
    assert tiles.shape == (6, 9, 3, 5, 5) and y.shape == (6,)
    grid = x[..., 1:16, 1:16]
    assert torch.equal(assemble(tiles, perms[y]), grid)
    # the puzzle itself is shuffled: position j shows the tile of cell perms[y][j]
    for b in range(6):
        for j in range(9):
            c = int(perms[y[b], j])
            r0, c0 = 1 + 5 * (c // 3), 1 + 5 * (c % 3)
            assert torch.equal(tiles[b, j], x[b, :, r0:r0 + 5, c0:c0 + 5])
        assert not torch.equal(assemble(tiles[b:b + 1]), grid[b:b + 1])
    # with gaps between tiles, the tiles are where they should be
    spaced = assemble(tiles, perms[y], gap=2, fill=-1.0)
    assert spaced.shape == (6, 3, 19, 19) and torch.equal(spaced[..., 7:12, 14:19], grid[..., 5:10, 10:15])
    assert bool((spaced[..., 5:7, :] == -1).all())


def test_jigsaw_tiles_are_jittered_crops_inside_their_cells_with_a_gap():
    x = coordinate_image(32, 32)
    origin, cell, tile = tile_geometry(32, 0.85)
    assert (origin, cell, tile) == (1, 10, 8)  # 32 px: 8 px tiles in 10 px cells
    perms = permutation_set(10)
    tiles, y = make_puzzles(x, perms, tile_frac=0.85, jitter=1.0, gray_p=0.0,
                            generator=torch.Generator().manual_seed(3))
    rc = corners(tiles)  # (B, 9, 2), puzzle order
    cell_of = perms[y]  # (B, 9)
    expected = origin + cell * torch.stack([cell_of // 3, cell_of % 3], -1)
    offset = rc - expected
    assert bool((offset >= 0).all() and (offset <= cell - tile).all())  # inside the cell
    assert set(offset.flatten().tolist()) == {0, 1, 2}  # random crop positions inside the cell
    assert torch.equal(x[:, 2, 0, 0][:, None].expand(-1, 9), tiles[:, :, 2, 0, 0])  # from its own image

    gray, _ = make_puzzles(torch.rand(64, 3, 16, 16), perms, 0.85, 1.0, gray_p=0.3,
                           generator=torch.Generator().manual_seed(0))
    is_gray = (gray[:, :, 0] == gray[:, :, 1]).flatten(2).all(-1) & (gray[:, :, 1] == gray[:, :, 2]).flatten(2).all(-1)
    assert 0.2 < float(is_gray.float().mean()) < 0.4  # about 30% of the tiles, per tile
    per_image = is_gray.sum(1)
    assert bool(((per_image > 0) & (per_image < 9)).any())  # grey or not per tile, not per image


def test_jigsaw_grid_2_is_a_puzzle_of_four_tiles_from_all_24_permutations():
    """``params.grid = 2``: four tiles of 0.85 of a half-image cell, labels over the 4! = 24 permutations
    (all distinct), and the inverse permutation puts the image back together."""
    p = permutation_set(24, tiles=4)
    assert p.shape == (24, 4) and len({tuple(r) for r in p.tolist()}) == 24
    assert sorted(map(tuple, p.tolist())) == list(itertools.permutations(range(4)))
    assert int((p[:4, None] != p[None, :4]).sum(-1).add(torch.eye(4, dtype=torch.long) * 9).min()) == 4  # derangements
    with pytest.raises(ConfigError, match=r"\[2, 24\]"):
        permutation_set(25, tiles=4)
    origin, cell, tile = tile_geometry(32, 0.85, grid=2)
    assert (origin, cell, tile) == (0, 16, 13)
    x = torch.rand(5, 3, 16, 16)
    tiles, y = make_puzzles(x, p, tile_frac=1.0, jitter=1.0, gray_p=0.0, generator=torch.Generator().manual_seed(0))
    assert tiles.shape == (5, 4, 3, 8, 8)
    assert torch.equal(assemble(tiles, p[y]), x)
    for b in range(5):
        for j in range(4):
            c = int(p[y[b], j])
            assert torch.equal(tiles[b, j], x[b, :, 8 * (c // 2):8 * (c // 2) + 8, 8 * (c % 2):8 * (c % 2) + 8])
    m = METHODS["jigsaw"](build_config("jigsaw", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                                  "params": {"grid": 2, "num_permutations": 24}}))
    assert m.views_per_image == 4 and m.head[0].in_features == 4 * (m.hp.tile_fc_dim or m.backbone.out_dim)
    xb, yb = m.prepare(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert xb.shape == (12, 3, 16, 16) and yb.max() < 24
    assert torch.isfinite(m.training_step((xb, yb))["loss"])
    with pytest.raises(ConfigError, match="grid"):
        METHODS["jigsaw"](build_config("jigsaw", {"data": {"image_size": 32}, "params": {"grid": 1}}))


def test_tile_standardisation_per_tile_and_channel():
    t = torch.rand(5, 9, 3, 4, 4) * torch.tensor([0.2, 1.0, 3.0]).view(3, 1, 1) + 7
    s = standardize_tiles(t)
    assert torch.allclose(s.mean((-2, -1)), torch.zeros(5, 9, 3), atol=1e-4)
    assert torch.allclose(s.std((-2, -1), unbiased=False), torch.ones(5, 9, 3), atol=1e-4)
    flat = standardize_tiles(torch.full((1, 3, 4, 4), 0.5))  # std below the floor: no division by ~0
    assert torch.equal(flat, torch.zeros(1, 3, 4, 4))


def test_jigsaw_prepare_is_the_puzzle_and_training_step_runs(tmp_path):
    """The method's own prepare, with augmentation, grey tiles, normalisation and resizing switched off:
    its 9 backbone inputs per image, put back in the permutation's order, give the image back."""
    cfg = build_config("jigsaw", {
        "model": {"backbone": "convnet"}, "data": {"image_size": 15},
        "aug": {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_p": 0.0, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "params": {"num_permutations": 10, "tile_frac": 1.0, "gray_p": 0.0, "tile_norm": False, "tile_size": 5}})
    m = METHODS["jigsaw"](cfg)
    images = torch.randint(0, 256, (4, 3, 15, 15), dtype=torch.uint8)
    x, y = m.prepare(images, torch.Generator().manual_seed(0))
    assert x.shape == (36, 3, 5, 5) and x.is_contiguous(memory_format=torch.channels_last)
    back = assemble(x.view(4, 9, 3, 5, 5), m.perms[y])
    assert torch.allclose(back, images.float() / 255, atol=1e-5)
    # the default pipeline: 9 tiles per image at image_size // 2, standardised; one logit per permutation
    m = METHODS["jigsaw"](build_config("jigsaw", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                                  "params": {"num_permutations": 10}}))
    x, y = m.prepare(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert x.shape == (36, 3, 16, 16)
    assert torch.allclose(x.mean((-2, -1)), torch.zeros(36, 3), atol=1e-4)
    out = m.training_step((x, y))
    assert torch.isfinite(out["loss"]) and 0 <= float(out["pretext_acc"]) <= 1
    # the paper's per-tile fc6 (params.tile_fc_dim): each tile's features pass it before the concatenation
    m = METHODS["jigsaw"](build_config("jigsaw", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                                  "params": {"num_permutations": 10, "tile_fc_dim": 24,
                                                             "tile_fc_grid": 0}}))
    assert m.head[0].in_features == 9 * 24 and m.tile_fc[0].in_features == m.backbone.out_dim
    out = m.training_step((x, y))
    out["loss"].backward()
    assert m.tile_fc[0].weight.grad.abs().sum() > 0 and m.backbone.stages[0][0].weight.grad.abs().sum() > 0
    # fc6 on the last map pooled to 2x2 (params.tile_fc_grid, the paper's pool5): 16 px tiles -> 2x2x256
    m = METHODS["jigsaw"](build_config("jigsaw", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                                  "params": {"num_permutations": 10, "tile_fc_dim": 24,
                                                             "tile_fc_grid": 2}}))
    assert m.tile_fc[2].in_features == 4 * m.backbone.stage_dims[-1] and m.head[0].in_features == 9 * 24
    m.training_step((x, y))["loss"].backward()
    assert m.tile_fc[2].weight.grad.abs().sum() > 0 and m.backbone.stages[-1][0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="tile_fc_grid"):
        METHODS["jigsaw"](build_config("jigsaw", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                                   "params": {"tile_fc_grid": 2, "tile_fc_dim": 0}}))
    with pytest.raises(ConfigError, match="patch_fc_grid"):
        METHODS["relative_location"](build_config("relative_location", {"data": {"image_size": 32},
                                                                         "params": {"patch_fc_grid": -1}}))


def test_map_fc_reads_the_pooled_grid_in_order_and_sees_positions():
    """MapFC(C, g, F) = ReLU(BN(W vec(avgpool_g(map)))), the grid flattened channel-major (C, g, g);
    with g = 0 it is the same layer on pooled features. Two maps with the same global mean but their
    content in different corners give different outputs with g = 2, equal ones with g = 0."""
    from selfsup.heads import MapFC
    torch.manual_seed(0)
    fc = MapFC(3, 2, 5).eval()
    maps = torch.randn(4, 3, 4, 4)
    pooled = maps.view(4, 3, 2, 2, 2, 2).mean((3, 5))  # (4, 3, 2, 2): 2x2 blocks averaged by hand
    lin, bn = fc[2], fc[3]
    expected = torch.relu((pooled.reshape(4, 12) @ lin.weight.T - bn.running_mean) / (1 + bn.eps) ** 0.5
                          * bn.weight + bn.bias)
    assert torch.allclose(fc(maps), expected, atol=1e-5)
    assert torch.allclose(fc(maps.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    a[..., 0, 0], b[..., 3, 3] = 1.0, 1.0  # the same feature, top-left or bottom-right
    with torch.no_grad():
        fc[2].weight.normal_()
    assert not torch.allclose(fc(a), fc(b))
    flat = MapFC(3, 0, 5).eval()
    with torch.no_grad():
        flat[0].weight.normal_()
    assert flat[0].in_features == 3 and torch.allclose(flat(a.mean((2, 3))), flat(b.mean((2, 3))))


# --------------------------------------------------------------------------------------------------
# relative location


@pytest.mark.parametrize("all_neighbours", [False, True])
def test_relative_location_label_matches_the_neighbours_offset(all_neighbours):
    size, b = 32, 64
    x = coordinate_image(b, size)
    origin, cell, tile = tile_geometry(size, 0.7)
    assert (origin, cell, tile) == (1, 10, 7)
    patches, centre, neighbour, y = make_pairs(x, 0.7, 0.5, all_neighbours, torch.Generator().manual_seed(0))
    rc = corners(patches)
    c, n = rc[centre], rc[neighbour]
    assert bool(((c >= origin + cell) & (c + tile <= origin + 2 * cell)).all())  # the centre patch, centre cell
    assert torch.equal(patches[centre][:, 2], patches[neighbour][:, 2])  # both patches from the same image
    step = torch.round((n - c).float() / cell).long()  # (d_row, d_col) in cells
    assert step.tolist() == [list(NEIGHBOUR_OFFSETS[k]) for k in y.tolist()]
    # the offsets by hand: label 0 top-left, 1 above, 4 right, 6 below, 7 bottom-right
    assert [NEIGHBOUR_OFFSETS[k] for k in (0, 1, 4, 6, 7)] == [(-1, -1), (-1, 0), (0, 1), (1, 0), (1, 1)]
    moved = step != 0  # along a direction of the offset, the patches are apart by a gap of 2..4 px
    gap = (n - c).abs() - tile
    assert bool((gap[moved] >= 2).all() and (gap[moved] <= 4).all())
    assert bool(((n - c).abs()[~moved] <= 1).all())  # and jittered by at most 1 px each in the other
    assert len(set((n - c).flatten().tolist())) > 3  # jitter happens
    if all_neighbours:
        assert len(y) == 8 * b and y.view(b, 8).tolist() == [list(range(8))] * b
        assert len(patches) == 9 * b
    else:
        assert len(y) == b and len(patches) == 2 * b and set(y.tolist()) == set(range(8))


def test_color_dropping_keeps_one_channel_and_replaces_the_others_with_faint_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    keep = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.tensor([True, True, True, True, True, False])
    noise = torch.randn(6, 3, 8, 8, generator=g)
    out = drop_colors(x, keep, mask, noise)
    for i in range(6):
        k = int(keep[i])
        assert torch.equal(out[i, k], x[i, k])
        for c in range(3):
            if c != k and mask[i]:
                assert torch.allclose(out[i, c], noise[i, c] * x[i, k].std(unbiased=False) / 100)
        if not mask[i]:
            assert torch.equal(out[i], x[i])


def test_relative_location_prepare_colour_modes_and_training_step():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for mode in ("drop", "gray", "none"):
        cfg = build_config("relative_location", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                                 "params": {"color_drop": mode, "color_drop_p": 1.0}})
        m = METHODS["relative_location"](cfg)
        x, centre, neighbour, y = m.prepare(images, torch.Generator().manual_seed(0))
        assert x.shape == (36, 3, 16, 16) and centre.shape == neighbour.shape == y.shape == (32,)
        spread = x.flatten(2).std(-1)  # (36, 3) per patch and channel
        if mode == "drop":  # exactly one channel per patch keeps its contrast
            assert ((spread > 0.05).sum(1) == 1).all()
        elif mode == "gray":
            assert torch.allclose(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456, atol=1e-5)
        else:
            assert ((spread > 0.05).sum(1) == 3).all()
        out = m.training_step((x, centre, neighbour, y))
        assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="color_drop"):
        METHODS["relative_location"](build_config("relative_location", {"params": {"color_drop": "purple"}}))
    # the paper's per-patch fc6 (params.patch_fc_dim) in each tower, before the late fusion
    cfg = build_config("relative_location", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                             "params": {"patch_fc_dim": 24, "patch_fc_grid": 0}})
    m = METHODS["relative_location"](cfg)
    assert m.head[0].in_features == 2 * 24 and m.patch_fc[0].in_features == m.backbone.out_dim
    m.training_step(m.prepare(images, torch.Generator().manual_seed(0)))["loss"].backward()
    assert m.patch_fc[0].weight.grad.abs().sum() > 0
    # ... on the last map pooled to 2x2 (params.patch_fc_grid)
    cfg = build_config("relative_location", {"model": {"backbone": "convnet"}, "data": {"image_size": 32},
                                             "params": {"patch_fc_dim": 24, "patch_fc_grid": 2}})
    m = METHODS["relative_location"](cfg)
    assert m.patch_fc[2].in_features == 4 * m.backbone.stage_dims[-1] and m.head[0].in_features == 2 * 24
    m.training_step(m.prepare(images, torch.Generator().manual_seed(0)))["loss"].backward()
    assert m.patch_fc[2].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# tiny runs: learning above chance, figures, kNN evaluation, exact resume


def disc_images(root, n_per_class: int, seed: int, size: int = 16):
    """A bright disc of one of 4 colours (the class) centred near the middle, on a dark random
    background with noise: each tile/patch shows an arc whose orientation says where it lies, even
    after per-tile standardisation."""
    rng = np.random.default_rng(seed)
    colours = [(1, 0.2, 0.2), (0.2, 1, 0.2), (0.2, 0.2, 1), (1, 1, 0.2)]
    yy, xx = np.mgrid[:size, :size] + 0.5
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
            radius = size * rng.uniform(0.28, 0.4)
            img = np.broadcast_to(rng.uniform(0, 0.3, 3), (size, size, 3)).copy()
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = colours[c]
            img = np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    root = tmp_path_factory.mktemp("discs")
    disc_images(root / "data" / "train", 16, seed=0)
    disc_images(root / "data" / "test", 8, seed=1)
    return root / "data", root / "cache"  # train/ and test/ folders; the decode cache


TINY = {
    "jigsaw": {"params": {"num_permutations": 10}},
    "relative_location": {"params": {}},
}


def _cfg(method, train, cache, epochs, **extra):
    overrides = {"model": {"backbone": "convnet"},
                 "data": {"path": str(train), "image_size": 16, "cache_dir": str(cache)},
                 "train": {"epochs": epochs, "batch_size": 16, "log_every": 2, "ckpt_every": 1000, "device": "cpu"},
                 "optim": {"name": "adamw", "lr": 0.02, "weight_decay": 0.0, "warmup_epochs": 0},
                 **TINY[method]}
    for k, v in extra.items():
        overrides.setdefault(k, {}).update(v)
    return build_config(method, overrides)


@pytest.mark.parametrize("method,chance,epochs", [("jigsaw", 1 / 10, 6), ("relative_location", 1 / 8, 8)])
def test_tiny_run_learns_above_chance_draws_figures_and_evaluates(method, chance, epochs, discs, tmp_path):
    """24-32 steps of 16 images: jigsaw (10 permutations) reaches about 0.9, relative location about 0.37."""
    data, cache = discs
    trainer = Trainer(_cfg(method, data / "train", cache, epochs=epochs), tmp_path / method, progress=False)
    trainer.fit()
    rows = read_metrics(tmp_path / method)
    late = [float(r["pretext_acc"]) for r in rows[-4:]]
    first = float(rows[0]["pretext_acc"])
    assert np.mean(late) > 2 * chance, (first, late)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    fig = tmp_path / method / "figures" / f"{method}.png"
    assert fig.exists() and fig.stat().st_size > 5000

    r = evaluate(str(tmp_path / method), "knn", str(data), str(data), progress=False, cache_dir=str(cache), k=10)
    assert json.loads((tmp_path / method / "eval" / "knn.json").read_text())["top1"] == r["top1"]
    assert r["n_train"] == 64 and r["n_test"] == 32 and r["top1"] > 0.25  # 4 classes
    assert_backbone_moved(tmp_path / method)
    assert load_checkpoint(tmp_path / method / "checkpoints" / "last.pt")["backbone_spec"]["image_size"] == 16


@pytest.mark.parametrize("method", ["jigsaw", "relative_location"])
def test_resume_mid_epoch_matches_an_uninterrupted_run(method, discs, tmp_path):
    data, cache = discs
    cfg = _cfg(method, data / "train", cache, epochs=2)
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit()
    interrupted = Trainer(cfg, tmp_path / "resumed", progress=False)
    stop_at(interrupted, 2)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step == 3  # mid-epoch (4 steps per epoch)
    resumed.fit()
    a, b = straight.state()["model"], resumed.state()["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

"""Generation-based pretext tasks: colorization (Zhang et al. 2016) and the context encoder /
inpainting (Pathak et al. 2016): Lab, bins, soft targets, rebalancing, masks, losses, tiny runs,
figures, evaluation of the trained backbones and exact resume."""

import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_backbone_moved
from selfsup.configure import build_config
from selfsup.data.color import lab_to_rgb, rgb_to_lab
from selfsup.data.views import augment
from selfsup.evaluate import evaluate
from selfsup.methods import METHODS
from selfsup.methods.colorization import (ab_bins, decode, hard_encode, rebalance_weights, smoothed_prior,
                                          soft_encode)
from selfsup.methods.inpainting import (apply_mask, center_mask, loss_weights, make_masks, masked_l2,
                                        random_block_mask)
from selfsup.train import Trainer, TrainingInterrupted, build_phase_optimizers, load_checkpoint
from selfsup.run import read_metrics


def _cfg(method, data=None, epochs=2, **extra):
    overrides = {"model": {"backbone": "convnet"}, "data": {"image_size": 16},
                 "train": {"epochs": epochs, "batch_size": 16, "log_every": 2, "ckpt_every": 1000}}
    if data is not None:
        overrides["data"]["path"] = str(data)
    for k, v in extra.items():
        overrides.setdefault(k, {}).update(v)
    return build_config(method, overrides)


def _uint8_batch(data_dir, n=None):
    files = sorted(data_dir.rglob("*.png"))[:n]
    return torch.from_numpy(np.stack([np.array(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 2000
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100


def _interrupted_then_resumed_matches(cfg, tmp_path, stop_after_step):
    """A run stopped (as by SIGTERM) after ``stop_after_step`` steps and resumed ends with exactly the
    weights of an uninterrupted run."""
    ref = Trainer(cfg, tmp_path / "ref", progress=False)
    ref.fit()
    cut = Trainer(cfg, tmp_path / "cut", progress=False)
    after_step = cut.method.after_step

    def stop(step, total):
        after_step(step, total)
        if step + 1 == stop_after_step:
            cut._stop_signal = signal.SIGTERM  # what the SIGTERM handler does

    cut.method.after_step = stop
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == stop_after_step
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, progress=False)
    resumed.fit()
    a, b = ref.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return ref, resumed


# --------------------------------------------------------------------------------------------------
# colorization


def test_lab_round_trip_on_random_images():
    rgb = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lab = rgb_to_lab(rgb)
    assert (lab[:, 0] >= 0).all() and (lab[:, 0] <= 100).all()
    assert (lab_to_rgb(lab) - rgb).abs().max() < 1e-3
    white = rgb_to_lab(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([100.0, 0.0, 0.0]), atol=1e-2)  # D65 white: L=100, a=b=0


def test_ab_bins_are_the_in_gamut_grid_and_encode_decode_exactly():
    bins = ab_bins()
    assert torch.equal(bins, ab_bins())  # deterministic (and cached)
    q = len(bins)
    assert 240 <= q <= 330, q  # the paper has 313
    assert torch.equal(bins, torch.round(bins / 10) * 10) and len(torch.unique(bins, dim=0)) == q
    assert (bins == 0).all(1).any()  # the neutral bin
    # every sRGB colour falls in the cell of an in-gamut bin: its nearest centre is within half a diagonal
    rgb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ab = rgb_to_lab(rgb)[:, 1:]
    nearest = bins[hard_encode(ab, bins)].permute(0, 3, 1, 2)
    assert (ab - nearest).norm(dim=1).max() <= 5 * math.sqrt(2) + 1e-4
    # each centre encodes (hard) to its own bin, and decodes back exactly
    centres = bins.t().reshape(1, 2, q, 1)
    idx = hard_encode(centres, bins).flatten()
    assert torch.equal(idx, torch.arange(q))
    assert torch.equal(bins[idx], bins)
    # annealed-mean decoding: a (numerically) one-hot distribution gives its centre; T=1 is the mean
    logits = torch.full((q, q, 1, 1), -1e4)
    logits[torch.arange(q), torch.arange(q)] = 0
    assert torch.equal(decode(logits, bins, 0.38)[:, :, 0, 0], bins)
    uniform = decode(torch.zeros(1, q, 1, 1), bins, 1.0).flatten()
    assert torch.allclose(uniform, bins.mean(0), atol=1e-4)


def test_soft_encoding_matches_a_hand_computation():
    bins = ab_bins()
    idx, w = soft_encode(torch.tensor([3.0, 2.0]).view(1, 2, 1, 1), bins, k=5, sigma=5.0)
    # by hand: the 5 nearest centres of (3, 2) and their squared distances
    expect = torch.tensor([[0, 0], [10, 0], [0, 10], [10, 10], [0, -10]], dtype=torch.float)
    d2 = torch.tensor([13.0, 53.0, 73.0, 113.0, 153.0])
    assert torch.equal(bins[idx.flatten()], expect)
    gauss = torch.exp(-d2 / (2 * 5.0**2))
    assert torch.allclose(w.flatten(), gauss / gauss.sum(), atol=1e-6)
    # random ab: weights sum to 1, the nearest bin (first) has the largest weight and is the hard code
    ab = (torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(2)) - 0.5) * 160
    idx, w = soft_encode(ab, bins)
    assert idx.shape == w.shape == (2, 5, 8, 8)
    assert torch.allclose(w.sum(1), torch.ones(2, 8, 8), atol=1e-6)
    assert (w[:, :1] >= w).all()
    assert torch.equal(idx[:, 0], hard_encode(ab, bins))


def test_class_rebalancing_weights_follow_eq_4():
    bins = ab_bins()
    q = len(bins)
    counts = torch.zeros(q)
    counts[hard_encode(torch.zeros(1, 2, 1, 1), bins).item()] = 900  # a grey-dominated distribution
    counts[:40] += torch.arange(40, dtype=torch.float)
    p = smoothed_prior(counts, bins, sigma=5.0)
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and (p >= 0).all()
    # smoothing spreads mass to neighbours: the neutral bin keeps most, its 4 neighbours get exp(-2) shares
    grey = int(hard_encode(torch.zeros(1, 2, 1, 1), bins))
    assert p[grey] < counts[grey] / counts.sum()
    for lam in (0.5, 0.2):
        w = rebalance_weights(p, lam)
        assert torch.isclose((p * w).sum(), torch.tensor(1.0), atol=1e-5)  # E_p[w] = 1 (Eq. 4)
        raw = 1 / ((1 - lam) * p + lam / q)
        assert torch.allclose(w / w[0], raw / raw[0], rtol=1e-5)  # proportional to Eq. 4's w
        order = torch.argsort(p)
        assert (w[order][1:] <= w[order][:-1] + 1e-6).all()  # rarer bins weigh more
    assert torch.allclose(rebalance_weights(p, 1.0), torch.ones(q), atol=1e-5)  # lambda=1: no rebalancing


def test_colorization_loss_is_the_rebalanced_soft_cross_entropy():
    cfg = _cfg("colorization")
    m = METHODS["colorization"](cfg)
    assert m.backbone.stages[0][0].in_channels == 1 and m.backbone_spec()["input"] == "lab_l"
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lightness, idx, w = m.prepare(images, torch.Generator().manual_seed(0))
    assert lightness.shape == (4, 1, 16, 16) and idx.shape == (4, 5, 8, 8)  # targets at half resolution
    x = augment(images, m._rgb01, torch.Generator().manual_seed(0))
    assert torch.allclose(lightness, rgb_to_lab(x)[:, :1] / 50 - 1)
    counts = torch.arange(len(m.bins), dtype=torch.float) % 7
    m.set_prior(counts)
    logits = torch.randn(4, len(m.bins), 8, 8, generator=torch.Generator().manual_seed(1))
    m.logits = lambda lightness, size: logits  # a fixed prediction
    out = m.training_step((lightness, idx, w))
    z = torch.zeros_like(logits).scatter_(1, idx, w)  # the dense soft target Z
    v = m.class_weights[idx[:, 0]]
    expect = (v * -(z * F.log_softmax(logits, 1)).sum(1)).mean()
    assert torch.isclose(out["loss"], expect, atol=1e-5)
    assert torch.isclose(out["pretext_acc"], (logits.argmax(1) == idx[:, 0]).float().mean())
    assert int(m.prior_pixels) == int(counts.sum())  # a prior that is set is not replaced by the batch's


def test_colorization_tiny_run_learns_draws_and_evaluates(tiny_dataset, tmp_path):
    cfg = _cfg("colorization", tiny_dataset / "train", epochs=10, optim={"lr": 0.05, "warmup_epochs": 0})
    trainer = Trainer(cfg, tmp_path / "colorization", progress=False)
    m = trainer.method
    m.on_epoch_start(trainer.run_state(), 0)  # the prior, from all 64 training images at 8 x 8 (fit would do it first)
    assert int(m.prior_pixels) == 64 * 8 * 8
    assert torch.isclose((m.prior * m.class_weights).sum(), torch.tensor(1.0), atol=1e-5)
    x = torch.from_numpy(np.array(trainer.data.images)).permute(0, 3, 1, 2)

    def probe():
        m.eval()
        with torch.no_grad():
            batch = m.prepare(x, torch.Generator().manual_seed(123))
            out = m.training_step(batch)
            majority = torch.bincount(batch[1][:, 0].flatten()).max() / batch[1][:, 0].numel()
        m.train()
        return float(out["loss"]), float(out["pretext_acc"]), float(majority)

    loss0, acc0, majority = probe()
    prior = m.prior.clone()
    trainer.fit()
    loss1, acc1, _ = probe()
    assert torch.equal(m.prior, prior)  # estimated once
    assert loss1 < loss0 - 0.6, (loss0, loss1)  # about 5.5 -> 4.3
    assert acc1 > majority > acc0, (acc0, acc1, majority)  # beats always guessing the commonest bin
    rows = read_metrics(tmp_path / "colorization")
    assert {"loss", "pretext_acc", "majority_acc"} <= rows[0].keys()

    _assert_png(tmp_path / "colorization" / "figures" / "colorization.png")
    ckpt = load_checkpoint(tmp_path / "colorization" / "checkpoints" / "last.pt")
    assert ckpt["backbone_spec"]["input"] == "lab_l" and ckpt["backbone_spec"]["in_chans"] == 1
    assert "prior" in ckpt["model"] and "class_weights" in ckpt["model"]
    r = evaluate(str(tmp_path / "colorization"), "knn", str(tiny_dataset), str(tiny_dataset),
                 out=tmp_path / "eval", progress=False)
    assert r["n_train"] == 64 and r["n_test"] == 32 and r["top1"] > 0.25  # 4 classes
    assert r["backbone"]["input"] == "lab_l"
    assert_backbone_moved(tmp_path / "colorization")


def test_colorization_resume_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    cfg = _cfg("colorization", tiny_dataset / "train", epochs=2)
    _, resumed = _interrupted_then_resumed_matches(cfg, tmp_path, stop_after_step=2)  # mid-epoch 1
    assert int(resumed.method.prior_pixels) == 64 * 8 * 8


# --------------------------------------------------------------------------------------------------
# inpainting


def test_center_mask_is_the_central_quarter():
    for size in (16, 32):
        m = center_mask(2, size, size)
        expect = torch.zeros(2, 1, size, size)
        q = size // 4
        expect[..., q:size - q, q:size - q] = 1
        assert torch.equal(m, expect)
        assert m[0].sum() == size * size / 4


def test_random_masks_are_blocks_of_about_a_quarter_and_seeded():
    g = torch.Generator().manual_seed(0)
    m = random_block_mask(512, 32, 32, g)
    cover = m.mean((1, 2, 3))
    assert 0.2 < cover.mean() < 0.3 and (cover > 0.05).all() and (cover < 0.6).all()
    assert torch.equal(m[:4], random_block_mask(4, 32, 32, torch.Generator().manual_seed(0)))
    # a mask with one block is a rectangle: its rows with masked pixels all have the same span
    one = random_block_mask(8, 32, 32, torch.Generator().manual_seed(1), blocks=1)[:, 0]
    for r in one:
        rows = r[r.any(1)]
        assert (rows == rows[0]).all()
    both = make_masks("both", 64, 16, 16, torch.Generator().manual_seed(2))
    is_center = (both == center_mask(1, 16, 16)).flatten(1).all(1)
    assert 10 < int(is_center.sum()) < 54


def test_inpainting_input_is_the_view_with_the_hole_filled(tiny_dataset):
    cfg = _cfg("inpainting", params={"mask": "both"})
    m = METHODS["inpainting"](cfg)
    images = _uint8_batch(tiny_dataset / "train", 8)
    masked, x, mask = m.prepare(images, torch.Generator().manual_seed(5))
    assert torch.equal(x, augment(images, cfg.aug, torch.Generator().manual_seed(5)))
    inside = mask.bool().expand_as(x)
    assert torch.equal(masked[~inside], x[~inside])
    assert (masked[inside] == 0).all() and inside.any()  # 0: the dataset mean after normalisation
    assert torch.equal(apply_mask(x, mask, fill=0.5)[inside], torch.full_like(x[inside], 0.5))


def test_reconstruction_loss_only_sees_the_masked_region():
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    mask = make_masks("both", 3, 16, 16, g)
    loss = masked_l2(pred, x, loss_weights(mask))
    hand = ((pred - x) ** 2 * mask).sum() / (3 * mask.sum())
    assert torch.isclose(loss, hand)
    outside = pred + 5 * torch.randn(3, 3, 16, 16, generator=g) * (1 - mask)
    assert torch.equal(masked_l2(outside, x, loss_weights(mask)), loss)
    inside = pred + (mask * 0.1)
    assert not torch.isclose(masked_l2(inside, x, loss_weights(mask)), loss)
    # the paper's overlap: a band of 1 px around the central hole weighted 10, nothing further out
    w = loss_weights(center_mask(1, 16, 16), overlap_px=1, overlap_weight=10.0)[0, 0]
    assert (w[4:12, 4:12] == 1).all() and w.sum() == 64 + 10 * (100 - 64) and (w[3:13, 3:13] > 0).all()


def test_adversarial_term_needs_two_optimizers_and_zero_weight_builds_none():
    gan = METHODS["inpainting"](_cfg("inpainting"))
    assert gan.phases == ("g", "d") and gan.disc is not None
    opts = build_phase_optimizers(gan, gan.cfg)
    d_params = {id(p) for p in gan.disc.parameters()}
    assert {id(p) for g in opts["d"].param_groups for p in g["params"]} == d_params
    assert not d_params & {id(p) for g in opts["g"].param_groups for p in g["params"]}
    assert opts["d"].param_groups[0]["betas"] == (0.5, 0.999)
    plain = METHODS["inpainting"](_cfg("inpainting", params={"adv_weight": 0.0}))
    assert plain.phases == ("g",) and plain.disc is None
    assert list(build_phase_optimizers(plain, plain.cfg)) == ["g"]
    batch = plain.prepare(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.Generator().manual_seed(0))
    out = plain.training_step(batch)
    assert torch.equal(out["loss"], out["rec_loss"])  # L2 only


def test_inpainting_tiny_run_learns_draws_and_evaluates(tiny_dataset, tmp_path):
    cfg = _cfg("inpainting", tiny_dataset / "train", epochs=8, optim={"lr": 0.02, "warmup_epochs": 0},
               params={"mask": "both"})
    Trainer(cfg, tmp_path / "inpainting", progress=False).fit()
    rows = read_metrics(tmp_path / "inpainting")
    assert {"loss_g", "loss_d", "rec_loss", "adv_loss", "d_acc", "fill_loss"} <= rows[0].keys()
    rec = [float(r["rec_loss"]) for r in rows]
    fill = np.mean([float(r["fill_loss"]) for r in rows[-2:]])
    assert np.mean(rec[-2:]) < 0.65 * rec[0] and np.mean(rec[-2:]) < 0.7 * fill, (rec, fill)
    assert all(math.isfinite(float(r["loss_d"])) for r in rows)
    _assert_png(tmp_path / "inpainting" / "figures" / "inpainting.png")
    r = evaluate(str(tmp_path / "inpainting"), "knn", str(tiny_dataset), str(tiny_dataset),
                 out=tmp_path / "eval", progress=False)
    assert r["n_train"] == 64 and r["top1"] > 0.25 and r["backbone"]["input"] == "rgb"
    assert_backbone_moved(tmp_path / "inpainting")


def test_inpainting_resume_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    cfg = _cfg("inpainting", tiny_dataset / "train", epochs=2, params={"mask": "random"})
    ref, _ = _interrupted_then_resumed_matches(cfg, tmp_path, stop_after_step=5)  # mid-epoch 2, both optimizers
    assert set(load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["optimizers"]) == {"g", "d"}

"""MAE (He et al. 2022): patchify/unpatchify, random masking, the masked normalised-pixel loss, the
encoder seeing only the visible patches, a tiny run that learns to reconstruct, figures, kNN
evaluation of the ViT encoder, exact resume. Tiny runs use ``vit_micro`` (a test-size ViT)."""

import signal

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_backbone_moved
from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.data.views import eval_view
from selfsup.evaluate import evaluate
from selfsup.evaluate.features import extract_features, load_encoder
from selfsup.losses import mae_loss, normalize_patches
from selfsup.methods import METHODS
from selfsup.methods.mae import (denormalize_with_own, denormalize_with_visible, num_visible, patch_mask,
                                 patchify, random_shuffle, sincos_pos_embed, unpatchify)
from selfsup.train import Trainer, TrainingInterrupted, load_checkpoint

SMALL = {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 2}


def _cfg(data=None, epochs=2, backbone="vit_micro", **extra):
    overrides = {"model": {"backbone": backbone}, "data": {"image_size": 16},
                 "train": {"epochs": epochs, "batch_size": 16, "log_every": 2, "ckpt_every": 1000, "device": "cpu"},
                 "params": dict(SMALL)}
    if data is not None:
        overrides["data"]["path"] = str(data)
    for k, v in extra.items():
        overrides.setdefault(k, {}).update(v)
    return build_config("mae", overrides)


# --------------------------------------------------------------------------------------------------
# patches, masks, position embeddings


def test_patchify_round_trip_and_token_order_match_the_vit():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = patchify(x, 4)
    assert t.shape == (2, 16, 48)
    assert torch.equal(unpatchify(t, 4, 4, 4), x)  # exact round trip
    # patch n = (row i, column j) in row-major order, flattened as (row, column, channel)
    i, j = 1, 2
    assert torch.equal(t[:, i * 4 + j], x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(0, 2, 3, 1).reshape(2, 48))
    # non-square too
    y = torch.randn(1, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(y, 4), 4, 2, 3), y)
    # the ViT's tokens come in the same order: conv_proj(x) = patchify(x) @ W (+ b), patch by patch
    vit = METHODS["mae"](_cfg()).backbone
    conv = vit.conv_proj
    w = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (D, p*p*C) in patchify's order
    with torch.no_grad():
        tokens = conv(x).flatten(2).transpose(1, 2)
        assert torch.allclose(tokens, t @ w.t() + conv.bias, atol=1e-5)


def test_mask_keeps_a_quarter_of_the_patches_differs_per_image_and_follows_the_generator():
    shuffle = random_shuffle(8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(shuffle.sort(1).values, torch.arange(16).expand(8, 16))  # a permutation per image
    k = num_visible(16, 0.75)
    assert k == 4 and num_visible(64, 0.75) == 16
    mask = patch_mask(shuffle, k)
    assert mask.shape == (8, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(1) == 12).all()  # exactly 75% masked, 25% visible, in every image
    for b in range(8):
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(shuffle[b, :4].tolist())
    # a different mask per image (1820 ways to keep 4 of 16: 64 images share ~1 pair on average), each
    # patch visible in a quarter of the images
    many = patch_mask(random_shuffle(4096, 16, torch.Generator().manual_seed(1)), k)
    assert len({tuple(m.tolist()) for m in many[:64]}) >= 60
    assert ((1 - many).mean(0) - 0.25).abs().max() < 0.03
    assert torch.equal(shuffle, random_shuffle(8, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(shuffle, random_shuffle(8, 16, torch.Generator().manual_seed(1)))
    # prepare draws views and masks from the step's generator only
    m = METHODS["mae"](_cfg())
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (x1, s1), (x2, s2) = (m.prepare(images, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(x1, x2) and torch.equal(s1, s2)
    x3, s3 = m.prepare(images, torch.Generator().manual_seed(6))
    assert not torch.equal(s1, s3) and not torch.equal(x1, x3)


def test_sincos_position_embedding_by_hand():
    pe = sincos_pos_embed(8, 2, 3)  # dim 8: 4 for the column, 4 for the row; omega = (1, 1/100)
    assert pe.shape == (6, 8)
    row, col = 1, 2
    expect = [np.sin(col), np.sin(col / 100), np.cos(col), np.cos(col / 100),
              np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)]
    assert torch.allclose(pe[row * 3 + col], torch.tensor(expect, dtype=torch.float32), atol=1e-6)
    with pytest.raises(ValueError):
        sincos_pos_embed(6, 2, 2)


# --------------------------------------------------------------------------------------------------
# the loss


def _hand_loss(pred, target, mask, norm_pix):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if mask[b, n] == 0:
                continue
            t = target[b, n].double()
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(float(t.var(unbiased=True)) + 1e-6)
            total += float(((pred[b, n].double() - t) ** 2).mean())
            count += 1
    return total / count


def test_loss_matches_a_hand_computation_and_ignores_visible_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 48, generator=g), torch.randn(3, 16, 48, generator=g) * 2 + 1
    mask = patch_mask(random_shuffle(3, 16, g), 4)
    for norm_pix in (False, True):
        loss = mae_loss(pred, target, mask, norm_pix)
        assert loss.dtype == torch.float32
        assert abs(float(loss) - _hand_loss(pred, target, mask, norm_pix)) < 1e-5
        # changing the predictions of visible patches changes nothing; of a masked patch, it does
        other = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn(3, 16, 48, generator=g) * 10)
        assert float(mae_loss(other, target, mask, norm_pix)) == float(loss)
        b, n = torch.nonzero(mask)[0].tolist()
        moved = pred.clone()
        moved[b, n] += 1
        assert float(mae_loss(moved, target, mask, norm_pix)) > float(loss) + 1e-3
    # the normalised target: zero mean, unit (unbiased) variance per patch; predicting it is a zero loss
    nt = normalize_patches(target)
    assert torch.allclose(nt.mean(-1), torch.zeros(3, 16), atol=1e-5)
    assert torch.allclose(nt.var(-1), torch.ones(3, 16), atol=1e-4)
    assert float(mae_loss(nt, target, mask, True)) < 1e-10
    # bf16 inputs under autocast are computed in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mae_loss(pred.bfloat16(), target, mask, True)
    assert low.dtype == torch.float32


def test_figure_denormalisation_uses_the_visible_patches_statistics():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, 48, generator=g) * 3 + 2
    mask = patch_mask(random_shuffle(2, 16, g), 4)
    pred = torch.randn(2, 16, 48, generator=g)
    vis = mask[0] == 0
    mu = target[0][vis].mean(-1).mean()
    var = target[0][vis].var(-1).mean()
    out = denormalize_with_visible(pred, target, mask)
    assert torch.allclose(out[0], pred[0] * (var + 1e-6).sqrt() + mu, atol=1e-5)
    assert torch.allclose(denormalize_with_own(normalize_patches(target), target), target, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# the model


def test_mae_refuses_non_vit_backbones():
    with pytest.raises(ConfigError, match="Vision Transformer"):
        METHODS["mae"](_cfg(backbone="convnet"))


def test_encoder_sees_only_the_visible_patches():
    m = METHODS["mae"](_cfg()).eval()
    seen = []
    hook = m.backbone.encoder.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x, shuffle = m.prepare(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m.training_step((x, shuffle))
        pred, mask = m.reconstruct(x, shuffle)
    hook.remove()
    assert seen[0] == (4, 1 + 4, 64)  # class token + 4 of 16 patches
    assert pred.shape == (4, 16, 48) and torch.isfinite(out["loss"])
    # the zero predictor's loss with norm_pix is the normalised target's mean square, (P - 1) / P
    assert abs(float(out["zero_loss"]) - 47 / 48) < 1e-4
    # the masked patches' pixels cannot reach the predictions (only through the loss target)
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), 4, 4, 4).bool()
    scrambled = torch.where(pixel_mask, torch.randn_like(x) * 5, x)
    with torch.no_grad():
        pred2, _ = m.reconstruct(scrambled, shuffle)
    assert torch.allclose(pred, pred2, atol=1e-5)
    # while a visible patch's pixels do
    visible = unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, 48), 4, 4, 4).bool()
    with torch.no_grad():
        pred3, _ = m.reconstruct(torch.where(visible, x + 1, x), shuffle)
    assert not torch.allclose(pred, pred3, atol=1e-3)
    # encoder positions are the fixed sin-cos embedding, frozen and out of the optimizer
    pos = m.backbone.encoder.pos_embedding
    assert not pos.requires_grad and torch.equal(pos[0, 1:], sincos_pos_embed(64, 4, 4))
    assert all(p is not pos for g in m.param_groups() for p in g["params"])
    assert all(g["betas"] == (0.9, 0.95) for g in m.param_groups())


# --------------------------------------------------------------------------------------------------
# training, figures, evaluation, resume


def test_tiny_run_learns_to_reconstruct_draws_figures_and_evaluates(tiny_dataset, tmp_path):
    """Pixel targets (norm_pix off, so the sky / ground colours are predictable from the visible
    patches): after 40 steps the loss on a fixed batch of masked views is far below its value at
    initialisation and below the loss of predicting the mean colour (zero) everywhere."""
    cfg = _cfg(tiny_dataset / "train", epochs=10, optim={"lr": 0.05, "warmup_epochs": 1},
               params={"norm_pix_loss": False})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    x = torch.from_numpy(np.array(trainer.data.images)).permute(0, 3, 1, 2)

    def probe():
        with torch.no_grad():
            out = trainer.method.training_step(trainer.method.prepare(x, torch.Generator().manual_seed(123)))
        return float(out["loss"]), float(out["zero_loss"])

    loss0, zero = probe()
    trainer.fit()
    loss1, zero1 = probe()
    assert zero1 == zero
    assert loss1 < 0.6 * loss0 and loss1 < 0.8 * zero, (loss0, loss1, zero)

    fig = tmp_path / "run" / "figures" / "mae.png"
    assert fig.exists() and fig.stat().st_size > 2000
    with Image.open(fig) as im:
        assert im.width > 100 and im.height > 100

    r = evaluate(str(tmp_path / "run"), "knn", str(tiny_dataset), str(tiny_dataset), out=tmp_path / "eval",
                 image_size=16, progress=False, device="cpu")
    assert r["top1"] > 0.25 and r["n_train"] == 64  # 4 classes
    assert_backbone_moved(tmp_path / "run")
    # kNN reads the trained encoder's class token (ViT.forward), not a fresh network
    enc = load_encoder(str(tmp_path / "run"))
    images = np.array(trainer.data.images[:8])
    feats = extract_features(enc, images, device="cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x8 = eval_view(torch.from_numpy(images).permute(0, 3, 1, 2), cfg.aug)
        cls = trainer.method.backbone.eval().forward_tokens(x8)[:, 0].float()
    assert feats.shape == (8, 64) and torch.allclose(feats, cls, atol=1e-2)


def test_resume_is_exact(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset / "train", epochs=2, optim={"warmup_epochs": 0, "lr": 0.01})
    ref = Trainer(cfg, tmp_path / "ref", progress=False)
    ref.fit()
    cut = Trainer(cfg, tmp_path / "cut", progress=False)
    after_step = cut.method.after_step

    def stop(step, total):
        after_step(step, total)
        if step == 4:
            cut._stop_signal = signal.SIGTERM  # what the SIGTERM handler does

    cut.method.after_step = stop
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 5
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, progress=False)
    resumed.fit()
    a, b = ref.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # training moved the weights but not the frozen sin-cos positions
    init = METHODS["mae"](cfg).state_dict()
    assert not torch.equal(a["decoder.mask_token"], init["decoder.mask_token"])
    assert torch.equal(a["backbone.encoder.pos_embedding"], init["backbone.encoder.pos_embedding"])

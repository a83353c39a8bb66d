"""Tests of the batched on-device augmentations (selfsup.data.views)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from selfsup.data.views import (
    AugConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment,
    eval_view,
    gaussian_blur,
    grayscale,
    normalize,
    resized_crop,
    sample_crop_boxes,
    solarize,
    to_float,
    two_views,
)

# every random op on, so one pipeline run exercises all of them
ALL_ON = AugConfig(size=16, blur_p=0.5, solarize_p=0.5)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rand_images(b: int = 8, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=gen(seed))


def uint8_nhwc(b: int = 8, h: int = 20, w: int = 20, seed: int = 0) -> torch.Tensor:
    """uint8 (B, 3, H, W) in channels_last, as a permuted NHWC array would be."""
    nhwc = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=gen(seed))
    return nhwc.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- #
# pipeline
# --------------------------------------------------------------------------- #
def test_augment_output_format_and_normalization():
    images = uint8_nhwc()
    assert images.is_contiguous(memory_format=torch.channels_last)
    cfg = AugConfig(size=16)
    out = augment(images, cfg, gen())
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)

    # normalization is the last op: undoing it gives images in [0, 1]
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    raw = out * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert out.min() < -0.5  # (0 - mean) / std is about -2: normalized, not raw

    # a trivial pipeline (full crop, no colour) is exactly normalize(to_float(x))
    plain = AugConfig(
        size=20, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0
    )
    expected = normalize(to_float(images), plain.mean, plain.std)
    torch.testing.assert_close(augment(images, plain, gen()), expected, atol=1e-5, rtol=0)


def test_uint8_and_float_inputs_agree():
    images = uint8_nhwc()
    a = augment(images, ALL_ON, gen(3))
    b = augment(images.float() / 255, ALL_ON, gen(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_seed_reproducibility_and_per_sample_params():
    images = uint8_nhwc(b=16)
    a, pa = augment(images, ALL_ON, gen(1), return_params=True)
    b, pb = augment(images, ALL_ON, gen(1), return_params=True)
    c = augment(images, ALL_ON, gen(2))
    assert torch.equal(a, b)
    assert set(pa) == set(pb)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.allclose(a, c)

    # parameters differ across the batch
    assert pa["boxes"].shape == (16, 4)
    assert torch.unique(pa["boxes"][:, 2]).numel() > 8
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert pa[name].shape == (16,)
        on = pa["jitter"]
        assert torch.unique(pa[name][on]).numel() == int(on.sum())  # distinct where applied
        identity = 0.0 if name == "hue" else 1.0
        assert torch.all(pa[name][~on] == identity)
    assert torch.unique(pa["blur_sigma"]).numel() == 16
    for mask in ("flip", "jitter", "gray", "blur", "solarize"):
        assert pa[mask].dtype == torch.bool and pa[mask].shape == (16,)

    # identical input images still get different views
    same = images[:1].expand(16, -1, -1, -1)
    views = augment(same, ALL_ON, gen(1))
    assert not torch.allclose(views[0], views[1])


def test_zero_probabilities_skip_ops():
    cfg = AugConfig(size=8, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    _, params = augment(uint8_nhwc(), cfg, gen(), return_params=True)
    assert set(params) == {"boxes", "flip"}

    only_hue = AugConfig(size=8, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1, jitter_p=1.0)
    _, params = augment(uint8_nhwc(), only_hue, gen(), return_params=True)
    assert {"hue", "jitter"} <= set(params)
    assert not {"brightness", "contrast", "saturation"} & set(params)


def test_augment_pipeline_equals_composition_of_ops():
    images = rand_images(b=6, h=14, w=10)
    cfg = ALL_ON
    out, p = augment(images, cfg, gen(5), return_params=True)
    x = resized_crop(images, p["boxes"], cfg.size, p["flip"])
    x = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x, p["brightness"]), p["contrast"]),
                                     p["saturation"]), p["hue"])
    x = solarize(gaussian_blur(grayscale(x, p["gray"]), p["blur_sigma"], p["blur"]), p["solarize"])
    torch.testing.assert_close(out, normalize(x, cfg.mean, cfg.std), atol=1e-5, rtol=0)


def test_eval_view():
    images = uint8_nhwc(h=20, w=20)
    cfg = AugConfig(size=20)
    out = eval_view(images, cfg)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalize(to_float(images), cfg.mean, cfg.std))
    assert torch.equal(eval_view(images, cfg), out)  # deterministic
    assert eval_view(images, AugConfig(size=8)).shape == (8, 3, 8, 8)


def test_to_float_and_normalize():
    u = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(to_float(u).flatten(), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.rand(2, 3, 4, 4)
    assert to_float(f) is f
    out = normalize(f, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    expected = (f - mean) / std
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- #
# geometry
# --------------------------------------------------------------------------- #
def test_full_box_is_identity_and_flip_is_flip():
    x = rand_images(b=4, h=10, w=14)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4)
    torch.testing.assert_close(resized_crop(x, full, (10, 14)), x, atol=1e-5, rtol=0)
    flipped = resized_crop(x, full, (10, 14), flip=True)
    torch.testing.assert_close(flipped, torch.flip(x, dims=[3]), atol=1e-5, rtol=0)
    mask = torch.tensor([True, False, True, False])
    out = resized_crop(x, full, (10, 14), flip=mask)
    torch.testing.assert_close(out[mask], torch.flip(x[mask], dims=[3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~mask], x[~mask], atol=1e-5, rtol=0)


def test_crop_box_selects_region():
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])  # TL, TR, BL, BR
    x = torch.empty(1, 3, 8, 8)
    x[..., :4, :4] = colours[0].view(3, 1, 1)
    x[..., :4, 4:] = colours[1].view(3, 1, 1)
    x[..., 4:, :4] = colours[2].view(3, 1, 1)
    x[..., 4:, 4:] = colours[3].view(3, 1, 1)
    quadrants = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 0.5, 0.5], [0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    out = resized_crop(x.expand(4, -1, -1, -1), quadrants, 4)
    for i in range(4):
        torch.testing.assert_close(out[i], colours[i].view(3, 1, 1).expand(3, 4, 4), atol=1e-5, rtol=0)
    # a flipped top-left crop is still entirely top-left
    flipped = resized_crop(x, quadrants[:1], 4, flip=True)
    torch.testing.assert_close(flipped[0], colours[0].view(3, 1, 1).expand(3, 4, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("image_aspect", [1.0, 1.5])
def test_sample_crop_boxes(image_aspect):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(2000, scale, ratio, gen(), "cpu", image_aspect=image_aspect)
    assert boxes.shape == (2000, 4)
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w > 0).all() and (h > 0).all()
    assert (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert (area >= scale[0] - 1e-6).all() and (area <= scale[1] + 1e-6).all()
    aspect = w * image_aspect / h  # in pixels
    assert (aspect >= ratio[0] - 1e-5).all() and (aspect <= ratio[1] + 1e-5).all()
    assert area.std() > 0.1 and aspect.std() > 0.05 and x0.std() > 0.05  # really random
    assert torch.equal(boxes, sample_crop_boxes(2000, scale, ratio, gen(), "cpu", image_aspect=image_aspect))


def test_sample_crop_boxes_fallback_is_central():
    # an aspect ratio that can never fit with that area: every sample falls back
    boxes = sample_crop_boxes(5, (0.9, 1.0), (3.0, 4.0), gen(), "cpu")
    expected = torch.tensor([0.0, (1 - 1 / 3) / 2, 1.0, 1 / 3]).expand(5, 4)
    torch.testing.assert_close(boxes, expected)
    full = sample_crop_boxes(5, (0.9, 1.0), (3 / 4, 4 / 3), gen(), "cpu", image_aspect=1.0)
    assert (full[:, 2] * full[:, 3] >= 0.9 - 1e-6).all()


# --------------------------------------------------------------------------- #
# colour
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "ours, theirs, factors, atol",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 1.2], 1e-5),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0], 1e-3),
        (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0], 1e-3),
        (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.1, 0.5], 1e-2),
    ],
)
def test_colour_ops_match_torchvision(ours, theirs, factors, atol):
    x = rand_images(b=4, h=9, w=11, seed=7)
    out = ours(x, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(x[i], f), atol=atol, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_hue_on_pure_colours_and_grays():
    prim = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]).view(4, 3, 1, 1)
    # a third of a turn maps red -> green -> blue -> red; grays have no hue
    out = adjust_hue(prim, 1 / 3).view(4, 3)
    expected = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_colour_ops_write_into_out():
    x = rand_images(b=3, seed=2)
    expected = adjust_saturation(x, torch.tensor([0.5, 1.5, 0.7]))
    y = x.clone()
    assert adjust_saturation(y, torch.tensor([0.5, 1.5, 0.7]), out=y) is y
    torch.testing.assert_close(y, expected)


def test_grayscale():
    x = rand_images(b=4, seed=3)
    mask = torch.tensor([True, False, True, False])
    out = grayscale(x, mask)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for i in (0, 2):
        for c in range(3):
            torch.testing.assert_close(out[i, c], luma[i])
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


# --------------------------------------------------------------------------- #
# blur, solarize
# --------------------------------------------------------------------------- #
def test_gaussian_blur_matches_torchvision():
    x = rand_images(b=2, h=16, w=16, seed=4)
    sigma = torch.tensor([1.3, 0.6])
    out = gaussian_blur(x, sigma, torch.tensor([True, True]), kernel_size=5)
    for i in range(2):
        ref = TF.gaussian_blur(x[i], kernel_size=[5, 5], sigma=[sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_gaussian_blur_properties():
    # default kernel: ~10% of the side, odd, >= 3 (checked against torchvision with that size)
    x = rand_images(b=2, h=40, w=40, seed=5)
    out = gaussian_blur(x, 2.0, True)
    ref = TF.gaussian_blur(x[0], kernel_size=[5, 5], sigma=[2.0, 2.0])
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)

    const = torch.full((2, 3, 10, 10), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 2.0]), True), const)

    noise = rand_images(b=4, h=32, w=32, seed=6)
    mask = torch.tensor([True, True, False, False])
    blurred = gaussian_blur(noise, torch.tensor([1.0, 2.0, 1.0, 2.0]), mask)
    assert blurred[0].var() < 0.5 * noise[0].var() and blurred[1].var() < blurred[0].var()
    assert torch.equal(blurred[2:], noise[2:])


def test_solarize_exact():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = solarize(x, torch.tensor([True, False]))
    assert torch.equal(out[0], torch.tensor([0.0, 0.25, 0.5, 0.25, 0.0]).view(1, 1, 5).expand(3, 1, 5))
    assert torch.equal(out[1], x[1])
    assert torch.equal(solarize(x, True, threshold=0.8)[0, 0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 0.0]))


# --------------------------------------------------------------------------- #
# device
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images = uint8_nhwc(b=16)
    cpu = augment(images, ALL_ON, gen(9))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full-precision blur conv
        # a CPU generator gives the same parameters whatever the data device
        cuda = augment(images.cuda(), ALL_ON, gen(9))
    assert cuda.device.type == "cuda" and cuda.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
    # a CUDA generator works too and is reproducible
    a = augment(images.cuda(), ALL_ON, gen(9, "cuda"))
    assert torch.equal(a, augment(images.cuda(), ALL_ON, gen(9, "cuda")))
    assert a.shape == cuda.shape and torch.isfinite(a).all()


def test_two_views_view2_overrides_only_the_second_view():
    x = torch.rand(4, 3, 8, 8)
    cfg = AugConfig(size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    both = two_views(x, cfg, torch.Generator().manual_seed(0), view2_solarize_p=1.0)
    assert both.shape == (8, 3, 8, 8)
    assert torch.allclose(both[:4], x, atol=1e-5)  # view 1: identity crop, nothing else
    assert torch.allclose(both[4:], torch.where(x >= 0.5, 1 - x, x), atol=1e-5)  # view 2: always solarized
    same = two_views(x, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(same[:4], same[4:], atol=1e-5)

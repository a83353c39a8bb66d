"""Corruptions (CIFAR-10-C style, in torch) and the robustness protocol."""

import json

import pytest
import torch
import torch.nn.functional as F

from selfsup.evaluate import evaluate
from selfsup.evaluate.corruptions import CORRUPTIONS, corrupt


def _images(b=8, size=32):
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(b, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = 0.7 * x + 0.3 * torch.rand(b, 3, size, size, generator=g)  # some fine detail for blur / pixelate
    return (0.15 + 0.7 * x).clamp(0, 1)  # mid-range, so brightness / noise are not clipped away


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_identity_and_damage_grows(name):
    x = _images()
    assert torch.equal(corrupt(x, name, 0, torch.Generator().manual_seed(1)), x)
    damage = []
    for sev in range(1, 6):
        y = corrupt(x, name, sev, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1
        assert torch.equal(y, corrupt(x, name, sev, torch.Generator().manual_seed(1)))  # deterministic
        damage.append(float((y - x).abs().mean()))
    assert damage[0] > 0
    # grows with severity, up to a small wobble (JPEG blocks, pixelate's grid alignment)
    assert all(b >= a * 0.95 for a, b in zip(damage, damage[1:])), damage
    assert damage[-1] > damage[0] * 1.05, damage


def test_corruptions_by_hand():
    x = torch.full((1, 3, 4, 4), 0.5)
    x[0, :, 0, 0] = 0.9
    y = corrupt(x, "contrast", 5, torch.Generator())  # c = 0.15 around the image mean
    mean = x.mean()
    assert torch.allclose(y, (x - mean) * 0.15 + mean)
    y = corrupt(x, "brightness", 1, torch.Generator())  # HSV value + 0.05, grey pixels stay grey
    assert torch.allclose(y[0, :, 1, 1], torch.full((3,), 0.55)) and torch.allclose(y[0, :, 0, 0], torch.full((3,), 0.95))
    x = torch.rand(2, 3, 32, 32) * 0.98 + 0.01  # never exactly 0 or 1
    y = corrupt(x, "impulse_noise", 5, torch.Generator().manual_seed(0))  # salt and pepper, fraction 0.07
    changed = y != x
    assert 0.06 < changed.float().mean() < 0.08  # 6,144 values: 430 +- 20 expected
    assert torch.all((y[changed] == 0) | (y[changed] == 1))  # a changed value is salt or pepper
    assert 0.025 < (y == 0).float().mean() < 0.045 and 0.025 < (y == 1).float().mean() < 0.045  # half each
    assert torch.equal(y[~changed], x[~changed])
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "snow", 1, torch.Generator())


def test_robustness_protocol_writes_per_corruption_figures(tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    r = evaluate("random:convnet", "robustness", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                 progress=False)
    saved = json.loads((out / "robustness.json").read_text())
    assert set(saved["corruptions"]) == set(CORRUPTIONS)
    assert all(set(v) == {"1", "2", "3", "4", "5"} for v in saved["per_severity"].values())
    assert saved["top1"] == pytest.approx(sum(saved["corruptions"].values()) / len(CORRUPTIONS))
    assert 0 <= saved["clean_top1"] <= 1 and r["top1"] == saved["top1"]

"""EMP-SSL: the coding rate and the loss against hand computations, the patches, the bag-of-crops
evaluation, a tiny run end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.backbones import CropBag, build_backbone
from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.data.views import resized_crop
from selfsup.losses import emp_ssl_loss, total_coding_rate
from selfsup.methods.emp_ssl import EMPSSL


def test_total_coding_rate_by_hand_and_by_sylvester():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # m = 3 embeddings, d = 2
    c = 2 / (3 * 0.2)
    gram = z.T @ z  # [[1.36, 0.48], [0.48, 1.64]]
    det = (1 + c * 1.36) * (1 + c * 1.64) - (c * 0.48) ** 2
    assert float(total_coding_rate(z, 0.2)) == pytest.approx(0.5 * math.log(det), rel=1e-5)
    assert torch.allclose(gram, torch.tensor([[1.36, 0.48], [0.48, 1.64]]))
    wide = F.normalize(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), dim=1)  # m < d: m x m form
    direct = 0.5 * torch.logdet(torch.eye(7) + 7 / (3 * 0.2) * wide.T @ wide)
    assert float(total_coding_rate(wide, 0.2)) == pytest.approx(float(direct), rel=1e-5)


def test_emp_ssl_loss_by_hand():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    same = torch.stack([a, a, a])  # 3 patches of 2 images, all equal: invariance 1
    loss, parts = emp_ssl_loss(same, sim_weight=200, tcr_weight=1, eps=0.2)
    assert float(parts["invariance"]) == pytest.approx(1.0)
    assert float(parts["tcr"]) == pytest.approx(float(total_coding_rate(a, 0.2)))
    assert float(loss) == pytest.approx(-float(parts["tcr"]) - 200.0)
    # two patches of one image at 90 degrees: the mean is at 45 degrees, cos = 1/sqrt(2) for both
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(emp_ssl_loss(z)[1]["invariance"]) == pytest.approx(1 / math.sqrt(2), rel=1e-5)


def test_crop_bag_is_the_mean_over_fixed_crops_and_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    inner = build_backbone("convnet").eval()
    bag = CropBag(inner, n=4, scale=0.25, size=16).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = bag(x)
        by_hand = torch.stack([inner(resized_crop(x, bag.boxes[i].expand(3, 4), 16, bool(bag.flips[i])))
                               for i in range(4)]).mean(0)
        assert torch.allclose(f, by_hand, atol=1e-5)
        assert torch.allclose(bag(x[:1]), f[:1], atol=1e-5)  # the same crops whatever the batch
    assert torch.allclose(bag.boxes[:, 2] * bag.boxes[:, 3], torch.full((4,), 0.25))  # 25% of the image
    rebuilt = build_backbone("crop_bag", 32, None, 3, {"inner": "convnet", "n": 4, "scale": 0.25, "size": 16,
                                                       "seed": 0})
    assert torch.equal(rebuilt.boxes, bag.boxes)


def _cfg(**params):
    return build_config("emp_ssl", {"model": {"backbone": "convnet"}, "data": {"image_size": 16},
                                    "params": {"n_patches": 4, "proj_hidden_dim": 32, "proj_dim": 16,
                                               "eval_crops": 4, **params}})


def test_patches_are_patch_major_crops_of_a_quarter_of_the_image():
    m = EMPSSL(_cfg(patch_size=8))
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    x = m.prepare(images, torch.Generator().manual_seed(0))
    assert x.shape == (20, 3, 8, 8)
    out = m.training_step(x)
    assert torch.isfinite(out["loss"]) and -1 <= float(out["invariance"]) <= 1
    spec = m.backbone_spec()
    assert spec["name"] == "crop_bag" and spec["weights"] == "bag" and spec["options"]["inner"] == "convnet"
    assert m.encoder is m.bag and m.bag.inner is m.backbone  # the bag evaluates the trained backbone
    assert EMPSSL(_cfg(eval_crops=0)).backbone_spec()["name"] == "convnet"
    with pytest.raises(ConfigError, match="n_patches"):
        EMPSSL(_cfg(n_patches=1))


def test_a_tiny_emp_ssl_run_learns_and_evaluates_as_a_bag(tiny_dataset, tmp_path):
    from selfsup.evaluate import evaluate
    from selfsup.train import Trainer

    cfg = build_config("emp_ssl", {
        "model": {"backbone": "convnet"}, "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
        "train": {"epochs": 6, "batch_size": 16, "device": "cpu"},
        "optim": {"name": "adamw", "lr": 0.02, "weight_decay": 0.0, "warmup_epochs": 0},
        "params": {"n_patches": 4, "proj_hidden_dim": 64, "proj_dim": 32, "eval_crops": 4}})
    t = Trainer(cfg, tmp_path / "run", progress=False)
    x = torch.from_numpy(np.array(t.data.images[:16])).permute(0, 3, 1, 2)

    def probe():
        with torch.no_grad():
            return t.method.training_step(t.method.prepare(x, torch.Generator().manual_seed(5)))

    before = probe()
    t.fit()
    after = probe()
    assert float(after["loss"]) < float(before["loss"])  # the coding rate and the invariance improve together
    r = evaluate(tmp_path / "run", "knn", tiny_dataset, tiny_dataset, k=5, progress=False)
    assert r["backbone"]["name"] == "crop_bag" and r["top1"] > 0.4  # 4 classes: chance 0.25
    assert (tmp_path / "run" / "figures" / "patches.png").exists()

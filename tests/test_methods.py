import numpy as np
import torch
from PIL import Image

from selfsup.configure import build_config
from selfsup.data import load_images
from selfsup.methods import METHODS
from selfsup.methods.rotation import rotate_all
from selfsup.train import Trainer
from selfsup.run import read_metrics


def test_rotation_pseudo_labels_match_the_rotation_applied():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    xr, y = rotate_all(x)
    assert xr.shape == (8, 3, 4, 4) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for i in range(8):
        src = x[i % 2]
        # k counter-clockwise quarter turns, checked by hand for k=1: top row becomes the left column reversed
        assert torch.equal(xr[i], torch.rot90(src, int(y[i]), dims=(1, 2)))
    assert torch.equal(xr[2][:, :, 0], x[0][:, 0, :].flip(-1))  # k=1: first column (top->bottom) = first row (right->left)
    assert torch.equal(xr[4], x[0].flip(1).flip(2))  # k=2 is a half turn


def _tiny(method, data, tmp_path, epochs, **extra):
    overrides = {"model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
                 "train": {"epochs": epochs, "batch_size": 16, "log_every": 2, "ckpt_every": 1000}}
    for k, v in extra.items():
        overrides.setdefault(k, {}).update(v)
    cfg = build_config(method, overrides)
    trainer = Trainer(cfg, tmp_path / method, progress=False)
    trainer.fit()
    return trainer, read_metrics(tmp_path / method)


def test_rotation_tiny_run_learns_the_pretext_task(tiny_dataset, tmp_path):
    trainer, rows = _tiny("rotation", tiny_dataset / "train", tmp_path, epochs=12, optim={"lr": 0.4})
    first, last = float(rows[0]["pretext_acc"]), float(rows[-1]["pretext_acc"])
    assert last > 0.6, (first, last)  # chance is 0.25
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_simclr_tiny_run_lowers_its_loss_on_a_fixed_batch(tmp_path):
    """Instance discrimination on 64 distinct random colour grids: after training, the contrastive
    loss on a fixed batch of views (same seed before and after) is clearly lower and partners are
    found more often. Augmentations are milder than the preset: 16 px images and 80 steps."""
    rng = np.random.default_rng(0)
    (tmp_path / "grids").mkdir()
    for i in range(64):
        grid = (rng.uniform(0, 1, (4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(grid).resize((16, 16), Image.BILINEAR).save(tmp_path / "grids" / f"{i}.png")
    cfg = build_config("simclr", {
        "model": {"backbone": "convnet"}, "data": {"path": str(tmp_path / "grids"), "image_size": 16},
        "train": {"epochs": 20, "batch_size": 16, "ckpt_every": 1000},
        "optim": {"name": "adamw", "lr": 0.1, "weight_decay": 0.0, "warmup_epochs": 0},
        "aug": {"crop_scale": [0.5, 1.0], "jitter_p": 0.5, "brightness": 0.2, "contrast": 0.2,
                "saturation": 0.2, "hue": 0.02, "gray_p": 0.0}})
    trainer = Trainer(cfg, tmp_path / "simclr", progress=False)
    x = torch.from_numpy(np.array(trainer.data.images)).permute(0, 3, 1, 2)

    def probe():
        with torch.no_grad():
            out = trainer.method.training_step(trainer.method.prepare(x, torch.Generator().manual_seed(123)))
        return float(out["loss"]), float(out["pretext_acc"])

    loss0, acc0 = probe()
    trainer.fit()
    loss1, acc1 = probe()
    assert loss1 < loss0 - 0.5, (loss0, loss1)
    assert acc1 > acc0 + 0.1, (acc0, acc1)


def test_simclr_views_differ_and_batch_doubles(tiny_dataset):
    cfg = build_config("simclr", {"model": {"backbone": "convnet"}, "data": {"image_size": 16}})
    m = METHODS["simclr"](cfg)
    data = load_images(str(tiny_dataset / "train"), image_size=16, progress=False)
    x = torch.from_numpy(np.array(data.images[:4])).permute(0, 3, 1, 2)
    views = m.prepare(x, torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 16, 16)
    assert not torch.allclose(views[:4], views[4:])
    out = m.training_step(views)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])

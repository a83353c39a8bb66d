"""Shared fixtures: small synthetic image folders made on the fly (tests never read ../shared)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))  # honour OMP_NUM_THREADS=1


def oriented_image(rng: np.random.Generator, size: int, cls: int) -> np.ndarray:
    """An image with an unambiguous 'up': bright sky on top, dark ground below, plus a class-specific
    coloured blob (so a class label exists for kNN/linear tests) and noise."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    horizon = int(size * rng.uniform(0.35, 0.6))
    img[:horizon] = rng.uniform(0.6, 1.0, size=3)
    img[horizon:] = rng.uniform(0.0, 0.3, size=3)
    colours = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]
    r = size // 5
    cy, cx = rng.integers(r, size - r, size=2)
    yy, xx = np.mgrid[:size, :size]
    if cls % 2 == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    img[mask] = colours[cls % len(colours)]
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_folder(root: Path, n_per_class: int, classes: int = 4, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(oriented_image(rng, size, c)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test gets its own decode cache."""
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """train/ and test/ folders of 16 px images, 4 classes."""
    root = tmp_path / "data"
    make_folder(root / "train", 16, seed=0)
    make_folder(root / "test", 8, seed=1)
    return root


def stop_at(trainer, step: int) -> None:
    """Make ``trainer.fit()`` stop after training step ``step`` (0-based), as a SIGTERM arriving
    during that step does: the trainer checkpoints, then raises TrainingInterrupted."""
    train_step = trainer.train_step

    def wrapped(images, s):
        out = train_step(images, s)
        if s == step:
            trainer._stop_signal = signal.SIGTERM  # what the SIGTERM handler does
        return out

    trainer.train_step = wrapped


def assert_resume_is_exact(cfg, tmp_path: Path, stop_step: int = 4):
    """Train ``cfg`` straight through, and again stopped after step ``stop_step`` and resumed: the
    resumed run must end with exactly the same state dict. Returns the straight trainer."""
    from selfsup.train import Trainer, TrainingInterrupted

    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit()
    interrupted = Trainer(cfg, tmp_path / "resumed", progress=False)
    stop_at(interrupted, stop_step)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step == stop_step + 1
    resumed.fit()
    a, b = straight.state()["model"], resumed.state()["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return straight


def assert_backbone_moved(run_dir: Path, min_change: float = 1e-3) -> float:
    """The run's saved backbone is not its initial one: rebuild the method from the run's config with
    the run's seed (the trainer's initialisation) and compare the weights. A method whose gradient never
    reaches the backbone, or an evaluation reading a fresh network, fails this. Returns the largest
    relative change of a weight tensor."""
    from selfsup.configure import config_from_dict
    from selfsup.methods import get_method
    from selfsup.train import load_checkpoint

    ckpt = load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")
    cfg = config_from_dict(ckpt["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        init = get_method(cfg.method)(cfg).backbone.state_dict()
    changes = [float((ckpt["model"][f"backbone.{k}"].float() - v.float()).norm() / (v.float().norm() + 1e-12))
               for k, v in init.items() if v.is_floating_point() and "running" not in k]
    assert max(changes) > min_change, f"the backbone of {run_dir} did not move from its initialisation"
    return max(changes)

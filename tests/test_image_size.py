"""The training resolution follows the images unless --image-size says otherwise (data/size.py)."""

import logging

import numpy as np
import pytest
import yaml
from PIL import Image

from selfsup.configure import build_config, resume_config
from selfsup.data import DataError, auto_image_size, open_source
from selfsup.train import Trainer


def _folder(root, size, n=6, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("size, cpu, cuda", [
    ((8, 8), 16, 16),  # tiny: own size, at least 16
    ((28, 28), 32, 32),  # rounded up to a multiple of 8
    ((32, 32), 32, 32),  # CIFAR stays CIFAR
    ((40, 60), 40, 40),  # the shorter side
    ((100, 90), 80, 80),  # larger: rounded down to a multiple of 16
    ((300, 200), 96, 192),  # photos: capped on a CPU, their side on a GPU
    ((1200, 900), 96, 224),
])
def test_the_rule(tmp_path, size, cpu, cuda):
    source = open_source(str(_folder(tmp_path, size, n=2)))
    side, why = auto_image_size(source, "cpu")
    assert side == cpu and f"is {min(size)} px" in why
    assert auto_image_size(source, "cuda")[0] == cuda
    if min(size) > 96:
        assert "capped at 96 px on a CPU" in why


def test_the_median_decides_and_arrays_have_one_size(tmp_path):
    _folder(tmp_path / "f", (20, 20), n=3, classes=("a",))
    _folder(tmp_path / "f", (200, 150), n=2, classes=("b",))  # 3 small, 2 large: the median is small
    assert auto_image_size(open_source(str(tmp_path / "f")), "cuda")[0] == 24
    side, why = auto_image_size(open_source("digits"), "cpu")  # 8x8 arrays
    assert side == 16 and "is 8 px" in why


def test_no_readable_image_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="--image-size"):
        auto_image_size(open_source(str(tmp_path / "x")))


def test_a_run_chooses_logs_and_keeps_its_size(tmp_path, caplog):
    data = _folder(tmp_path / "photos", (150, 120), n=4)  # non-square, larger than the CPU cap
    cfg = build_config("rotation", {"data": {"path": str(data), "cache_dir": str(tmp_path / "cache")},
                                    "model": {"backbone": "convnet"}, "train": {"epochs": 1, "batch_size": 8,
                                                                               "device": "cpu", "precision": "fp32"}})
    assert cfg.data.image_size == 0  # not chosen yet: it depends on the data
    with caplog.at_level(logging.INFO, logger="selfsup"):
        tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert tr.cfg.data.image_size == 96 and tr.cfg.aug.size == 96 and tr.data.images.shape[1:] == (96, 96, 3)
    assert any("image size 96 px (automatic: the median shorter side of 8 of its images is 120 px" in r.message
               for r in caplog.records)
    tr.fit()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["image_size"] == 96
    assert resume_config(tmp_path / "run").data.image_size == 96  # a resumed run keeps it

    # --image-size says otherwise
    cfg = build_config("rotation", {"data": {"path": str(data), "cache_dir": str(tmp_path / "cache"), "image_size": 32},
                                    "model": {"backbone": "convnet"}, "train": {"epochs": 1, "batch_size": 8,
                                                                               "device": "cpu"}})
    assert Trainer(cfg, tmp_path / "run32", progress=False).data.images.shape[1] == 32

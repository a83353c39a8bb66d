"""Feature extraction says where it is: a periodic plain log line when stderr is not a terminal."""

from __future__ import annotations

import logging

import numpy as np

from selfsup import runtime
from selfsup.data.views import AugConfig
from selfsup.evaluate import load_encoder


def test_feature_extraction_logs_its_progress_off_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "PROGRESS_EVERY_S", 0.0)  # a line after every batch but the last
    enc = load_encoder("random:convnet", image_size=8)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    view = AugConfig(size=8, mean=enc.mean, std=enc.std)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        f = runtime.embed(enc.backbone, images, view, "cpu", "fp32", batch_size=16, progress="features")
        quiet = runtime.embed(enc.backbone, images, view, "cpu", "fp32", batch_size=16)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert len(lines) == 2, lines  # after 16 and 32 of 40 images, not at the end; none without a label
    assert lines[0].startswith("features: 16/40 images,") and lines[1].startswith("features: 32/40 images,")
    assert "img/s, about" in lines[0] and lines[0].endswith("s left")
    assert f.shape == (40, enc.backbone.out_dim) and np.allclose(f.numpy(), quiet.numpy())

"""Random-resized crops sample the whole frame of non-square images, not only its centre square
(data/size.py): the cache keeps the frames, evaluation and square pretext tasks see the centre."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.configure import build_config
from selfsup.data import load_images
from selfsup.data.size import frame_aspect, frame_shape
from selfsup.data.sources import fit_frame, open_source
from selfsup.data.views import augment
from selfsup.evaluate.features import feature_cache_key
from selfsup.run import load_encoder
from selfsup.train import Trainer

W, H = 48, 32  # landscape 3:2; the centre square is x in [8, 40)


def _landscape(root, n=8):
    """Green centre square, red margins left and right."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.zeros((H, W, 3), np.uint8)
            img[:, :, 1] = 200
            img[:, :8] = img[:, 40:] = (220, 0, 0)
            img[i % H, 20, 2] = 255  # images differ a little
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def test_fit_frame_keeps_the_frame_or_its_centre():
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :4] = 255  # a white band on the left, outside the centre 20x20 box (x in [5, 25))
    frame = fit_frame(img, (10, 15))  # the whole frame, halved
    assert frame.shape == (10, 15, 3) and frame[:, :1].min() > 200 and frame[:, 3:].max() == 0
    square = fit_frame(img, 10)  # the centre 20x20 box: no white
    assert square.shape == (10, 10, 3) and square.max() == 0
    assert fit_frame(frame, (10, 15)) is frame
    assert frame_shape(16, 1.5) == (16, 24) and frame_shape(16, 0.5) == (32, 16) and frame_shape(16, 1.0) == (16, 16)


def test_the_cache_keeps_whole_frames_and_shows_their_centre(tmp_path, monkeypatch):
    data = _landscape(tmp_path / "photos")
    assert frame_aspect(open_source(str(data))) == 1.5
    d = load_images(str(data), image_size=16, cache_dir=str(tmp_path / "c"), progress=False)
    assert d.frames.shape == (16, 16, 24, 3) and d.images.shape == (16, 16, 16, 3)
    assert d.frames[:, :, :2, 0].min() > 150 and d.frames[:, :, -2:, 0].min() > 150  # red margins kept
    assert d.images[..., 0].max() < 60 and d.images[..., 1].min() > 150  # the centre square: green only
    assert np.array_equal(d.images, d.frames[:, :, 4:20])
    from selfsup.data.sources import ImageFolderSource

    with monkeypatch.context() as m:  # a hit reads no image file, not even the headers
        m.setattr(ImageFolderSource, "image_sides", lambda *a: pytest.fail("read the headers on a cache hit"))
        again = load_images(str(data), image_size=16, cache_dir=str(tmp_path / "c"), progress=False)
    assert again.frames.filename == d.frames.filename  # a cache hit
    sub = d.subset(np.array([3, 1]))
    assert np.array_equal(sub.images, d.images[[3, 1]]) and np.array_equal(sub.frames, d.frames[[3, 1]])
    square = load_images(str(data), image_size=16, cache_dir=str(tmp_path / "c"), progress=False, full_frame=False)
    assert square.frames is None and square.images.shape == (16, 16, 16, 3)
    assert np.abs(square.images.astype(int) - d.images.astype(int)).max() <= 12  # the same centre, resized once

    # the frozen-feature cache knows the centre-square view of the frame file
    enc = load_encoder("random:convnet", image_size=16)
    key = feature_cache_key(enc, d.images)
    assert key is not None and key != feature_cache_key(enc, d.frames)
    assert feature_cache_key(enc, again.images) == key


@pytest.mark.parametrize("method, full", [("simclr", True), ("vicreg", True), ("rotation", False), ("jigsaw", False)])
def test_crop_methods_train_on_frames_and_the_others_on_squares(tmp_path, method, full):
    data = _landscape(tmp_path / "photos")
    cfg = build_config(method, {"data": {"path": str(data), "image_size": 16, "cache_dir": str(tmp_path / "c")},
                                "model": {"backbone": "convnet"},
                                "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": "fp32"}})
    tr = Trainer(cfg, tmp_path / method, progress=False)
    batch = next(iter(tr.stream.batches(0)))
    assert tuple(batch.shape[2:]) == ((16, 24) if full else (16, 16))
    if not full:
        return
    views, params = augment(batch, cfg.aug, torch.Generator().manual_seed(0), return_params=True)
    assert views.shape[2:] == (16, 16)  # square views, of any part of the frame
    x0, w = params["boxes"][:, 0], params["boxes"][:, 2]
    assert bool(((x0 < 4 / 24) | (x0 + w > 20 / 24)).any())  # some crops reach into the margins
    tr.fit()  # and the run trains end to end

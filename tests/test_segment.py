"""Semantic segmentation: the image/mask data source and its bad pairs, the scores by hand, joint
augmentation, and the protocol end to end on tiny synthetic frames (a random backbone must segment
coloured shapes far better than chance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.segmentation import load_segmentation
from selfsup.evaluate.segment import _joint_augment, confusion, network_size, scores


def _frame(rng, h=20, w=24):
    """Noisy grey background (class 0), a red square (1) and a blue disk (2)."""
    img = rng.uniform(0.3, 0.6, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    y, x = rng.integers(2, h - 8), rng.integers(2, w - 8)
    img[y:y + 6, x:x + 6] = (0.9, 0.1, 0.1)
    mask[y:y + 6, x:x + 6] = 1
    cy, cx = rng.integers(4, h - 4), rng.integers(4, w - 4)
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
    img[disk] = (0.1, 0.1, 0.9)
    mask[disk] = 2
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img * 255).astype(np.uint8), mask


def _folder(root, n, seed):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        img, mask = _frame(rng)
        Image.fromarray(img).save(root / "images" / f"f{i:02d}.jpg", quality=95)
        Image.fromarray(mask, mode="L").save(root / "labels" / f"f{i:02d}.png")
    return root


@pytest.fixture
def seg_data(tmp_path):
    root = tmp_path / "seg"
    _folder(root / "train", 16, 0)
    _folder(root / "test", 6, 1)
    return root


def test_the_source_pairs_images_with_masks_and_lists_bad_pairs(seg_data):
    tr = load_segmentation(seg_data, "train")
    assert tr.images.shape == (16, 20, 24, 3) and tr.masks.shape == (16, 20, 24) and tr.classes == ["0", "1", "2"]
    assert tr.ignore_index == 255 and not tr.skipped
    test = seg_data / "test"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(test / "images" / "lonely.png")  # no mask
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(test / "images" / "small.png")
    Image.fromarray(np.zeros((20, 24), np.uint8), mode="L").save(test / "labels" / "small.png")  # size mismatch
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(test / "images" / "rgbmask.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(test / "labels" / "rgbmask.png")  # colours, not ids
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(test / "images" / "bigid.png")
    Image.fromarray(np.full((20, 24), 7, np.uint8), mode="L").save(test / "labels" / "bigid.png")  # id 7 of 3
    (test / "labels" / "orphan.png").write_bytes((test / "labels" / "f00.png").read_bytes())
    te = load_segmentation(seg_data, "test", num_classes=3, classes=tr.classes)
    assert len(te) == 6
    why = {name.split("/")[-1]: reason for name, reason in te.skipped}
    assert "no mask" in why["lonely.png"] and "differs from its image" in why["small.png"]
    assert "not colours" in why["rgbmask.png"] and "outside 0..2" in why["bigid.png"]
    assert "without its image" in why["orphan.png"]


def test_classes_txt_names_the_classes_and_the_ignored_id(seg_data):
    (seg_data / "classes.txt").write_text("ground\nsquare\ndisk\nunlabelled\n")
    tr = load_segmentation(seg_data, "train")
    assert tr.classes == ["ground", "square", "disk"] and tr.ignore_index == 3
    assert load_segmentation(seg_data, "train", ignore_index=0).ignore_index == 0  # the option wins


def test_scores_by_hand():
    pred = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 1]])
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 9, 9]])  # 9: ignored
    cm = confusion(pred, mask, 2, 9)
    assert cm.tolist() == [[3, 1], [0, 2]]
    s = scores(cm, ["a", "b"])
    # IoU(a) = 3 / (3 + 1 + 0) = 0.75, IoU(b) = 2 / (2 + 1) = 0.667; pixel accuracy 5 / 6
    assert s["per_class_iou"] == {"a": 0.75, "b": pytest.approx(0.6667, abs=1e-4)}
    assert s["miou"] == pytest.approx((0.75 + 2 / 3) / 2) and s["pixel_acc"] == pytest.approx(5 / 6)
    assert network_size(180, 240, 8) == (184, 240) and network_size(20, 24, 32) == (32, 32)


def test_joint_augmentation_moves_image_and_mask_together():
    mask = torch.zeros(4, 16, 16, dtype=torch.long)
    mask[:, 2:9, 3:12] = 1
    x = mask[:, None].float().repeat(1, 3, 1, 1)  # the image is its own mask
    ax, am = _joint_augment(x, mask, torch.Generator().manual_seed(0))
    agree = ((ax[:, 0] > 0.5).long() == am).float().mean()
    mirrored = ((ax[:, 0] > 0.5).long() == am.flip(-1)).float().mean()  # what a mask flipped apart would give
    assert agree > 0.9 and agree > mirrored + 0.05 and not torch.equal(am, mask)  # edges: bilinear vs nearest


def test_the_segment_protocol_beats_chance_frozen_and_finetuned(seg_data, tmp_path, capsys):
    from selfsup.cli import main
    from selfsup.evaluate import evaluate

    out = tmp_path / "ev"
    r = evaluate("random:convnet", "segment", seg_data, seg_data, out=out, image_size=16, epochs=40, lr=0.01,
                 progress=False)
    # chance: predicting the majority class (background, ~80% of pixels) gives mIoU ~0.27
    assert r["miou"] > 0.6 and r["pixel_acc"] > 0.9, r
    assert set(r["per_class_iou"]) == {"0", "1", "2"} and r["network_size"] == [24, 24] and r["test_split"] == "test"
    assert (out / "segment.png").stat().st_size > 2000
    saved = json.loads((out / "segment.json").read_text())
    assert saved["top1"] == saved["miou"] and len(saved["confusion"]) == 3
    assert main(["evaluate", "random:convnet", "--protocol", "segment", "--train", str(seg_data), "--test",
                 str(seg_data), "--out", str(out), "--image-size", "16", "--finetune", "--epochs", "2",
                 "--no-progress"]) == 0
    assert "segment mIoU" in capsys.readouterr().out and (out / "segment_finetune.json").exists()
    with pytest.raises(Exception, match="apply to the segment protocol"):
        evaluate("random:convnet", "knn", seg_data, seg_data, out=out, finetune=True, progress=False)


def test_frozen_segmentation_features_are_remembered_and_a_vit_segments_too(seg_data, tmp_path, caplog):
    """A second frozen evaluation of the same backbone on the same frames reads its features (and its
    precise-BN statistics) from the cache and scores exactly the same; a ViT's patch tokens serve as
    maps (network size snapped to its patch size)."""
    import logging

    from selfsup.evaluate import evaluate

    cache = tmp_path / "cache"
    kw = dict(out=tmp_path / "a", image_size=16, epochs=5, lr=0.01, progress=False, cache_dir=str(cache))
    first = evaluate("random:convnet", "segment", seg_data, seg_data, **kw)
    files = list((cache / "features").glob("seg-*.pt"))
    assert len(files) == 1
    with caplog.at_level(logging.INFO, logger="selfsup"):
        second = evaluate("random:convnet", "segment", seg_data, seg_data, **{**kw, "out": tmp_path / "b"})
    assert any("features of 16 frames from" in r.getMessage() for r in caplog.records)
    assert second["miou"] == first["miou"] and second["confusion"] == first["confusion"]
    assert second["precise_bn"] == first["precise_bn"] == 16
    files[0].write_bytes(b"damaged")  # a damaged cache file is recomputed, never a crash
    third = evaluate("random:convnet", "segment", seg_data, seg_data, **{**kw, "out": tmp_path / "c"})
    assert third["miou"] == first["miou"]

    r = evaluate("random:vit_tiny", "segment", seg_data, seg_data, out=tmp_path / "v", image_size=16, epochs=40,
                 lr=0.01, progress=False, cache_dir=str(cache))
    assert r["stride"] == 4 and r["network_size"] == [24, 20], r  # 24 x 20 frames, 4 px patches
    assert r["miou"] > 0.45, r  # chance (all background) ~0.27


def test_a_runs_segmentation_picture_lands_in_its_figures_and_its_report_once(seg_data, tmp_path, monkeypatch):
    """Evaluating a run directory draws test frames | ground truth | prediction into RUN_DIR/eval and
    RUN_DIR/figures; the report shows the picture once, beside the per-class IoU table."""
    from selfsup.configure import build_config
    from selfsup.evaluate import evaluate
    from selfsup.report import write_report
    from selfsup.train import Trainer

    run = tmp_path / "rot"
    cfg = build_config("rotation", {"model": {"backbone": "convnet"},
                                    "data": {"path": str(seg_data / "train" / "images"), "image_size": 16},
                                    "train": {"epochs": 1, "batch_size": 8, "ckpt_every": 1000}})
    Trainer(cfg, run, progress=False).fit()
    r = evaluate(str(run), "segment", seg_data, seg_data, epochs=3, lr=0.01, progress=False)
    assert (run / "eval" / "segment.json").exists() and r["figure"] == str(run / "eval" / "segment.png")
    drawn = (run / "figures" / "segment.png").read_bytes()
    assert drawn == (run / "eval" / "segment.png").read_bytes() and len(drawn) > 2000
    text = write_report(run).read_text()
    assert "<h3>Segmentation (segment): IoU per class</h3>" in text and text.count("<h3>segment</h3>") == 1

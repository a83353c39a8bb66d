"""Fraction protocols: finetune, pseudolabel, fixmatch (label subsets, training, label isolation, views)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import oriented_image

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.data.views import AugConfig, augment_input, cutout, eval_input, sample_cutout_boxes
from selfsup.evaluate import evaluate, fraction_subset, load_encoder, result_name
from selfsup.evaluate.finetune import predict_logits
from selfsup.evaluate.semi import (fixmatch_targets, fixmatch_unlabeled_loss, fraction_protocol, ramp_weight,
                                   strong_augment, strong_view)


def test_fraction_subset_is_balanced_identical_across_calls_and_nested():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [-1] * 5)  # -1: unlabeled, never picked
    a = fraction_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[a]).tolist() == [5, 3, 2]
    assert np.array_equal(a, fraction_subset(labels, 0.1, seed=0))
    assert not np.array_equal(a, fraction_subset(labels, 0.1, seed=1))
    assert np.bincount(labels[fraction_subset(labels, 0.01)]).tolist() == [1, 1, 1]  # at least one per class
    assert np.bincount(labels[fraction_subset(labels, 0.25)]).tolist() == [13, 8, 5]  # 12.5 -> 13, 7.5 -> 8
    assert set(a) <= set(fraction_subset(labels, 0.5, seed=0))  # a smaller fraction's subset is inside
    assert np.array_equal(fraction_subset(labels, 1.0), np.flatnonzero(labels >= 0))
    with pytest.raises(ConfigError, match="fraction"):
        fraction_subset(labels, 0.0)
    assert result_name("finetune", 0.01) == "finetune_0.01.json" and result_name("fixmatch", 0.1) == "fixmatch_0.1.json"
    assert result_name("finetune", 1.0) == "finetune_1.json" and result_name("knn") == "knn.json"


def test_finetune_from_scratch_beats_chance_and_writes_json(tiny_dataset, tmp_path):
    encoder = load_encoder("random:convnet", image_size=16)
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    out = tmp_path / "eval"
    r = evaluate("random:convnet", "finetune", str(tiny_dataset), str(tiny_dataset), out=out, progress=False,
                 encoder=encoder, fraction=1.0, epochs=10, batch_size=16)
    saved = json.loads((out / "finetune_1.json").read_text())
    assert saved["top1"] == r["top1"] > 0.5  # 4 classes: chance is 0.25
    assert saved["fraction"] == 1.0 and saved["n_labeled"] == 64 and saved["epochs"] == 10 and saved["steps"] == 40
    assert saved["seconds"] > 0 and saved["backbone_lr"] == saved["lr"]  # random: the backbone gets the full lr
    assert all(torch.equal(v, encoder.backbone.state_dict()[k]) for k, v in before.items())  # a copy is trained
    with pytest.raises(ConfigError, match="--fraction"):
        evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset), out=out, fraction=0.1)
    with pytest.raises(ConfigError, match="fraction below 1"):
        evaluate("random:convnet", "fixmatch", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                 progress=False, fraction=1.0)


def _images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    return np.stack([oriented_image(rng, 16, int(c)) for c in labels]), labels


@pytest.mark.parametrize("protocol, options", [("fixmatch", {"threshold": 0.0}),  # 0: every pseudo-label is used
                                               ("pseudolabel", {"t1": 0.0, "t2": 0.5})])
def test_unlabeled_labels_never_reach_the_training(protocol, options):
    images, labels = _images(12, seed=0)
    test_images, _ = _images(2, seed=1)
    encoder = load_encoder("random:convnet", image_size=16)
    labeled = fraction_subset(labels, 0.25)
    unlabeled = np.setdiff1d(np.arange(len(labels)), labeled)

    def run(y):
        result, model = fraction_protocol(protocol, encoder, images, y, labeled, test_images, labels[:8], 4,
                                          device="cpu", epochs=1, batch_size=4, mu=2, **options)
        return result, predict_logits(model, encoder, test_images, "cpu")

    base, logits = run(labels)
    assert base["n_labeled"] == 12 and base["n_unlabeled"] == 36 and base["steps"] == 5
    shuffled, replaced, hidden = labels.copy(), labels.copy(), labels.copy()
    shuffled[unlabeled] = np.random.default_rng(0).permutation(labels[unlabeled])
    replaced[unlabeled] = (labels[unlabeled] + 1) % 4
    hidden[unlabeled] = -1
    for y in (shuffled, replaced, hidden):
        result, other = run(y)
        assert torch.equal(other, logits)
    assert result["pseudo_label_acc"] is None  # the true labels are read for logging only
    changed = labels.copy()
    changed[labeled[0]] = (labels[labeled[0]] + 1) % 4
    assert not torch.equal(run(changed)[1], logits)


def test_fixmatch_threshold_keeps_confident_predictions_and_masks_the_others():
    weak = torch.tensor([[8.0, 0.0, 0.0], [0.2, 0.0, 0.1], [0.0, 0.0, 5.0]])  # p_max ~0.999, ~0.37, ~0.987
    pseudo, mask = fixmatch_targets(weak, threshold=0.95)
    assert pseudo.tolist() == [0, 0, 2] and mask.tolist() == [True, False, True]
    assert fixmatch_targets(weak, threshold=0.99)[1].tolist() == [True, False, False]
    strong = torch.tensor([[1.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = (F.cross_entropy(strong[0:1], pseudo[0:1]) + F.cross_entropy(strong[2:3], pseudo[2:3])) / 3
    assert fixmatch_unlabeled_loss(strong, pseudo, mask) == pytest.approx(float(expected))  # mean over all 3
    assert ramp_weight(0, 10, 60, 3.0) == 0.0 and ramp_weight(9, 10, 60, 3.0) == 0.0
    assert ramp_weight(35, 10, 60, 3.0) == 1.5 and ramp_weight(60, 10, 60, 3.0) == ramp_weight(99, 10, 60, 3.0) == 3.0


def test_cutout_fills_exactly_one_square_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    boxes = sample_cutout_boxes(8, 16, 16, (0.25, 0.5), g, "cpu")
    y = cutout(x, boxes)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last) and (x == 1).all()
    for img, (top, left, side) in zip(y, boxes.tolist()):
        assert 4 <= side <= 8 and 0 <= top <= 16 - side and 0 <= left <= 16 - side
        filled = img == 0
        assert (filled == filled[0:1]).all()  # every channel alike
        assert filled[0].sum() == side * side and filled[0, top:top + side, left:left + side].all()
        assert (img[~filled] == 1).all()
    assert torch.equal(cutout(x.clone(), boxes, out=None), y) and torch.equal(cutout(x, boxes, out=x), y)


def test_strong_and_training_views_shapes():
    images = torch.from_numpy(_images(2, seed=0)[0]).permute(0, 3, 1, 2)  # uint8 (8, 3, 16, 16)
    weak = AugConfig(size=16, crop_scale=(0.5, 1.0), jitter_p=0, gray_p=0)
    for mode, chans in (("rgb", 3), ("lab_l", 1)):
        s = strong_augment(images, strong_view(weak), torch.Generator().manual_seed(0), mode)
        assert s.shape == (8, chans, 16, 16) and s.dtype == torch.float32 and torch.isfinite(s).all()
        assert s.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(s, strong_augment(images, strong_view(weak), torch.Generator().manual_seed(0), mode))
    # a full, unflipped crop at the same size is the evaluation input, in either mode
    identity = AugConfig(size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0, gray_p=0)
    for mode in ("rgb", "lab_l"):
        a = augment_input(images, identity, torch.Generator().manual_seed(0), mode)
        assert torch.allclose(a, eval_input(images, identity, mode), atol=1e-4)


def test_cli_finetune_fraction(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "random:convnet", "--protocol", "finetune", "--fraction", "0.5", "--epochs", "1",
            "--batch-size", "16", "--train", str(tiny_dataset), "--test", str(tiny_dataset), "--out", str(out),
            "--image-size", "16", "--no-progress"]
    assert main(args) == 0
    saved = json.loads((out / "finetune_0.5.json").read_text())
    assert saved["fraction"] == 0.5 and saved["n_labeled"] == 32 and saved["steps"] == 2 and 0 <= saved["top1"] <= 1
    assert "finetune_0.5.json" in capsys.readouterr().out
    assert main(args[:3] + ["knn", "--fraction", "0.5"] + args[10:]) == 2  # --fraction is for the fraction protocols


def test_steps_fix_the_budget_of_every_fraction(tiny_dataset, tmp_path):
    """--steps N gives N optimizer steps whatever the fraction (and overrides --epochs)."""
    from selfsup.evaluate.finetune import count_steps

    assert count_steps(8, None, 3) == 3 and count_steps(8, 2, 3) == 3 and count_steps(8, 2) == 16
    assert count_steps(8, None) == 500 and count_steps(1000, None) == 10_000
    out = tmp_path / "eval"
    for fraction in ("0.25", "1.0"):
        args = ["evaluate", "random:convnet", "--protocol", "finetune", "--fraction", fraction, "--steps", "3",
                "--epochs", "5", "--batch-size", "8", "--train", str(tiny_dataset), "--test", str(tiny_dataset),
                "--out", str(out), "--image-size", "16", "--no-progress"]
        assert main(args) == 0
        saved = json.loads((out / f"finetune_{float(fraction):g}.json").read_text())
        assert saved["steps"] == 3 and saved["epochs"] != 5
    args[args.index("--steps") + 1] = "0"
    assert main(args) == 2  # a clear error, not a crash
    assert main(["evaluate", "random:convnet", "--protocol", "knn", "--steps", "3", "--train", str(tiny_dataset),
                 "--test", str(tiny_dataset), "--out", str(out), "--image-size", "16"]) == 2

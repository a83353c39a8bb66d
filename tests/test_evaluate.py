import json
import math

import numpy as np
import pytest
import torch

from selfsup.config import ConfigError
from selfsup.evaluate import balanced_subset, evaluate, knn_predict, linear_probe


def test_knn_weighted_votes_match_hand_computation():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[0.6, 0.8], [2.0, 0.1]])
    # by hand, k=3, T=0.5: cosine sims of test0 to train: 0.6, 0.96, 0.8, -0.6 -> top3 = idx 1,2,0
    # votes: class1 = e^(0.96/0.5) + e^(0.8/0.5) = 6.82 + 4.95; class0 = e^(0.6/0.5) = 3.32 -> class 1
    # test1 ~ (1, 0.05): sims 0.9988, 0.8293, 0.0499, -0.9988 -> top3 = 0,1,2
    # class0 = e^(1.9975) = 7.37; class1 = e^(1.6586)+e^(0.0998) = 5.25+1.10 = 6.36 -> class 0
    preds = knn_predict(train, labels, test, num_classes=3, k=3, temperature=0.5)
    assert preds.tolist() == [1, 0]
    # with T large, votes become counts: test1's top3 holds one class-0 and two class-1 neighbours -> class 1
    assert knn_predict(train, labels, test, num_classes=3, k=3, temperature=100.0).tolist() == [1, 1]
    # k is capped at the training set size
    assert knn_predict(train, labels, test, num_classes=3, k=200).shape == (2,)


def test_linear_probe_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    r = linear_probe(x[:200], y[:200], x[200:], y[200:], num_classes=3, epochs=20)
    assert r["top1"] > 0.95 and r["train_top1"] > 0.95
    noise = torch.randn(300, 16, generator=g)
    chance = linear_probe(noise[:200], y[:200], noise[200:], y[200:], num_classes=3, epochs=20)
    assert chance["top1"] < 0.6


def test_balanced_subset_is_balanced_and_deterministic():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a = balanced_subset(labels, 10, seed=0)
    assert np.bincount(labels[a]).tolist() == [10, 10, 10]
    assert np.array_equal(a, balanced_subset(labels, 10, seed=0))
    assert not np.array_equal(a, balanced_subset(labels, 10, seed=1))


def test_evaluate_random_baseline_writes_json(tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    r = evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                 progress=False)
    saved = json.loads((out / "knn.json").read_text())
    assert saved["top1"] == r["top1"] and 0.0 <= r["top1"] <= 1.0
    assert saved["n_train"] == 64 and saved["n_test"] == 32 and saved["num_classes"] == 4
    lin = evaluate("random:convnet", "linear", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                   labels_per_class=5, progress=False)
    assert lin["n_train"] == 20 and math.isfinite(lin["top1"])


def test_evaluate_errors_are_clear(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="--out"):
        evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset))
    with pytest.raises(ConfigError, match="no checkpoint"):
        evaluate(str(tmp_path / "nope"), "knn", str(tiny_dataset), str(tiny_dataset))
    with pytest.raises(ConfigError, match="unknown backbone"):
        evaluate("random:vgg99", "knn", str(tiny_dataset), str(tiny_dataset), out=tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(ConfigError, match="no labels"):
        evaluate("random:convnet", "knn", str(flat), str(flat), out=tmp_path)


def test_linear_probe_picks_weight_decay_on_a_validation_split():
    from selfsup.evaluate.linear import stratified_split

    labels = np.array([0] * 40 + [1] * 20 + [2] * 10)
    tr, va = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[va]).tolist() == [4, 2, 1] and len(np.intersect1d(tr, va)) == 0
    assert len(tr) + len(va) == len(labels) and np.array_equal(va, stratified_split(labels, 0.1, seed=0)[1])
    # few samples, many noisy dimensions: strong decay should win on validation over none
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.randn(60, 200, generator=g)
    x[:, 0] += 2.0 * (2 * y - 1)
    r = linear_probe(x[:40], y[:40], x[40:], y[40:], num_classes=2, epochs=50)
    assert set(r["val_top1"]) == {"0.0", "0.001", "0.01", "0.1", "1.0"}
    assert r["val_top1"][str(r["weight_decay"])] == max(r["val_top1"].values())
    single = linear_probe(x[:40], y[:40], x[40:], y[40:], num_classes=2, epochs=5, weight_decays=(1e-4,))
    assert single["weight_decay"] == 1e-4 and single["val_top1"] == {}


def test_retrieval_scores_match_hand_computation():
    from selfsup.evaluate.retrieval import retrieval_scores

    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    gl = torch.tensor([0, 1, 0, 1])
    q = torch.tensor([[1.0, 0.05]])
    # ranking by cosine: idx 0 (label 0), 1 (1), 2 (0), 3 (1); query label 0 -> relevant at ranks 1 and 3
    r = retrieval_scores(gallery, gl, q, torch.tensor([0]), ks=(1, 2, 4))
    assert r["precision@1"] == 1.0 and r["precision@2"] == 0.5 and r["precision@4"] == 0.5
    assert r["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_stage_grid_caps_the_probe_size():
    from selfsup.evaluate.features import stage_grid

    assert stage_grid(64, 32, 2048) == 5 and 64 * 25 <= 2048
    assert stage_grid(512, 4, 2048) == 2 and stage_grid(4096, 4, 2048) == 1 and stage_grid(3, 2, 2048) == 2


def test_layers_and_retrieval_protocols_write_json(tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    r = evaluate("random:convnet", "layers", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                 progress=False)
    saved = json.loads((out / "layers.json").read_text())
    assert list(saved["layers"]) == ["block1", "block2", "block3", "block4"]
    assert saved["top1"] == max(v["top1"] for v in saved["layers"].values()) == r["top1"]
    assert all(v["dim"] <= 2048 for v in saved["layers"].values())
    r = evaluate("random:convnet", "retrieval", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                 progress=False)
    saved = json.loads((out / "retrieval.json").read_text())
    assert saved["top1"] == saved["precision@1"] and 0 <= saved["map"] <= 1 and "precision@20" in saved


def test_features_are_cached_per_weights_and_split(tiny_dataset, tmp_path, monkeypatch):
    """knn then linear on one run extract each split once; new weights or a partial array miss."""
    import selfsup.evaluate.features as features
    from selfsup.data import load_images
    from selfsup.evaluate import load_encoder

    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda enc, images, *a, **k: calls.append(len(images))
                        or real(enc, images, *a, **k))
    out = tmp_path / "eval"
    knn = evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                   progress=False)
    assert calls == [64, 32]
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
    evaluate("random:convnet", "linear", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
             progress=False)
    again = evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset), out=out, image_size=16,
                     progress=False)
    assert calls == [64, 32] and again["top1"] == knn["top1"]  # both splits came from the cache

    enc = load_encoder("random:convnet", image_size=16)
    train = load_images(str(tiny_dataset), split="train", image_size=16)
    features.precise_bn(enc, train.images, "cpu")  # as evaluate() did: the same statistics, the same key
    direct = real(enc, train.images)
    assert torch.equal(features.cached_features(enc, train.images), direct)  # a hit equals extraction
    assert len(calls) == 2
    with torch.no_grad():  # other weights: a miss
        next(enc.backbone.parameters()).add_(1.0)
    features.cached_features(enc, train.images)
    assert calls[-1] == 64 and len(calls) == 3
    files = list((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(files) == 3
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)  # the changed weights' train features
    newest.write_bytes(b"garbage")  # a damaged file is extracted again and rewritten, not an error
    assert features.cached_features(enc, train.images).shape == direct.shape and len(calls) == 4
    features.cached_features(enc, train.images)
    assert len(calls) == 4  # rewritten: a hit again
    # part of a split (a view of the cache file): a key of its own (its offset, shape and strides)
    part = features.cached_features(enc, train.images[:10])
    assert torch.equal(features.cached_features(enc, train.images[:10]), part) and calls[-1] == 10 and len(calls) == 5
    features.cached_features(enc, train.images[10:20])
    assert len(calls) == 6  # another part: a miss
    copy = np.array(train.images[:10])  # an in-memory array has no stable identity: never cached
    features.cached_features(enc, copy)
    features.cached_features(enc, copy)
    assert len(calls) == 8
    monkeypatch.setenv("SELFSUP_FEATURE_CACHE", "0")
    features.cached_features(enc, train.images)
    assert len(calls) == 9


# --------------------------------------------------------------------------------------------------
# precise BN: BatchNorm statistics of the evaluation views


def _images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    from conftest import oriented_image

    return np.stack([oriented_image(rng, size, i % 4) for i in range(n)])


def test_precise_bn_sets_the_statistics_of_the_eval_views_by_hand():
    from selfsup.data.views import AugConfig, eval_input
    from selfsup.evaluate.features import load_encoder, precise_bn

    enc = load_encoder("random:convnet", image_size=16)
    images = _images(24)
    bn = [m for m in enc.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    seen = []
    hook = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().float()))
    x = eval_input(torch.from_numpy(images).permute(0, 3, 1, 2), AugConfig(size=16, mean=enc.mean, std=enc.std))
    enc.backbone.eval()(x)  # the first BN's input does not depend on any BN statistics
    hook.remove()
    a = seen[0]
    assert precise_bn(enc, images, "cpu", batch_size=64) == 24  # one batch: the statistics are exact
    assert torch.allclose(bn.running_mean, a.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, a.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1 and not enc.backbone.training  # put back as it was


def test_precise_bn_changes_features_after_training_on_tiles_and_nothing_else():
    from selfsup.evaluate.features import extract_features, load_encoder, precise_bn

    images = _images(32)
    enc = load_encoder("random:convnet", image_size=16)
    # as a jigsaw run leaves it: running statistics of small tiles (8 px crops, another intensity range)
    tiles = torch.from_numpy(images[:, 4:12, 4:12]).permute(0, 3, 1, 2).float() / 255 * 3 - 2
    enc.backbone.train()
    with torch.no_grad():
        for _ in range(30):
            enc.backbone(tiles)
    enc.backbone.eval()
    stale = extract_features(enc, images, "cpu")
    assert precise_bn(enc, images, "cpu", batch_size=16) == 32
    fixed = extract_features(enc, images, "cpu")
    assert (stale - fixed).abs().max() > 0.1 * fixed.abs().max()  # the statistics were wrong for whole images
    weights = {k: v.clone() for k, v in enc.backbone.state_dict().items() if "running" not in k}
    assert precise_bn(enc, images, "cpu", batch_size=16) == 32  # again: the same statistics, same features
    assert torch.allclose(extract_features(enc, images, "cpu"), fixed, atol=1e-4)
    assert all(torch.equal(v, enc.backbone.state_dict()[k]) for k, v in weights.items())  # weights untouched

    vit = load_encoder("random:vit_micro", image_size=16)  # no BatchNorm: nothing to re-estimate
    before = extract_features(vit, images, "cpu")
    assert precise_bn(vit, images, "cpu") == 0
    assert torch.equal(extract_features(vit, images, "cpu"), before)


def test_evaluate_records_precise_bn_and_can_skip_it(tiny_dataset, tmp_path):
    on = evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset), out=tmp_path / "on", image_size=16,
                  progress=False)
    off = evaluate("random:convnet", "knn", str(tiny_dataset), str(tiny_dataset), out=tmp_path / "off",
                   image_size=16, progress=False, precise_bn_stats=False)
    assert on["precise_bn"] == 64 and off["precise_bn"] == 0
    assert json.loads((tmp_path / "on" / "knn.json").read_text())["precise_bn"] == 64


def test_holdout_split_is_stratified_disjoint_and_seeded():
    from selfsup.evaluate import holdout_split

    labels = np.array([0] * 10 + [1] * 5 + [-1] * 3 + [2] * 1)
    tr, te = holdout_split(labels, 0.2)
    # by hand: class 0 -> round(2.0) = 2 held out, class 1 -> round(1.0) = 1, class 2 (1 image) -> 1 (at least 1)
    assert np.bincount(labels[te], minlength=3).tolist() == [2, 1, 1]
    assert np.bincount(labels[tr], minlength=3).tolist() == [8, 4, 0]
    assert not set(tr) & set(te) and set(tr) | set(te) == set(np.flatnonzero(labels >= 0))  # unlabeled: neither
    again = holdout_split(labels, 0.2)
    assert np.array_equal(again[1], te) and not np.array_equal(holdout_split(labels, 0.2, seed=1)[1], te)
    with pytest.raises(ConfigError, match="test-fraction"):
        holdout_split(labels, 1.0)


def test_evaluation_on_any_labeled_folder(tmp_path):
    """A train/ + val/ layout tests on val/; a plain class-folder tree with --test-fraction holds out
    a stratified part of it; the same plain folder as train and test, a folder with no test split and
    no test at all are refused in one line."""
    from conftest import make_folder

    from selfsup.cli import main
    from selfsup.data import DataError

    tv = tmp_path / "tv"
    make_folder(tv / "train", 12, seed=0)
    make_folder(tv / "val", 3, seed=1)
    r = evaluate("random:convnet", "knn", tv, tv, out=tmp_path / "e1", image_size=16, k=5, progress=False)
    assert r["test_split"] == "val" and r["n_test"] == 12 and r["n_train"] == 48

    plain = make_folder(tmp_path / "plain", 8, seed=2)  # 4 classes x 8 images, no split folders
    r = evaluate("random:convnet", "linear", plain, out=tmp_path / "e2", image_size=16, test_fraction=0.25,
                 progress=False)
    assert r["n_test"] == 8 and r["n_train"] == 24 and "held out" in r["test_split"]
    with pytest.raises(ConfigError, match="would be the training images"):
        evaluate("random:convnet", "knn", plain, plain, out=tmp_path / "e3", image_size=16, progress=False)
    other = make_folder(tmp_path / "other", 2, seed=3)  # a plain folder of other images is a test set
    assert evaluate("random:convnet", "knn", plain, other, out=tmp_path / "e4", image_size=16, k=5,
                    progress=False)["n_test"] == 8

    tu = tmp_path / "tu"
    make_folder(tu / "train", 2, seed=4)
    make_folder(tu / "unlabeled", 2, seed=5)
    with pytest.raises(DataError, match="--test-split"):
        evaluate("random:convnet", "knn", tu, tu, out=tmp_path / "e5", image_size=16, progress=False)
    assert evaluate("random:convnet", "knn", tu, tu, out=tmp_path / "e6", image_size=16, k=3, progress=False,
                    test_split="unlabeled")["n_test"] == 8
    assert main(["evaluate", "random:convnet", "--protocol", "knn", "--train", str(plain), "--out",
                 str(tmp_path / "e7"), "--no-progress"]) == 2
    assert main(["evaluate", "random:convnet", "--protocol", "knn", "--train", str(plain), "--test-fraction",
                 "0.5", "--image-size", "16", "--k", "5", "--out", str(tmp_path / "e8"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e8" / "knn.json").read_text())["n_test"] == 16

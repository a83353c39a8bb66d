"""Kept classifiers (linear, finetune, ...), ``selfsup predict``, per-class accuracy and the
confusion matrix in the results json."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from selfsup.cli import main
from selfsup.evaluate import evaluate
from selfsup.evaluate.classifier import class_scores, find_classifier, load_classifier, predict_folder


def test_class_scores_by_hand():
    pred, y = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, -1])  # the -1 (unlabeled) is not scored
    r = class_scores(pred, y, ["a", "b", "c", "d"])
    assert r["per_class_top1"] == {"a": 1.0, "b": 1.0, "c": 0.5, "d": None}
    assert r["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_linear_keeps_its_classifier_and_predict_reproduces_its_accuracy(tiny_dataset, tmp_path, capsys):
    ev = tmp_path / "ev"
    r = evaluate("random:convnet", "linear", tiny_dataset, tiny_dataset, out=ev, image_size=16, progress=False)
    cm = torch.tensor(r["confusion"])
    assert cm.shape == (4, 4) and int(cm.sum()) == r["n_test"] == 32
    assert float(cm.diag().sum()) / 32 == pytest.approx(r["top1"])  # the matrix is of the reported predictions
    assert set(r["per_class_top1"]) == {"class0", "class1", "class2", "class3"}
    saved = json.loads((ev / "linear.json").read_text())
    assert saved["classifier"] == str(ev / "linear.classifier.safetensors")

    model, meta = load_classifier(saved["classifier"])  # self-contained: no run directory needed
    assert meta["classes"] == ["class0", "class1", "class2", "class3"] and meta["protocol"] == "linear"
    summary = predict_folder(saved["classifier"], str(tiny_dataset), tmp_path / "p.csv", split="test",
                             progress=False)
    assert summary["n"] == 32 and summary["top1"] == pytest.approx(r["top1"], abs=1 / 32)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 32 and rows[0].keys() == {"file", "predicted", "confidence", "top4", "label"}
    assert all(0 < float(row["confidence"]) <= 1 and row["top4"].startswith(row["predicted"] + ":") for row in rows)

    assert main(["predict", str(ev), "--data", str(tiny_dataset), "--split", "test", "--no-progress",
                 "--top-k", "2"]) == 0
    assert "predicted 32 images" in capsys.readouterr().out
    assert "top2" in (ev / "predictions.csv").read_text().splitlines()[0]

    knn = evaluate("random:convnet", "knn", tiny_dataset, tiny_dataset, out=ev, image_size=16, k=5, progress=False)
    assert float(torch.tensor(knn["confusion"]).diag().sum()) / 32 == pytest.approx(knn["top1"])


def test_finetune_keeps_its_model_and_bad_classifiers_are_one_line(tiny_dataset, tmp_path, capsys):
    ev = tmp_path / "ev"
    r = evaluate("random:convnet", "finetune", tiny_dataset, tiny_dataset, out=ev, image_size=16, fraction=0.5,
                 steps=4, batch_size=16, progress=False)
    path = ev / "finetune_0.5.classifier.safetensors"
    assert r["classifier"] == str(path) and "confusion" in r
    model, meta = load_classifier(path)
    assert meta["protocol"] == "finetune"
    assert find_classifier(ev) == path  # the only one there
    evaluate("random:convnet", "linear", tiny_dataset, tiny_dataset, out=ev, image_size=16, progress=False)
    assert find_classifier(ev).name == "linear.classifier.safetensors"  # several: linear by default
    assert find_classifier(ev, "finetune_0.5") == path

    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert main(["predict", str(ev), "--classifier", "finetune_0.5", "--data", str(tiny_dataset),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a usable classifier" in err and "Traceback" not in err
    assert main(["predict", str(tmp_path), "--data", str(tiny_dataset), "--no-progress"]) == 2
    assert "no classifier in" in capsys.readouterr().err

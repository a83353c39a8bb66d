import logging
import math

import pytest
import torch

from selfsup.configure import build_config
from selfsup.monitor import collapse_warning, embedding_health, rankme
from selfsup.train import Trainer
from selfsup.run import read_metrics


def test_rankme_matches_hand_computation():
    # singular values 3 and 1: p = (0.75, 0.25), RankMe = exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548
    f = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert rankme(f) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-4)
    assert rankme(torch.eye(5)) == pytest.approx(5.0, rel=1e-4)


def test_health_is_measured_on_normalised_features():
    """RankMe of the L2-normalised rows: two orthogonal rows of norms 3 and 1 have effective rank 2
    (1.75 unnormalised, above); their scale says nothing about collapse."""
    f = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert embedding_health(f)["rankme"] == pytest.approx(2.0, rel=1e-4)
    assert embedding_health(f * 100)["rankme"] == pytest.approx(embedding_health(f)["rankme"])


def test_low_rank_warning_fires_at_the_calibrated_ranks_and_not_on_healthy_ones():
    """d = 256, N = 512 (the trainer's health set): the threshold is 5% of 256 = 12.8. The one-epoch
    table's runs below random init had ranks 6 (SwAV) and 11 (BYOL); the healthy ones 36-102."""
    def health(rank):
        return {"feat_std": 0.03, "rankme": rank, "n": 512}

    for bad in (6.0, 11.0):
        assert "few dimensions" in collapse_warning(health(bad), 256)
    for good in (36.0, 102.0):
        assert collapse_warning(health(good), 256) is None
    # a real embedding that spans 8 of 256 directions (plus a little noise) is flagged
    g = torch.Generator().manual_seed(0)
    low = torch.randn(512, 8, generator=g) @ torch.randn(8, 256, generator=g) + 0.01 * torch.randn(512, 256, generator=g)
    h = embedding_health(low)
    assert 4 < h["rankme"] < 12.8 and "few dimensions" in collapse_warning(h, 256)
    full = embedding_health(torch.randn(512, 256, generator=g))
    assert full["rankme"] > 150 and collapse_warning(full, 256) is None


def test_healthy_and_collapsed_embeddings():
    g = torch.Generator().manual_seed(0)
    healthy = embedding_health(torch.randn(512, 64, generator=g))
    assert healthy["feat_std"] == pytest.approx(1 / 8, rel=0.1) and healthy["rankme"] > 40
    assert collapse_warning(healthy, 64) is None
    point = embedding_health(torch.ones(512, 64) + 1e-6 * torch.randn(512, 64, generator=g))
    assert point["feat_std"] < 1e-4 and collapse_warning(point, 64) is not None
    line = embedding_health(torch.randn(512, 1, generator=g) * torch.randn(1, 64, generator=g))  # rank 1
    assert line["rankme"] < 1.5 and "collapsing" in collapse_warning(line, 64)


def test_a_provoked_collapse_is_logged_and_warned(tiny_dataset, tmp_path, caplog):
    cfg = build_config("rotation", {"model": {"backbone": "convnet"},
                                    "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                    "train": {"epochs": 2, "batch_size": 16}})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    last_bn = trainer.method.backbone.stages[-1][4]  # the last BatchNorm before the final ReLU
    with torch.no_grad():  # every feature becomes relu(0) = 0: the embedding collapses to a point
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    last_bn.weight.requires_grad_(False)
    last_bn.bias.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        trainer.fit()
    assert "representation is collapsing" in caplog.text
    epoch_rows = [r for r in read_metrics(tmp_path / "run") if r["feat_std"]]
    assert len(epoch_rows) == 2 and float(epoch_rows[-1]["feat_std"]) == 0.0


def test_healthy_run_logs_health_without_warning(tiny_dataset, tmp_path, caplog):
    cfg = build_config("rotation", {"model": {"backbone": "convnet"},
                                    "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                    "train": {"epochs": 2, "batch_size": 16}})
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert "collapsing" not in caplog.text
    rows = [r for r in read_metrics(tmp_path / "run") if r["feat_std"]]
    assert len(rows) == 2 and all(float(r["feat_std"]) > 0 and float(r["rankme"]) > 2 for r in rows)

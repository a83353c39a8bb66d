"""Every method draws its own task into RUN_DIR/figures (the README says so): the two-view methods'
view matching, rotation's predicted rotations, distill's teacher and student neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.configure import build_config
from selfsup.data import load_images
from selfsup.figures import view_matching
from selfsup.methods import METHODS
from selfsup.methods.base import Method
from selfsup.train import Trainer

TWO_VIEW = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "simclr_v2"]
SMALL = {"simclr": {"proj_hidden_dim": 32}, "moco_v2": {"proj_hidden_dim": 32, "queue_size": 64},
         "moco_v3": {"proj_hidden_dim": 32, "pred_hidden_dim": 32}, "byol": {"proj_hidden_dim": 32, "pred_hidden_dim": 32},
         "simsiam": {"proj_hidden_dim": 32, "proj_dim": 32, "pred_hidden_dim": 16},
         "barlow_twins": {"proj_hidden_dim": 32, "proj_dim": 32}, "vicreg": {"proj_hidden_dim": 32, "proj_dim": 32},
         "simclr_v2": {"proj_hidden_dim": 32}}


def test_every_method_has_a_picture_of_its_own_task():
    assert [n for n, m in METHODS.items() if m.figures is Method.figures] == []


def _png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 2000
    assert Image.open(path).size[0] > 100


def _method(name, **cfg):
    over = {"model": {"backbone": "convnet"}, "data": {"image_size": 16}, "params": SMALL.get(name, {})}
    over.update(cfg)
    return METHODS[name](build_config(name, over)).eval()


@pytest.mark.parametrize("name", TWO_VIEW)
def test_two_view_methods_draw_their_view_matching(name, tiny_dataset, tmp_path):
    data = load_images(str(tiny_dataset / "train"), image_size=16, progress=False)
    m = _method(name)
    paths = m.figures(data, tmp_path, torch.device("cpu"))
    assert [p.name for p in paths] == ["views.png"]
    _png(paths[0])


def test_view_matching_finds_every_partner_when_the_two_views_are_the_same(tiny_dataset):
    """With no randomness in the views (no crop, flip, colour), view 2 is view 1: every image's nearest
    second view is its own; with the preset's views of a random network, far fewer are."""
    fixed = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0,
             "blur_p": 0.0, "solarize_p": 0.0}
    images = torch.from_numpy(np.array(load_images(str(tiny_dataset / "train"), image_size=16,
                                                   progress=False).images)).permute(0, 3, 1, 2)
    m = _method("simclr", aug=fixed)
    x1, x2, nearest, hits = view_matching(m, images, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and bool(hits.all()) and torch.equal(nearest, torch.arange(len(images)))
    _, _, _, random_hits = view_matching(_method("simclr"), images, torch.Generator().manual_seed(0))
    assert int(random_hits.sum()) < len(images)


def test_rotation_and_distill_draw_their_task(tiny_dataset, tmp_path):
    data = load_images(str(tiny_dataset / "train"), image_size=16, progress=False)
    paths = _method("rotation").figures(data, tmp_path, torch.device("cpu"))
    assert [p.name for p in paths] == ["rotations.png"]
    _png(paths[0])
    teacher = Trainer(build_config("simclr", {"model": {"backbone": "convnet"},
                                              "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                              "train": {"epochs": 1, "batch_size": 16}, "params": SMALL["simclr"]}),
                      tmp_path / "teacher", progress=False)
    teacher.draw_figures = list
    teacher.fit()
    student = _method("distill", params={"teacher": str(tmp_path / "teacher"), "queue_size": 32})
    paths = student.figures(data, tmp_path / "distill", torch.device("cpu"))
    assert [p.name for p in paths] == ["neighbours.png"]
    _png(paths[0])

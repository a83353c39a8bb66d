"""Exported backbones (safetensors, torchvision layout) and embeddings written to disk."""


import numpy as np
import pytest
import torch
import torchvision

import selfsup
from selfsup.cli import main
from selfsup.configure import build_config
from selfsup.data.views import AugConfig, eval_view
from selfsup.evaluate import extract_features, load_encoder
from selfsup.export import export, load_backbone
from selfsup.train import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One resnet18 and one convnet run of 2 steps each (weights moved away from their init)."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("exp")
    data = make_folder(root / "data", 4, size=16)
    out = {}
    for backbone in ("resnet18", "convnet"):
        cfg = build_config("rotation", {"model": {"backbone": backbone}, "data": {"path": str(data), "image_size": 16,
                                        "cache_dir": str(root / "cache")},
                                        "train": {"epochs": 1, "batch_size": 8, "ckpt_every": 1000}})
        Trainer(cfg, root / backbone, progress=False).fit()
        out[backbone] = root / backbone
    out["data"] = data
    return out


def _images(n=6, size=16):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("backbone", ["resnet18", "convnet"])
def test_safetensors_export_loads_identical_features(runs, tmp_path, backbone):
    path = export(runs[backbone], "safetensors", tmp_path)
    assert path.name == "backbone.safetensors"
    model, meta = selfsup.load_backbone(path, with_meta=True)
    enc = load_encoder(str(runs[backbone]))
    assert meta["spec"]["name"] == backbone and meta["spec"]["input"] == "rgb" and not model.training
    imgs = _images()
    ref = extract_features(enc, imgs, "cpu")
    enc.backbone = model
    enc.precision = "fp32"
    enc2 = load_encoder(str(runs[backbone]))
    enc2.precision = "fp32"
    assert torch.allclose(extract_features(enc, imgs, "cpu"), extract_features(enc2, imgs, "cpu"), atol=0, rtol=0)
    assert ref.shape == (6, model.out_dim)


def test_torchvision_export_is_a_plain_torchvision_resnet(runs, tmp_path):
    path = export(runs["resnet18"], "torchvision", tmp_path)
    state = torch.load(path, weights_only=True)
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state and not any(k.startswith("fc") for k in state)
    model, meta = load_backbone(path, with_meta=True)
    assert isinstance(model, torchvision.models.ResNet) and isinstance(model.fc, torch.nn.Identity)
    enc = load_encoder(str(runs["resnet18"]))
    x = eval_view(torch.from_numpy(_images()).permute(0, 3, 1, 2), AugConfig(size=16, mean=tuple(meta["mean"]),
                                                                            std=tuple(meta["std"])))
    with torch.no_grad():
        assert torch.allclose(model(x), enc.backbone(x), atol=1e-5)


def test_export_errors_are_clear(runs, tmp_path, capsys):
    assert main(["export", str(runs["convnet"]), "--format", "torchvision", "--out", str(tmp_path)]) == 2
    assert "exports ResNets" in capsys.readouterr().err
    with pytest.raises(selfsup.config.ConfigError, match="no exported backbone"):
        load_backbone(tmp_path / "missing.safetensors")


def test_embed_command_writes_features_files_and_labels(runs, tmp_path):
    out = tmp_path / "emb"
    assert main(["embed", str(runs["convnet"]), "--data", str(runs["data"]), "--out", str(out), "--no-progress"]) == 0
    feats = np.load(tmp_path / "emb.npy")
    files = (tmp_path / "emb.files.txt").read_text().splitlines()
    labels = np.load(tmp_path / "emb.labels.npy")
    assert feats.shape == (16, 256) and len(files) == 16 and sorted(set(labels.tolist())) == [0, 1, 2, 3]
    assert all(f.endswith(".png") for f in files)
    # row i is the embedding of file i
    enc = load_encoder(str(runs["convnet"]))
    from PIL import Image
    img = np.asarray(Image.open(files[5]).convert("RGB"))[None]
    assert np.allclose(feats[5], extract_features(enc, img, "cpu")[0].numpy(), atol=1e-4)

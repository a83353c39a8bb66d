"""torchvision:NAME backbones (any torchvision classification model without its classifier), their
pretrained weights from the local cache only (nothing downloads: a fake cache stands in), and the
off-the-shelf baseline pretrained:torchvision:NAME."""

from __future__ import annotations

import pytest
import torch
import torchvision

from selfsup.backbones import TorchvisionBackbone, build_backbone
from selfsup.config import ConfigError
from selfsup.configure import build_config


def test_any_torchvision_model_without_its_classifier_with_stage_maps():
    net = build_backbone("torchvision:resnet18", 32)
    assert isinstance(net, TorchvisionBackbone) and net.out_dim == 512
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 512)
    assert [m.shape[1] for m in net.forward_stages(x)] == [64, 128, 256, 512] == net.stage_dims
    eff = build_backbone("torchvision:efficientnet_b0", 32)  # classifier = Dropout + Linear: pooled 1280
    assert eff.out_dim == 1280 and eff(x).shape == (2, 1280) and len(eff.forward_stages(x)) == len(eff.stage_dims)
    with pytest.raises(ValueError, match="unknown torchvision"):
        build_backbone("torchvision:no_such_net")
    with pytest.raises(ConfigError, match="unknown torchvision"):
        build_config("simclr", {"model": {"backbone": "torchvision:no_such_net"}})
    with pytest.raises(ConfigError, match="needs a torchvision"):
        build_config("simclr", {"model": {"backbone": "convnet", "pretrained": True}})


def _fake_cache(tmp_path, monkeypatch) -> dict:
    """torch's hub cache pointed at tmp_path, holding a 'pretrained' resnet18 file (random weights)."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, hub / "checkpoints" / url.rsplit("/", 1)[1])
    return state


def test_pretrained_weights_come_from_the_cache_and_are_never_downloaded(tmp_path, monkeypatch, tiny_dataset):
    from selfsup.evaluate import evaluate, load_encoder

    empty = tmp_path / "empty"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(empty))
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone("torchvision:resnet18", 32, pretrained=True)
    state = _fake_cache(tmp_path, monkeypatch)
    net = build_backbone("torchvision:resnet18", 32, pretrained=True)
    assert torch.equal(net.model.conv1.weight, state["conv1.weight"])
    enc = load_encoder("pretrained:torchvision:resnet18", image_size=32)
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406)) and torch.equal(enc.backbone.model.conv1.weight,
                                                                            state["conv1.weight"])
    r = evaluate("pretrained:torchvision:resnet18", "knn", tiny_dataset, tiny_dataset, out=tmp_path / "ev",
                 image_size=16, k=5, progress=False)
    assert r["backbone"]["name"] == "torchvision:resnet18" and 0 <= r["top1"] <= 1


def test_a_run_on_a_torchvision_backbone_from_pretrained_weights(tmp_path, monkeypatch, tiny_dataset):
    from selfsup.evaluate import load_encoder
    from selfsup.train import Trainer

    state = _fake_cache(tmp_path, monkeypatch)
    cfg = build_config("rotation", {"model": {"backbone": "torchvision:resnet18", "pretrained": True},
                                    "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                    "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                                    "optim": {"warmup_epochs": 0}})
    t = Trainer(cfg, tmp_path / "run", progress=False)
    assert torch.equal(t.method.backbone.model.conv1.weight, state["conv1.weight"])  # the run starts from them
    t.fit()
    enc = load_encoder(tmp_path / "run")  # rebuilt from the spec, weights from the checkpoint
    assert enc.spec["name"] == "torchvision:resnet18"
    assert torch.equal(enc.backbone.model.conv1.weight, t.method.backbone.model.conv1.weight.cpu())

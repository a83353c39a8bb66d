"""timm:NAME backbones (any timm model without its classifier; timm's tiny ``test_*`` models here), their
stage maps (a ViT's patch tokens as maps), pretrained weights from the local Hugging Face cache only
(a fake cache stands in; nothing downloads), the off-the-shelf baseline pretrained:timm:NAME, and a
run that stores and rebuilds the spec."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is installed by the README's test command")

from selfsup.backbones import TimmBackbone, build_backbone  # noqa: E402
from selfsup.config import ConfigError  # noqa: E402
from selfsup.configure import build_config


def test_any_timm_model_without_its_classifier_with_stage_maps():
    net = build_backbone("timm:test_resnet", 32)
    assert isinstance(net, TimmBackbone) and net.out_dim == 96
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 96)
    maps = net.forward_stages(x)
    assert [m.shape[1] for m in maps] == net.stage_dims and maps[0].shape[-1] == 16  # stride 2 stem at 32 px
    vit = build_backbone("timm:test_vit", 32)  # built for 32 px: 16 px patches -> a 2 x 2 token map
    assert vit(x).shape == (2, vit.out_dim)
    assert all(m.shape[-2:] == (2, 2) for m in vit.forward_stages(x)) and len(vit.stage_dims) >= 1
    with pytest.raises(ValueError, match="unknown timm"):
        build_backbone("timm:no_such_net")
    with pytest.raises(ConfigError, match="unknown timm"):
        build_config("simclr", {"model": {"backbone": "timm:no_such_net"}})
    build_config("simclr", {"model": {"backbone": "timm:test_resnet", "pretrained": True}})  # valid spec


def _fake_hf_cache(tmp_path, monkeypatch) -> dict:
    """$HF_HUB_CACHE pointed at tmp_path, holding 'pretrained' test_resnet weights (seeded random)."""
    from safetensors.torch import save_file

    cache = tmp_path / "hf"
    repo = cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    torch.manual_seed(321)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return state


def test_timm_pretrained_weights_come_from_the_cache_and_are_never_downloaded(tmp_path, monkeypatch, tiny_dataset):
    from selfsup.evaluate import evaluate, load_encoder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone("timm:test_resnet", 32, pretrained=True)
    state = _fake_hf_cache(tmp_path, monkeypatch)
    net = build_backbone("timm:test_resnet", 32, pretrained=True)
    first = next(k for k in state if k.endswith("conv1.weight") or k.endswith("conv.weight"))
    assert torch.equal(net.model.state_dict()[first], state[first])
    enc = load_encoder("pretrained:timm:test_resnet", image_size=32)
    assert enc.mean == pytest.approx((0.5, 0.5, 0.5)) and enc.spec["name"] == "timm:test_resnet"
    r = evaluate("pretrained:timm:test_resnet", "knn", tiny_dataset, tiny_dataset, out=tmp_path / "ev",
                 image_size=16, k=5, progress=False)
    assert r["backbone"]["name"] == "timm:test_resnet" and 0 <= r["top1"] <= 1


def test_a_run_on_a_timm_backbone_stores_its_spec_and_rebuilds(tmp_path, tiny_dataset):
    from selfsup.evaluate import load_encoder
    from selfsup.train import Trainer

    cfg = build_config("rotation", {"model": {"backbone": "timm:test_resnet"},
                                    "data": {"path": str(tiny_dataset / "train"), "image_size": 16},
                                    "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                                    "optim": {"warmup_epochs": 0}})
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.fit()
    enc = load_encoder(tmp_path / "run")
    assert enc.spec["name"] == "timm:test_resnet"
    for k, v in enc.backbone.state_dict().items():
        assert torch.equal(v, t.method.backbone.state_dict()[k].cpu()), k

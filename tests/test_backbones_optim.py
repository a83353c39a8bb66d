import pytest
import torch

from selfsup.backbones import build_backbone
from selfsup.optim import LARS


@pytest.mark.parametrize("name, dims", [("resnet18", [64, 64, 128, 256, 512]), ("convnet", [32, 64, 128, 256])])
def test_backbone_stages_and_pooled_features(name, dims):
    m = build_backbone(name, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = m.forward_stages(x)
    assert [f.shape[1] for f in maps] == dims == m.stage_dims
    assert len(m.stage_names) == len(dims)
    feats = m(x)
    assert feats.shape == (2, m.out_dim) == (2, dims[-1])
    assert torch.allclose(feats, maps[-1].mean(dim=(2, 3)), atol=1e-6)


def test_small_image_stem_keeps_resolution():
    small = build_backbone("resnet18", image_size=32)
    assert small.stages[0][0].kernel_size == (3, 3) and small.stages[0][0].stride == (1, 1)
    assert isinstance(small.stages[0][3], torch.nn.Identity)  # no max-pool
    assert small.forward_stages(torch.randn(1, 3, 32, 32))[-1].shape[-1] == 4  # 32 / 8
    big = build_backbone("resnet18", image_size=224)
    assert big.stages[0][0].kernel_size == (7, 7)
    assert big.forward_stages(torch.randn(1, 3, 64, 64))[-1].shape[-1] == 2  # 64 / 32
    assert build_backbone("resnet50", image_size=32).out_dim == 2048


def test_lars_update_matches_the_formula_and_excludes_biases():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.02)
    w.grad = torch.tensor([1.0, 0.0])
    b.grad = torch.tensor([2.0])
    opt.step()
    g = torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([3.0, 4.0])  # (2.5, 2.0), norm sqrt(10.25)
    trust = 0.02 * 5.0 / g.norm()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * g, atol=1e-7)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # plain SGD, no decay
    # second step: momentum accumulates
    b.grad = torch.tensor([2.0])
    w.grad = torch.zeros(2)
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.8 - 0.1 * (0.9 * 2.0 + 2.0)]))


def test_vit_backbones_take_any_size_mask_tokens_and_expose_stages():
    import torch

    from selfsup.backbones import build_backbone, vit_patch_size

    assert (vit_patch_size(32), vit_patch_size(64), vit_patch_size(224)) == (4, 8, 16)
    m = build_backbone("vit_tiny", 16).eval()
    x = torch.randn(3, 3, 16, 16)
    assert m(x).shape == (3, 192) and m(torch.randn(2, 3, 8, 8)).shape == (2, 192)  # smaller crops: pos. interp.
    maps = m.forward_stages(x)
    assert [t.shape for t in maps] == [(3, 192, 4, 4)] * 4 and m.stage_names == ["block3", "block6", "block9", "block12"]
    tokens = m.forward_tokens(x)
    assert torch.allclose(tokens[:, 1:], maps[-1].flatten(2).transpose(1, 2), atol=1e-5)  # last tap = final tokens
    assert torch.allclose(tokens[:, 0], m(x), atol=1e-6)
    # keeping every patch in order is the unmasked forward; keeping a subset encodes only those
    keep_all = torch.arange(16).expand(3, -1)
    assert torch.allclose(m.forward_tokens(x, keep_all), tokens, atol=1e-5)
    assert m.forward_tokens(x, torch.stack([torch.randperm(16)[:4] for _ in range(3)])).shape == (3, 5, 192)
    assert build_backbone("vit_tiny", 16, in_chans=1)(torch.randn(2, 1, 16, 16)).shape == (2, 192)


def test_multi_crop_views():
    import torch

    from selfsup.data.views import AugConfig, multi_crop

    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    g, loc = multi_crop(imgs, AugConfig(size=32), torch.Generator().manual_seed(0), n_global=2, n_local=3)
    assert g.shape == (8, 3, 32, 32) and loc.shape == (12, 3, 12, 12)
    g2, _ = multi_crop(imgs, AugConfig(size=32), torch.Generator().manual_seed(0), n_global=2, n_local=3)
    assert torch.equal(g, g2) and not torch.equal(g[:4], g[4:])
    assert multi_crop(imgs, AugConfig(size=32), torch.Generator(), n_local=0)[1] is None

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
               lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.02, clip=False)
    w.grad = torch.tensor([1.0, 0.0])  # ||g|| = 1
    b.grad = torch.tensor([2.0])
    opt.step()
    # paper Eq. 6: local = eta ||w|| / (||g|| + wd ||w||) = 0.02 * 5 / (1 + 2.5) = 0.1 / 3.5
    d = torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([3.0, 4.0])  # g + wd w = (2.5, 2.0)
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * (0.1 / 3.5) * d, atol=1e-7)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # plain SGD, no decay
    # second step: momentum accumulates
    b.grad = torch.tensor([2.0])
    w.grad = torch.zeros(2)
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.8 - 0.1 * (0.9 * 2.0 + 2.0)]))


def test_lars_clip_caps_the_layer_rate_at_the_global_rate_as_solo_learn():
    """solo-learn's clip_lr: local = min(eta ||w|| / (||g|| + wd ||w||) / lr, 1). A layer with a tiny
    gradient moves by lr * g (plain SGD), not by lr * eta * ||w|| as without the clip."""
    def one_step(clip, grad):
        w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        opt = LARS([{"params": [w]}], lr=0.5, momentum=0.9, weight_decay=0.0, eta=0.02, clip=clip)
        w.grad = grad.clone()
        opt.step()
        return torch.tensor([3.0, 4.0]) - w.detach()  # the step taken

    tiny = torch.tensor([1e-4, 0.0])
    # no clip: local = 0.02 * 5 / 1e-4 = 1000, step = 0.5 * 1000 * g = (0.05, 0): far larger than SGD's
    assert torch.allclose(one_step(False, tiny), torch.tensor([0.05, 0.0]), atol=1e-5)
    # clip: local = min(1000 / 0.5, 1) = 1, the step is plain SGD's, lr * g
    assert torch.allclose(one_step(True, tiny), 0.5 * tiny, rtol=1e-2, atol=0)
    # a large gradient: local = 0.02 * 5 / 10 = 0.01. With the clip the adapted rate is used as the
    # layer's rate (min(local, lr) = 0.01, step 0.01 * g = 0.1); without it, it scales lr (0.5 * 0.01 * g)
    big = torch.tensor([10.0, 0.0])
    assert torch.allclose(one_step(True, big), torch.tensor([0.1, 0.0]), atol=1e-6)
    assert torch.allclose(one_step(False, big), torch.tensor([0.05, 0.0]), atol=1e-6)


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

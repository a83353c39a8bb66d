"""The airbench backbone (Keller Jordan's CIFAR-10 speedrun network): its frozen whitening layer is
fitted from the training images (by the trainer, and for the random-init baseline by evaluation)."""

from __future__ import annotations

import torch

from selfsup.backbones import Airbench, build_backbone


def test_the_whitening_layer_whitens_the_patches_it_was_fitted_on():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 16, 16, generator=g)
    x = base + 0.8 * base.roll(1, dims=3) + 0.5 * base[:, :1]  # correlated neighbours and channels
    net = Airbench()
    assert net.whiten.weight.abs().sum() == 0 and not net.whiten.weight.requires_grad
    net.fit_data(x)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, net.whiten.weight[:12])  # the positive half, no bias
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    evals = torch.linalg.eigvalsh(cov)
    assert (cov - torch.diag(cov.diag())).abs().max() < 0.05  # decorrelated
    assert 0.9 < float(cov.diag()[0]) <= 1.0  # the largest component scaled to ~1 (eps = 5e-4)
    assert float(evals.max()) <= 1.0 + 1e-3
    assert torch.equal(net.whiten.weight[12:], -net.whiten.weight[:12])  # both signs, as airbench
    f = net(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 256) and [m.shape[1] for m in net.forward_stages(torch.randn(1, 3, 32, 32))] == \
        [24, 64, 256, 256]
    assert isinstance(build_backbone("airbench"), Airbench)


def test_runs_fit_the_whitening_in_every_copy_and_random_init_is_fitted_too(tiny_dataset, tmp_path):
    from selfsup.configure import build_config
    from selfsup.evaluate import evaluate, load_encoder
    from selfsup.train import Trainer

    cfg = build_config("byol", {"model": {"backbone": "airbench"}, "data": {"path": str(tiny_dataset / "train"),
                                                                           "image_size": 16},
                                "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                                "params": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}})
    t = Trainer(cfg, tmp_path / "run", progress=False)
    w = t.method.backbone.whiten.weight
    assert w.abs().sum() > 0 and torch.equal(w, t.method.target_backbone.whiten.weight)  # the EMA target too
    t.fit()
    assert torch.equal(load_encoder(tmp_path / "run").backbone.whiten.weight, w)  # frozen, and saved
    r = evaluate("random:airbench", "knn", tiny_dataset, tiny_dataset, out=tmp_path / "ev", image_size=16, k=5,
                 progress=False)
    assert r["top1"] > 0.4  # 4 classes: the fitted whitening makes a usable random baseline

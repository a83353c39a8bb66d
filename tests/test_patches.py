"""The ``patches`` method (Thiry et al. 2021): whitening, patch sampling and the q-nearest-atom codes
against hand computations; a run end to end (fit, checkpoint, resume, evaluate, export)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.methods.patches import Patches, sample_patches, whitening


def test_whitening_makes_the_covariance_the_identity_and_eps_shrinks_it_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    x = torch.randn(20000, 6, generator=g, dtype=torch.float64) @ a.double() + 3.0
    mu, w, evals = whitening(x, 0.0)
    white = (x - mu) @ w
    assert torch.allclose(white.T @ white / (len(x) - 1), torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(w, w.T)  # ZCA: symmetric
    # with eps: the whitened covariance has eigenvalues L / (L + eps * mean(L))
    mu, w, evals = whitening(x, 0.5)
    cov = ((x - mu) @ w).T @ ((x - mu) @ w) / (len(x) - 1)
    expect = evals / (evals + 0.5 * evals.mean())
    assert torch.allclose(torch.linalg.eigvalsh(cov), expect.sort().values, atol=1e-6)


def test_output_pca_whitening_by_hand():
    from selfsup.backbones import pca_whitening

    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    x = (torch.randn(40000, 6, generator=g) * scales) @ q.T + 2.0  # principal axes q, std = scales
    mu, proj, evals = pca_whitening(x, 3, 0.0)
    assert proj.shape == (6, 3) and torch.allclose(mu, x.mean(0), atol=1e-5)
    assert torch.allclose(evals, scales[:3] ** 2, rtol=0.03)  # the three largest variances, in order
    white = (x - mu) @ proj
    assert torch.allclose(white.T @ white / (len(x) - 1), torch.eye(3), atol=1e-3)
    for j in range(3):  # each output is one principal axis (up to its sign) over its std
        assert torch.allclose((proj[:, j] * scales[j]).abs(), q[:, j].abs(), atol=0.02)
    # the regulariser: variances L / (L + eps * mean(L)) of the kept L
    mu, proj, evals = pca_whitening(x, 3, 0.5)
    white = (x - mu) @ proj
    expect = evals / (evals + 0.5 * evals.mean())
    assert torch.allclose(white.var(0), expect, atol=1e-3)
    # fewer samples than dimensions: the axes without variance get no weight (no noise blown up)
    mu, proj, evals = pca_whitening(x[:3], 6, 0.1)
    assert (proj[:, 2:].abs().sum(0) == 0).all() and (proj[:, :2].abs().sum(0) > 0).all()


def test_randomized_pca_whitening_agrees_with_the_exact_one():
    """Above ``exact_max_dim`` features the axes come from a randomized SVD: on data whose spectrum
    decays, its leading eigenvalues and axes are the exact ones."""
    from selfsup.backbones import pca_whitening

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g))
    scales = 0.8 ** torch.arange(60.0)
    x = (torch.randn(3000, 60, generator=g) * scales) @ q.T + 1.0
    torch.manual_seed(0)
    mu_e, p_e, ev_e = pca_whitening(x, 8, 0.03)  # exact
    mu_r, p_r, ev_r = pca_whitening(x, 8, 0.03, exact_max_dim=10)  # randomized
    assert torch.allclose(mu_e, mu_r, atol=1e-6)
    assert torch.allclose(ev_r, ev_e, rtol=1e-3)
    cos = (p_e / p_e.norm(dim=0)).T @ (p_r / p_r.norm(dim=0))
    assert torch.allclose(torch.diagonal(cos).abs(), torch.ones(8), atol=1e-3)  # the same axes, up to sign
    white = (x - mu_r) @ p_r
    assert torch.allclose(white.var(0), ev_r / (ev_r + 0.03 * ev_r.mean()), rtol=1e-3)
    mu, p, ev = pca_whitening(x[:5], 8, 0.1, exact_max_dim=10)  # fewer rows than dim: zero columns
    assert p.shape == (60, 8) and (p[:, 4:].abs().sum(0) == 0).all()


def test_sampled_patches_are_windows_of_the_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    patches = sample_patches(images, 50, 6, np.random.default_rng(1))
    assert patches.shape == (50, 6, 6, 3)
    windows = {images[i, y:y + 6, x:x + 6].tobytes() for i in range(5) for y in range(3) for x in range(3)}
    assert all(p.tobytes() in windows for p in patches)
    with pytest.raises(ConfigError, match="larger than"):
        sample_patches(images, 5, 9, rng)


def _method(**params):
    cfg = build_config("patches", {"data": {"image_size": 8}, "train": {"device": "cpu"},
                                   "params": {"num_atoms": 6, "patch_size": 3, "q_frac": 0.5, "fit_patches": 400,
                                              **params}})
    return Patches(cfg)


def test_codes_are_the_q_nearest_atoms_of_every_window_and_of_its_negative():
    m = _method(select="exact")
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    m.fit(images, torch.device("cpu"), seed=0)
    mu, w = m.whitening_
    atoms = m.atoms.flatten(1).double()  # normalised atoms, conv layout (3, p, p)
    white_atoms = (atoms - mu) @ w
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    codes = m.backbone.codes(x)
    assert codes.shape == (2, 12, 6, 6)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                v = (x[b, :, i:i + 3, j:j + 3].reshape(-1).double() - mu) @ w  # the whitened window
                for sign, half in ((1, slice(0, 6)), (-1, slice(6, 12))):
                    d = ((sign * v - white_atoms) ** 2).sum(1)
                    expect = torch.zeros(6)
                    expect[d.argsort()[:3]] = 1  # q = 0.5 * 6 = 3 nearest atoms
                    assert torch.equal(codes[b, half, i, j], expect), (b, i, j, sign)
    f = m.backbone.pooled_codes(x)
    assert f.shape == (2, 2 * 6 * 4)
    assert torch.allclose(f.view(2, 12, 2, 2), torch.nn.functional.adaptive_avg_pool2d(codes, 2))
    # the output: the pooled codes PCA-whitened with the statistics of the fitting images' codes
    enc = m.backbone
    assert enc.out_dim == enc.whiten == 48  # whiten_dim 1,024 capped at the 48 pooled features
    assert torch.allclose(enc(x), (f - enc.feat_mean) @ enc.feat_proj, atol=1e-5)
    fit_x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(m.cfg.aug.mean).view(1, 3, 1, 1)) \
        / torch.tensor(m.cfg.aug.std).view(1, 3, 1, 1)
    pooled = enc.pooled_codes(fit_x)
    assert torch.allclose(enc.feat_mean, pooled.mean(0), atol=1e-5)  # whiten_images >= the 20 images: all
    white = enc(fit_x)
    cov = white.T @ white / (len(white) - 1)
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-3)  # decorrelated
    assert (torch.diagonal(cov) <= 1 + 1e-4).all() and torch.diagonal(cov)[0] > 0.9  # L / (L + eps mean(L))
    with pytest.raises(ConfigError, match="q_frac"):
        _method(q_frac=1.0)
    with pytest.raises(ConfigError, match="select"):
        _method(select="nearest")


def test_power_normalisation_takes_the_root_of_the_pooled_codes_before_the_output_whitening():
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    m = _method(select="exact", power=0.5, whiten_dim=0)
    m.fit(images, torch.device("cpu"), seed=0)
    enc = m.backbone
    assert m.options["power"] == 0.5 and enc.out_dim == 48
    codes = enc.pooled_codes(x)
    assert torch.allclose(enc(x), codes.sqrt())  # a window coded at 1/4 of the windows weighs 1/2
    # with the output whitening: fitted on the square roots, so those come out decorrelated
    m = _method(select="exact", power=0.5)
    m.fit(images, torch.device("cpu"), seed=0)
    enc = m.backbone
    fit_x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(m.cfg.aug.mean).view(1, 3, 1, 1)) \
        / torch.tensor(m.cfg.aug.std).view(1, 3, 1, 1)
    assert torch.allclose(enc.feat_mean, enc.pooled_codes(fit_x).sqrt().mean(0), atol=1e-5)
    assert torch.allclose(enc(x), (enc.pooled_codes(x).sqrt() - enc.feat_mean) @ enc.feat_proj, atol=1e-5)
    assert "power" not in _method().options  # 1: the codes as they are, and the spec of earlier runs
    # flip: the codes averaged with the mirrored image's, so the features do not see the mirror
    m = _method(select="exact", power=0.5, flip=True)
    m.fit(images, torch.device("cpu"), seed=0)
    enc = m.backbone
    assert m.options["flip"] is True
    assert torch.equal(enc(x), enc(x.flip(-1)))
    enc.flip = False
    one, mirrored = enc.pooled_codes(x), enc.pooled_codes(x.flip(-1))
    assert not torch.allclose(one, mirrored)  # the codes themselves do see it
    enc.flip = True
    assert torch.allclose(enc.pooled_features(x), ((one + mirrored) / 2).sqrt())
    with pytest.raises(ConfigError, match="power"):
        _method(power=0.0)
    with pytest.raises(ConfigError, match="power"):
        _method(power=2.0)


def test_threshold_codes_use_each_windows_score_moments_and_agree_with_the_exact_selection():
    m = _method(num_atoms=200, q_frac=0.4, fit_patches=2000, calibrate_images=20)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    info = m.fit(images, torch.device("cpu"), seed=0)
    enc = m.backbone
    assert enc.select == "threshold" and info["z"] == pytest.approx(float(enc.z.mean()))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    # the small convolution gives each window's mean and variance of its k scores, both polarities
    w, b = enc.moment_filters()
    mom = torch.nn.functional.conv2d(x, w, b)
    sp = enc.scores(x)
    d2 = w.shape[0] // 2
    for i, s in enumerate((sp, -sp - enc.norms.view(1, -1, 1, 1))):
        part = mom[:, i * d2:(i + 1) * d2]
        assert torch.allclose(part[:, 0], s.mean(1), atol=1e-3)
        assert torch.allclose(part[:, 1:].square().sum(1), s.var(1, unbiased=False), rtol=1e-3, atol=1e-3)
    # z is the standardised q-th largest score, so the threshold codes about q atoms per window,
    # mostly the same ones as the exact selection
    approx = enc.codes(x)
    enc.select = "exact"
    exact = enc.codes(x)
    assert abs(float(approx.mean()) - 0.4) < 0.03 and float(exact.mean()) == pytest.approx(0.4, abs=1e-3)
    assert float((approx == exact).float().mean()) > 0.93
    enc.select = "threshold"
    for grid in (1, 2, 3):  # the pooled features are adaptive average pooling of the codes (6 x 6 windows here)
        enc.grid = grid
        f = enc.pooled_codes(x)
        assert torch.allclose(f, torch.nn.functional.adaptive_avg_pool2d(approx, grid).flatten(1), atol=1e-6)


def test_a_patches_run_fits_once_evaluates_and_exports(tiny_dataset, tmp_path, capsys):
    from selfsup.cli import main
    from selfsup.evaluate import evaluate, extract_features, load_encoder
    from selfsup.export import export, load_backbone
    from selfsup.run import read_metrics

    run = tmp_path / "run"
    assert main(["pretrain", "--method", "patches", "--data", str(tiny_dataset / "train"), "--image-size", "16",
                 "--out", str(run), "--no-progress", "--time", "1m", "params.num_atoms=64",
                 "params.fit_patches=3000", "params.power=0.5", "params.flip=true"]) == 0
    rows = read_metrics(run)
    assert len(rows) == 1 and float(rows[0]["loss"]) > 0 and float(rows[0]["rankme"]) > 1
    assert (run / "figures" / "patches.png").stat().st_size > 2000
    assert main(["pretrain", "--out", str(run), "--resume", "--no-progress"]) == 0  # complete: nothing redone

    r = evaluate(run, "knn", tiny_dataset, tiny_dataset, k=5, progress=False)
    assert r["backbone"]["name"] == "patches" and r["backbone"]["options"]["k"] == 64
    assert r["backbone"]["options"]["whiten"] == 512  # the default 1,024 capped at 2 K grid^2 = 512
    assert r["backbone"]["options"]["power"] == 0.5 and r["backbone"]["options"]["flip"] is True  # from the spec
    assert r["top1"] > 0.6  # 4 classes (chance 0.25): the blobs' colours and shapes are in the codes
    enc = load_encoder(run)
    path = export(run)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    model, meta = load_backbone(path, with_meta=True)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), extract_features(enc, images, "cpu"), atol=1e-5)

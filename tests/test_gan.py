"""Generation-based methods: DCGAN and BiGAN (generator shapes, losses, which player each phase
trains, tiny runs that learn, figures, kNN evaluation of the backbone, exact resume)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import stop_at, assert_backbone_moved
from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.data.views import eval_view
from selfsup.evaluate import evaluate
from selfsup.methods import METHODS
from selfsup.methods.bigan import JointDiscriminator
from selfsup.methods.dcgan import DCGANGenerator, d_loss, g_loss, generator_plan
from selfsup.train import Trainer, TrainingInterrupted, load_checkpoint
from selfsup.run import read_metrics

COLOUR = (0.8, 0.3, 0.2)  # the tiny dataset's dominant colour, far from the untrained generator's grey
SMALL = {"dcgan": {"gen_width": 16},
         "bigan": {"gen_width": 16, "disc_width": 16, "disc_hidden": 64}}


def colour_folder(root: Path, n_per_class: int, seed: int) -> Path:
    """16 px images of one dominant colour: COLOUR, shifted per image (std 0.12 per channel), plus a
    smooth random brightness field (std 0.15) and pixel noise (0.05), in two classes: a dark
    horizontal band (class h) or a dark vertical band (class v). The variation matters: with
    near-constant images the real/fake colour gap would be all the variance that the backbone's
    BatchNorm sees in a batch, and it normalises such a gap away (G gets no colour signal)."""
    rng = np.random.default_rng(seed)
    for cls in ("h", "v"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            field = torch.nn.functional.interpolate(torch.from_numpy(rng.normal(0, 0.15, (1, 1, 4, 4))), size=16,
                                                    mode="bilinear", align_corners=False)[0, 0, :, :, None].numpy()
            img = np.array(COLOUR) + rng.normal(0, 0.12, 3) + field + rng.normal(0, 0.05, (16, 16, 3))
            k = rng.integers(2, 12)
            if cls == "h":
                img[k:k + 3] *= 0.5
            else:
                img[:, k:k + 3] *= 0.5
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colour")
    colour_folder(root / "train", 32, seed=0)  # 64 images
    colour_folder(root / "test", 8, seed=1)
    return root


def _cfg(method, data, epochs, batch=8, lr=3.2e-2, **train):
    """A tiny run: convnet, 16 px, small generator / discriminator; ``lr`` per 256 images (3.2e-2 at
    batch 8 is Adam's 1e-3 per step, five times DCGAN's 2e-4, so that 100 steps show something)."""
    return build_config(method, {
        "model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
        "train": {"epochs": epochs, "batch_size": batch, "log_every": 4, "ckpt_every": 1000, **train},
        "optim": {"lr": lr}, "params": SMALL[method]})


# --------------------------------------------------------------------------------------------------
# architecture


@pytest.mark.parametrize("size,base", [(16, 4), (32, 4), (64, 4), (96, 6), (8, 4), (12, 6), (48, 6)])
def test_generator_makes_images_of_the_training_size(size, base):
    assert generator_plan(size)[0] == base and base * 2 ** generator_plan(size)[1] == size
    g = DCGANGenerator(z_dim=10, image_size=size, width=8)
    first = g.net[0]
    assert isinstance(first, torch.nn.ConvTranspose2d) and first.kernel_size == (base, base)
    x = g(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (3, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0  # tanh output, not constant
    d = JointDiscriminator(size, z_dim=10, width=8, hidden=16)
    assert d(torch.randn(3, 3, size, size), torch.randn(3, 10)).shape == (3,)


@pytest.mark.parametrize("size", [20, 28, 40, 4, 6])
def test_unsupported_image_sizes_fail_clearly(size):
    with pytest.raises(ValueError, match=r"8\*2\^k or 12\*2\^k"):
        generator_plan(size)
    cfg = build_config("dcgan", {"model": {"backbone": "convnet"}, "data": {"image_size": size}})
    for method in ("dcgan", "bigan"):
        cfg.method = method
        cfg.params = {}
        with pytest.raises(ConfigError, match=f"not {size} px"):
            METHODS[method](cfg)


# --------------------------------------------------------------------------------------------------
# losses


def _log_sigmoid(v):
    return -math.log1p(math.exp(-v))


def test_gan_losses_match_hand_computation():
    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    # D: -mean log s(r) - mean log(1 - s(f)), and log(1 - s(f)) = log s(-f)
    by_hand = -(_log_sigmoid(2.0) + _log_sigmoid(-1.0)) / 2 - (_log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 2
    assert float(d_loss(r, f)) == pytest.approx(by_hand, rel=1e-6)
    # one-sided label smoothing: real target 0.9 -> -(0.9 log s(r) + 0.1 log(1 - s(r)))
    smooth = -sum(0.9 * _log_sigmoid(v) + 0.1 * _log_sigmoid(-v) for v in (2.0, -1.0)) / 2
    assert float(d_loss(r, f, 0.9)) == pytest.approx(smooth - (_log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 2, rel=1e-6)
    # G, non-saturating: -mean log s(f)
    assert float(g_loss(f)) == pytest.approx(-(_log_sigmoid(0.5) + _log_sigmoid(-3.0)) / 2, rel=1e-6)
    # ...whose gradient does not vanish where D confidently rejects the fakes (s(f) ~ 0)
    f = torch.tensor([-10.0], requires_grad=True)
    g_loss(f).backward()
    assert float(f.grad) == pytest.approx(-1.0, abs=1e-4)  # log(1 - s(f)) would give -s(f) ~ -4.5e-5


class _FixedLogits(torch.nn.Module):
    """Stands in for (the head of) a discriminator: returns the given logits, in call order."""

    def __init__(self, *logits):
        super().__init__()
        self.logits = list(logits)

    def forward(self, *args):
        return self.logits.pop(0)


@pytest.mark.parametrize("method", ["dcgan", "bigan"])
def test_phase_losses_put_real_and_fake_labels_where_the_paper_does(method, colour_data):
    cfg = _cfg(method, colour_data / "train", 1)
    if method == "bigan":
        cfg.params["cycle"] = 0.0  # the paper's adversarial terms alone (the preset's cycle term: its own test)
    m = METHODS[method](cfg)
    x = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    batch = m.prepare(x, torch.Generator().manual_seed(0))
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    lr_real = -(_log_sigmoid(2.0) + _log_sigmoid(-1.0)) / 2  # BCE(real, 1)
    lf_fake = -(_log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 2  # BCE(fake, 0)
    if method == "dcgan":  # D sees [x; G(z)] as one batch
        m.d_head = _FixedLogits(torch.cat([real, fake])[:, None], torch.cat([real, fake])[:, None])
        smooth = -sum(0.9 * _log_sigmoid(v) + 0.1 * _log_sigmoid(-v) for v in (2.0, -1.0)) / 2
        out = m.phase_step(batch, "d")
        assert float(out["loss"]) == pytest.approx(smooth + lf_fake, rel=1e-6)  # real_label 0.9 (preset)
        assert float(m.phase_step(batch, "g")["loss"]) == pytest.approx(
            -(_log_sigmoid(0.5) + _log_sigmoid(-3.0)) / 2, rel=1e-6)  # -log D(G(z))
    else:  # D(x, E(x)) then D(G(z), z); E and G minimise the swapped-label loss
        m.disc = _FixedLogits(real, fake, real, fake)
        out = m.phase_step(batch, "d")
        assert float(out["loss"]) == pytest.approx(lr_real + lf_fake, rel=1e-6)
        swapped = -(_log_sigmoid(-2.0) + _log_sigmoid(1.0)) / 2 - (_log_sigmoid(0.5) + _log_sigmoid(-3.0)) / 2
        assert float(m.phase_step(batch, "g")["loss"]) == pytest.approx(swapped, rel=1e-6)
    assert float(out["d_real_acc"]) == 0.5 and float(out["d_fake_acc"]) == 0.5  # r > 0: [T, F]; f < 0: [F, T]


# --------------------------------------------------------------------------------------------------
# the two phases train disjoint players


PLAYERS = {"dcgan": {"d": ("backbone.", "d_head."), "g": ("generator.",)},
           "bigan": {"d": ("disc.",), "g": ("generator.", "backbone.", "enc_head.")}}


@pytest.mark.parametrize("method", ["dcgan", "bigan"])
def test_d_phase_changes_only_d_and_g_phase_only_the_other_players(method, colour_data, tmp_path):
    # fp32: under bf16 the very first gradient of D's last bias can round to exactly 0 (logits ~1e-4)
    cfg = _cfg(method, colour_data / "train", 1, precision="fp32")
    trainer = Trainer(cfg, tmp_path / method, progress=False)
    m = trainer.method

    def snapshot():
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    names = set(dict(m.named_parameters()))
    owner = {n: next(ph for ph, prefixes in PLAYERS[method].items() if n.startswith(prefixes)) for n in names}
    for phase, opt in trainer.optimizers.items():  # each parameter is in exactly its player's optimizer
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        assert ids == {id(p) for n, p in m.named_parameters() if owner[n] == phase}

    between = {}
    g_step = trainer.optimizers["g"].step

    def record_then_step(*a, **k):
        between.update(snapshot())  # after the d phase's step, before the g phase's
        return g_step(*a, **k)

    trainer.optimizers["g"].step = record_then_step
    before = snapshot()
    images = torch.from_numpy(np.array(trainer.data.images[:8])).permute(0, 3, 1, 2)
    trainer.train_step(images, 0)
    after = snapshot()
    changed_d = {n for n in names if not torch.equal(before[n], between[n])}
    changed_g = {n for n in names if not torch.equal(between[n], after[n])}
    assert changed_d == {n for n in names if owner[n] == "d"}
    assert changed_g == {n for n in names if owner[n] == "g"}


# --------------------------------------------------------------------------------------------------
# tiny runs: they learn, draw, evaluate


def _sample_colour(method) -> torch.Tensor:
    was = method.training
    method.eval()
    mean = method.samples(64).mean((0, 2, 3))
    method.train(was)
    return mean


@pytest.fixture(scope="module")
def tiny_runs(colour_data, tmp_path_factory):
    """One run per method; the distance of G(z)'s mean colour to the data's, every 10 steps."""
    out = {}
    # precision pinned, so that every machine runs the same trajectory ("auto" is fp32 on CPUs without
    # native bf16): BiGAN in bf16 (its codes in fp32 had s[1] / s[0] = 0.039 after 40 steps, against
    # > 0.05 in bf16); DCGAN in fp32, 5x faster than emulated bf16 on such a CPU (9 s against 44 s)
    for method, epochs, precision in (("dcgan", 12, "fp32"), ("bigan", 5, "bf16")):  # 96 and 40 steps
        cfg = _cfg(method, colour_data / "train", epochs, precision=precision)
        trainer = Trainer(cfg, tmp_path_factory.mktemp(method), progress=False)
        data_colour = torch.from_numpy(np.array(trainer.data.images)).float().div(255).mean((0, 1, 2))
        dist = [float((_sample_colour(trainer.method) - data_colour).norm())]
        after_step = trainer.method.after_step

        def track(step, total, m=trainer.method, after_step=after_step, dist=dist, c=data_colour):
            after_step(step, total)
            if (step + 1) % 10 == 0:
                dist.append(float((_sample_colour(m) - c).norm()))

        trainer.method.after_step = track
        trainer.fit()
        out[method] = (trainer, read_metrics(trainer.run_dir), dist)
    return out


@pytest.mark.parametrize("method", ["dcgan", "bigan"])
def test_tiny_run_discriminates_and_moves_samples_toward_the_data(method, tiny_runs):
    trainer, rows, dist = tiny_runs[method]
    assert {"loss", "loss_d", "loss_g", "d_real_acc", "d_fake_acc", "d_x", "d_gz"} <= rows[0].keys()
    acc = np.mean([(float(r["d_real_acc"]) + float(r["d_fake_acc"])) / 2 for r in rows])
    # the discriminator beats chance (0.5) over the run and scores the real images (pairs) above the fakes;
    # BiGAN's by less: E's BatchNorm (params.enc_bn, the preset) starts its codes at the prior's mean and
    # variance, so D cannot tell the pairs apart by the codes' scale (0.54 here, 0.61 without it)
    assert acc > (0.55 if method == "dcgan" else 0.52), acc
    assert np.mean([float(r["d_x"]) for r in rows]) > np.mean([float(r["d_gz"]) for r in rows]) + 0.03
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # G(z) starts grey (~0.5 everywhere, 0.49 from the data's colour) and moves toward the data
    assert dist[0] > 0.4, dist
    assert min(dist) < 0.7 * dist[0], dist
    assert np.mean(dist[len(dist) // 2:]) < 0.8 * dist[0], dist  # and stays closer (GANs oscillate)


def test_bigan_encoder_is_not_collapsed(tiny_runs):
    trainer, rows, _ = tiny_runs["bigan"]
    m = trainer.method
    x = torch.from_numpy(np.array(trainer.data.images)).permute(0, 3, 1, 2)
    m.eval()
    with torch.no_grad():
        e = m.encode(m.fmt(eval_view(x, trainer.cfg.aug)))
    m.train()
    assert e.shape == (64, 100)
    assert e.std(0).mean() > 0.1, e.std(0).mean()  # codes differ from image to image (collapsed: ~0)
    s = torch.linalg.svdvals(e - e.mean(0))
    assert s[1] / s[0] > 0.05  # ... along more than one direction
    assert float(rows[-1]["enc_z_std"]) > 0.1


@pytest.mark.parametrize("method,files", [("dcgan", ["dcgan_samples.png"]),
                                          ("bigan", ["bigan_samples.png", "bigan_reconstructions.png"])])
def test_tiny_run_writes_figures_and_evaluates(method, files, tiny_runs, colour_data, tmp_path):
    trainer, _, _ = tiny_runs[method]
    for name in files:
        path = trainer.run_dir / "figures" / name
        assert path.exists() and Image.open(path).size[0] > 200
    r = evaluate(str(trainer.run_dir), "knn", str(colour_data), str(colour_data), out=tmp_path / "eval",
                 image_size=16, progress=False)
    # the evaluation runs on the trained discriminator / encoder (its kNN on 16 test images of 2 colour
    # classes is no measure of quality: BiGAN's was 5/16); the backbone moved from its initialisation
    assert r["n_train"] == 64 and r["n_test"] == 16 and 0.0 <= r["top1"] <= 1.0
    assert_backbone_moved(trainer.run_dir)


# --------------------------------------------------------------------------------------------------
# exact resume with both optimizers


@pytest.mark.parametrize("method", ["dcgan", "bigan"])
def test_resume_after_an_interruption_matches_the_uninterrupted_run(method, colour_data, tmp_path):
    cfg = _cfg(method, colour_data / "train", 1, batch=16, ckpt_every=2)  # 4 steps
    ref = Trainer(cfg, tmp_path / "ref", progress=False)
    ref.draw_figures = list  # pictures are tested above; matplotlib is the slow part of a tiny run
    ref.fit()

    run = Trainer(cfg, tmp_path / "run", progress=False)
    stop_at(run, 2)
    with pytest.raises(TrainingInterrupted):
        run.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and set(ckpt["optimizers"]) == {"d", "g"}
    assert all(ckpt["optimizers"][p]["state"] for p in ("d", "g"))  # Adam moments of both players
    resumed = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    resumed.draw_figures = list
    resumed.fit()
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    expected = ref.method.state_dict()
    assert final["model"].keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(final["model"][k], v), k


# --------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020) on the discriminator's inputs


def test_diff_augment_matches_hand_computed_translation_cutout_and_colour():
    from selfsup.methods.dcgan import diff_augment, diffaug_params

    x = (torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 0.5) / 400 - 0.5  # no pixel is 0
    shift = torch.tensor([[1, 0], [0, -2]])  # out[i, j] = x[i + dy, j + dx]: image 0 up 1 px, image 1 right 2
    out = diff_augment(x, {"shift": shift})
    assert torch.equal(out[0, :, :-1], x[0, :, 1:]) and (out[0, :, -1] == 0).all()
    assert torch.equal(out[1, :, :, 2:], x[1, :, :, :-2]) and (out[1, :, :, :2] == 0).all()
    hole = torch.tensor([[4, 4], [0, 7]])  # side 4: rows/cols 2..5; rows 0..1 (clipped), cols 5..7
    out = diff_augment(x, {"hole": hole})
    assert (out[0, :, 2:6, 2:6] == 0).all() and int((out[0] == 0).sum()) == 3 * 16
    assert (out[1, :, 0:2, 5:8] == 0).all() and int((out[1] == 0).sum()) == 3 * 6
    b, s, c = torch.tensor([0.25, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.5])
    out = diff_augment(x, {"brightness": b, "saturation": s, "contrast": c})
    assert torch.allclose(out[0], x[0] + 0.25)  # saturation and contrast 1: brightness only
    grey = x[1].mean(0, keepdim=True).expand(3, -1, -1)  # saturation 0: every pixel's channel mean
    assert torch.allclose(out[1], (grey - grey.mean()) * 1.5 + grey.mean(), atol=1e-6)
    p = diffaug_params(4, 32, "color,translation,cutout", torch.Generator().manual_seed(0), "cpu")
    assert set(p) == {"brightness", "saturation", "contrast", "shift", "hole"}
    assert p["shift"].abs().max() <= 4 and p["hole"].max() <= 32
    with pytest.raises(ConfigError, match="diffaug"):
        diffaug_params(4, 32, "color,zoom", torch.Generator(), "cpu")


def _diffaug_step_inputs(method, policy, data):
    """A method with DiffAugment ``policy``, 4 random images and their prepared batch."""
    cfg = _cfg(method, data / "train", 1)
    cfg.params["diffaug"] = policy
    m = METHODS[method](cfg)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    return m, x, m.prepare(x, torch.Generator().manual_seed(0))


def test_dcgan_diffaug_reaches_the_discriminator_and_passes_gradients_to_g(colour_data):
    m, x, batch = _diffaug_step_inputs("dcgan", "color,translation,cutout", colour_data)
    seen = []
    m.backbone.stages[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    m.phase_step(batch, "g")
    real = batch[0]
    assert seen[0].shape[0] == 8 and not torch.allclose(seen[0][:4], real)  # D sees augmented reals
    m.zero_grad()
    m.phase_step(batch, "g")["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    again = m.prepare(x, torch.Generator().manual_seed(0))  # drawn from the step's generator: repeatable
    assert all(torch.equal(again[2]["d"][k], batch[2]["d"][k]) for k in batch[2]["d"])


def test_dcgan_map_head_reads_the_last_feature_map_unpooled(colour_data):
    """``params.map_head``: D's logit is one linear unit on the last map flattened (the DCGAN paper's D):
    one weight per channel and location; equal weights over the locations reduce it to the pooled head."""
    cfg = _cfg("dcgan", colour_data / "train", 1)
    cfg.params["map_head"] = True
    m = METHODS["dcgan"](cfg)
    last = m.backbone.forward_stages(torch.zeros(1, 3, 16, 16))[-1]
    assert m.d_head.in_features == last[0].numel() == m.backbone.out_dim * 2 * 2  # 16 px: a 2x2 map
    x = torch.randn(3, 3, 16, 16)
    m.eval()
    expected = m.d_head(m.backbone.forward_stages(x)[-1].flatten(1)).squeeze(1)
    assert torch.allclose(m.discriminator(x), expected, atol=1e-5)
    pooled = m.d_head.weight.view(m.backbone.out_dim, 4).mean(1)  # the same weight at every location ...
    m.d_head.weight.data = pooled.repeat_interleave(4)[None]  # ... is a linear unit on the pooled map
    assert torch.allclose(m.discriminator(x), m.d_head.bias + 4 * m.backbone(x) @ pooled, atol=1e-4)


def test_bigan_diffaug_changes_what_d_sees_not_what_e_encodes(colour_data):
    m, _, batch = _diffaug_step_inputs("bigan", "translation,cutout", colour_data)
    d_in, e_in = [], []
    m.disc.register_forward_pre_hook(lambda mod, args: d_in.append(args[0].detach().clone()))
    m.backbone.register_forward_pre_hook(lambda mod, args: e_in.append(args[0].detach().clone()))
    m.phase_step(batch, "d")
    real = batch[0]
    assert torch.allclose(e_in[0], real)  # E encodes the real view itself
    assert d_in[0].shape == real.shape and not torch.allclose(d_in[0], real)  # D sees it shifted, with a hole


def test_bigan_enc_bn_gives_codes_the_priors_mean_and_variance_from_the_first_step(colour_data):
    """``params.enc_bn`` (the preset): E(x) = BN(W f(x) + b), so in training mode every code dimension
    has mean 0 and variance 1 over the batch, as z ~ N(0, I) has; without it the untrained encoder's codes
    are far from the prior's scale (the discriminator then tells (x, E(x)) from (G(z), z) by the codes)."""
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    stds = {}
    for enc_bn in (False, True):
        cfg = _cfg("bigan", colour_data / "train", 1)
        cfg.params["enc_bn"] = enc_bn
        torch.manual_seed(0)
        m = METHODS["bigan"](cfg)
        real = m.prepare(x, torch.Generator().manual_seed(0))[0]
        e = m.encode(real)
        stds[enc_bn] = e.std(0, unbiased=False)
        if enc_bn:
            assert torch.allclose(e.mean(0), torch.zeros(e.shape[1]), atol=1e-4)
            assert torch.allclose(stds[True], torch.ones(e.shape[1]), atol=1e-2)
            m.zero_grad()
            m.phase_step(m.prepare(x, torch.Generator().manual_seed(1)), "g")["loss"].backward()
            assert m.enc_head[0].weight.grad.abs().sum() > 0 and m.enc_head[1].weight.grad.abs().sum() > 0
    assert (stds[False].mean() - 1).abs() > 0.3, stds[False].mean()


@pytest.mark.parametrize("mode", ["joint", "separate", "reals"])
def test_dcgan_d_batch_decides_whether_the_fakes_move_the_reals_logits(mode, colour_data):
    """``params.d_batch``: "joint" (the preset) normalises D's batch [x; G(z)] with its own statistics, so the
    reals' logits depend on the fakes; "separate" (the DCGAN reference code's D(x), D(G(z))) and "reals"
    (the batch normalised with the reals' statistics) make them independent of the fakes. "separate" runs D on
    two batches in the d phase and on the fakes alone in the g phase."""
    def reals_logits(m, batch):
        seen = []
        hook = m.d_head.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
        m.phase_step(batch, "d")
        hook.remove()
        return torch.cat(seen)[:4, 0], [s.shape[0] for s in seen]

    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    cfg = _cfg("dcgan", colour_data / "train", 1)
    cfg.params["d_batch"] = mode
    torch.manual_seed(0)
    m = METHODS["dcgan"](cfg)
    batch = m.prepare(x, torch.Generator().manual_seed(0))
    other = (batch[0], batch[1] + 3.0, batch[2])  # the same reals, other fakes
    a, sizes = reals_logits(m, batch)
    b, _ = reals_logits(m, other)
    assert sizes == ([4, 4] if mode == "separate" else [8])
    if mode == "joint":
        assert not torch.allclose(a, b, atol=1e-3)
    else:
        assert torch.allclose(a, b, atol=1e-5)
    seen = []
    m.d_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    m.phase_step(batch, "g")["loss"].backward()
    assert seen == ([4] if mode == "separate" else [8])  # the g phase: D(G(z)) alone, or [x; G(z)]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    with pytest.raises(ConfigError, match="d_batch"):
        bad = _cfg("dcgan", colour_data / "train", 1)
        bad.params["d_batch"] = "mixed"
        METHODS["dcgan"](bad)


def test_reference_batchnorm_normalises_the_batch_with_its_first_samples_statistics():
    """Against a hand computation: outputs, running statistics (unbiased variance, momentum 0.1) and the
    gradient flowing through the reference statistics; eval mode and the layer after the block unchanged."""
    from selfsup.methods.dcgan import reference_batchnorm

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data, bn.bias.data = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 1.0])
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    ref = x[:2].detach()
    mean, var = ref.mean((0, 2, 3)), ref.var((0, 2, 3), unbiased=False)
    expected = ((x.detach() - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + bn.eps)
                * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1))
    with reference_batchnorm(bn, 2):
        y = bn(x)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * mean, atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * ref.var((0, 2, 3), unbiased=True), atol=1e-6)
    y[2:].sum().backward()  # the last four samples' outputs depend on the first two through the statistics
    assert x.grad[:2].abs().sum() > 0
    assert "forward" not in vars(bn)  # the layer's own forward is back
    assert torch.allclose(bn(x.detach()).mean((0, 2, 3)), bn.bias, atol=1e-5)  # its own batch statistics again
    bn.eval()
    with reference_batchnorm(bn, 2):
        assert torch.equal(bn(x.detach()), torch.nn.BatchNorm2d.forward(bn, x.detach()))


def test_bigan_map_head_encodes_the_last_feature_map_unpooled(colour_data):
    """``params.map_head`` for BiGAN: E's linear map to z reads the last map flattened (BiGAN's encoder has
    fully connected layers on its conv5 map): one weight per channel and location."""
    cfg = _cfg("bigan", colour_data / "train", 1)
    cfg.params.update(map_head=True, enc_bn=False)
    m = METHODS["bigan"](cfg)
    last = m.backbone.forward_stages(torch.zeros(1, 3, 16, 16))[-1]
    assert m.enc_head.in_features == last[0].numel() == m.backbone.out_dim * 2 * 2  # 16 px: a 2x2 map
    m.eval()
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(m.encode(x), m.enc_head(m.backbone.forward_stages(x)[-1].flatten(1)), atol=1e-5)
    cfg.params["enc_bn"] = True  # with the BatchNorm on the codes, as the preset
    m = METHODS["bigan"](cfg)
    assert m.enc_head[0].in_features == last[0].numel()
    z = m.encode(torch.randn(8, 3, 16, 16))
    assert z.shape == (8, m.hp.z_dim) and torch.allclose(z.std(0, unbiased=False), torch.ones(m.hp.z_dim), atol=1e-2)


def test_bigan_cycle_adds_alices_reconstruction_of_x_to_e_and_gs_loss(colour_data):
    """``params.cycle`` (ALICE's explicit cycle consistency): the g phase's loss is the adversarial one plus
    ``cycle`` times the mean squared error of G(E(x)) against x in [-1, 1], by hand; its gradient reaches
    E (backbone and code map) and G, and D's phase is unchanged."""
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    losses = {}
    for cycle in (0.0, 2.0):
        cfg = _cfg("bigan", colour_data / "train", 1)
        cfg.params.update(cycle=cycle, dropout=0.0)  # no dropout: the two runs' D outputs are the same
        torch.manual_seed(0)
        m = METHODS["bigan"](cfg)
        batch = m.prepare(x, torch.Generator().manual_seed(0))
        real = batch[0]
        pixels = real.float() * torch.tensor(cfg.aug.std).view(1, 3, 1, 1) + torch.tensor(cfg.aug.mean).view(1, 3, 1, 1)
        out = m.phase_step(batch, "g")
        losses[cycle] = out["loss"]
        if cycle:
            expected = ((m.generator(m.encode(real)).float() - (pixels * 2 - 1)) ** 2).mean()
            assert torch.allclose(out["cycle"], expected, atol=1e-6)
            assert torch.allclose(out["loss"], losses[0.0] + cycle * expected, atol=1e-5)
            m.zero_grad()
            (cycle * out["cycle"]).backward()
            assert m.backbone.stages[0][0].weight.grad.abs().sum() > 0
            assert m.enc_head[0].weight.grad.abs().sum() > 0
            assert next(m.generator.parameters()).grad.abs().sum() > 0
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.disc.parameters())
        else:
            assert "cycle" not in out
    # params.adversarial = 0: E and G's loss is the cycle term alone (an autoencoder, the control)
    cfg.params.update(adversarial=0.0)
    torch.manual_seed(0)
    m = METHODS["bigan"](cfg)
    out = m.phase_step(m.prepare(x, torch.Generator().manual_seed(0)), "g")
    assert torch.allclose(out["loss"], cfg.params["cycle"] * out["cycle"], atol=1e-6)

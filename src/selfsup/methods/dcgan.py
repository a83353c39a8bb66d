"""DCGAN: the discriminator of a GAN as a feature learner (Radford, Metz & Chintala, ICLR 2016,
arXiv 1511.06434).

A generator ``G`` maps noise ``z ~ N(0, I)`` to images; a discriminator ``D`` tells real images from
generated ones. ``D`` is the backbone (pooled features) plus a linear real/fake logit, so the
features evaluated downstream are the discriminator's (Sec. 5.1 of the paper: CIFAR-10 classified
from the discriminator's features).

Algorithm (one training step; two optimizers, phase "d" then phase "g")::

    x = augment(images)                      # light: random flip (preset), normalised as evaluation
    z ~ N(0, I)                              # (B, z_dim), drawn from the step's generator
    fake = norm((tanh(G(z)) + 1) / 2)        # G's images in [0, 1], normalised exactly like x
    # phase d: discriminator step (G fixed)
    r, f = D([x; fake.detach()])             # one batch: BatchNorm sees real and fake together
    loss_d = BCE(r, real_label) + BCE(f, 0)
    # phase g: generator step (D fixed), non-saturating loss (Goodfellow et al. 2014, Sec. 3)
    r, f = D([x; fake])
    loss_g = BCE(f, 1)                       # = -log D(G(z)), not log(1 - D(G(z)))

Why one batch ``[x; fake]``: the backbones put BatchNorm right after their first convolution, and a
batch of fakes normalised on its own statistics hides from ``D`` any global difference of colour or
contrast between fakes and reals (the DCGAN discriminator has no BatchNorm on its first layer; ours
does). ``params.d_batch`` says how the batch is normalised:

* ``reals`` (the preset): every BatchNorm layer of ``D`` normalises the whole batch with the statistics
  of its real half (:func:`reference_batchnorm`: Salimans et al. 2016's reference batch normalisation,
  the batch's reals as the reference), and its running statistics follow the reals. The fakes' global
  differences stay visible, and ``D`` learns on reals normalised as evaluation normalises them (it
  re-estimates the statistics on real images: precise BN). Not in the paper.
* ``joint``: the batch's own statistics, of both halves; ``D`` then learns on reals normalised with
  half-fake statistics, which evaluation does not reproduce.
* ``separate``: what the DCGAN reference code does, ``D(x)`` and ``D(G(z))`` as two batches in the d phase
  and ``D(G(z))`` alone in the g phase; the fakes' own statistics hide their global differences.

In 5-minute CIFAR-10 runs (convnet, batch 128, a fp32 machine; random init kNN 0.422 / linear 0.444):
reals 0.384 / 0.447 and 0.390 / 0.446 (111-118 steps: each step 1.45x dearer), joint 0.372 / 0.405 (160
steps; 0.377 / 0.421 stopped at 114), separate 0.298 / 0.363 (benchmarks/results/dcgan_5m_fp32.md). In
the d and g phases alike; the g phase also computes gradients for ``D`` (then dropped: only G's optimizer
steps; the d phase's zeroes them).

What the backbone sees: evaluation feeds it ``(x - mean) / std`` (``data.views.eval_view`` with the
config's ``aug.mean/std``), so ``D`` is trained on exactly that for real images, and the generator's
``tanh`` output is mapped to [0, 1] and through the same normalisation.

Defaults (paper, Sec. 4): Adam, lr 2e-4, betas (0.5, 0.999), batch 128, ``z`` of 100 dims, the
generator of Fig. 1 (transposed convolutions + BatchNorm + ReLU, tanh output) with 64 base channels.
Scaling to 32-96 px: the generator starts at 4x4 (6x6 for 12*2^k px) with ``gen_width * 2^(n-1)``
channels and doubles the resolution ``n`` times (32 px: 256-128-64 channels at 4-8-16 px, 96 px:
512-256-128-64 at 6-12-24-48 px). The discriminator is the run's backbone (convnet or resnet18)
instead of the paper's 4-layer LeakyReLU net. The preset's ``optim.lr`` is 4e-4 per 256 images,
i.e. the paper's 2e-4 at batch 128, kept constant (``min_lr_ratio: 1``), no weight decay. One-sided
label smoothing (real label 0.9, Salimans et al. 2016) keeps a BatchNorm backbone, which tells the
first fakes from reals within a few steps, from driving its logits without bound. Augmentation:
horizontal flips only (crops would make the reals blurrier than the fakes, a cue for ``D`` that
carries no semantics). What to expect: ``D`` wins most batches from the first epoch (``d_real_acc``,
``d_fake_acc`` ~0.95-1) while ``G`` improves; on CIFAR-10 the samples are checkerboard-like for the
first ~150 steps at 2e-4, then colour blobs (seen at 16 px, batch 32, 600 steps).

Two more options. ``diffaug`` (not in the paper; the preset: ``"color,translation,cutout"``) applies
DiffAugment (Zhao et al., NeurIPS 2020, arXiv 2006.10738) to every image D sees, real or generated, in
both phases, with parameters drawn in ``prepare`` and differentiable in the image, so G learns through
it: on CIFAR-10 the convnet D otherwise wins from the first steps (``d_gz`` ~0.03, G's loss rising) and
its features fold onto a few directions. ``map_head`` puts the logit on the last feature map flattened
(the paper's D: its 4x4 map into one linear unit) instead of the pooled features; the preset has it since
2026-12-07, with ``d_batch: reals`` (5-minute CIFAR-10 runs on a fp32 machine: kNN 0.421 and 0.412, linear
0.446 and 0.450, two seeds, against 0.384 / 0.447 and 0.390 / 0.446 with the pooled head; with the map head
and ``d_batch: joint``, 0.417 / 0.448 and 0.402 / 0.443).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.views import augment, denormalize, normalize
from ..figures import image_grid, sample_images
from ..heads import LinearClassifier
from .base import Method, split_decay

# --------------------------------------------------------------------------------------------------
# the generator (shared with BiGAN)


def generator_plan(image_size: int) -> tuple[int, int]:
    """``(base, n)`` with ``image_size == base * 2**n``, ``base`` 4 or 6 and ``n >= 1``: the generator
    starts at ``base x base`` and doubles its resolution ``n`` times. Sizes 8*2^k and 12*2^k."""
    for base in (4, 6):
        n = 1
        while base * 2**n < image_size:
            n += 1
        if base * 2**n == image_size:
            return base, n
    raise ValueError(f"the DCGAN generator makes images of 8*2^k or 12*2^k px (8, 12, 16, 24, 32, 48, 64, "
                     f"96, 128, ...), not {image_size} px; choose another data.image_size")


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation (Sec. 4): conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN's generator (Radford et al. 2016, Fig. 1): ``z (B, z_dim)`` -> images ``(B, 3, S, S)``
    in [-1, 1] (tanh). A ``base x base`` transposed convolution from ``z`` (as a 1x1 map), then
    ``n - 1`` stride-2 transposed convolutions (4x4) halving the channels, each followed by
    BatchNorm + ReLU, and a last stride-2 one to ``out_chans`` with tanh. ``S = base * 2^n`` must be
    8*2^k or 12*2^k (:func:`generator_plan`); channels are ``width * 2^(n-1-i)``, at most ``8 * width``."""

    def __init__(self, z_dim: int = 100, image_size: int = 32, width: int = 64, out_chans: int = 3) -> None:
        super().__init__()
        base, n = generator_plan(image_size)
        self.z_dim, self.image_size = z_dim, image_size
        chans = [width * min(2 ** (n - 1 - i), 8) for i in range(n)]  # at base, 2*base, ..., S/2 px
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, chans[0], base, 1, 0, bias=False),
                                   nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(chans[-1], out_chans, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


def build_generator(z_dim: int, image_size: int, width: int) -> DCGANGenerator:
    """The generator, with an unsupported image size reported as a configuration error."""
    from ..config import ConfigError

    try:
        return DCGANGenerator(z_dim, image_size, width)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------------------------------
# losses (logits -> scalars, float32)


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0) -> torch.Tensor:
    """Discriminator loss: ``BCE(real, real_label) + BCE(fake, 0)``, i.e. with ``real_label = 1``
    ``-mean log s(r) - mean log(1 - s(f))`` (``s`` the sigmoid); ``real_label < 1`` is one-sided label
    smoothing."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``-mean log s(f) = BCE(f, 1)`` (Goodfellow et al. 2014, Sec. 3)."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def d_accuracies(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """What to log of a discriminator: its accuracy on reals / fakes and mean ``D(x)``, ``D(G(z))``."""
    with torch.no_grad():
        r, f = real_logits.float(), fake_logits.float()
        return {"d_real_acc": (r > 0).float().mean(), "d_fake_acc": (f < 0).float().mean(),
                "d_x": torch.sigmoid(r).mean(), "d_gz": torch.sigmoid(f).mean()}


# --------------------------------------------------------------------------------------------------
# differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al., NeurIPS 2020,
# arXiv 2006.10738): the same random colour, translation and cutout on real and generated images, in
# both players' steps, differentiable in the image so G's gradient flows through it


DIFFAUG_OPS = ("color", "translation", "cutout")
D_BATCH = ("joint", "separate", "reals")  # params.d_batch: how D's BatchNorm sees reals and fakes


def diffaug_params(n: int, size: int, policy: str, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Random parameters of :func:`diff_augment` for ``n`` images of ``size`` px, drawn from ``generator``
    in a fixed order (colour, translation, cutout), as the reference code draws them: brightness
    ``U(-0.5, 0.5)``, saturation ``U(0, 2)``, contrast ``U(0.5, 1.5)`` (on images in [-1, 1]); a shift of
    up to 1/8 of the side; one square hole of half the side."""
    ops = [o for o in policy.split(",") if o]
    if any(o not in DIFFAUG_OPS for o in ops):
        from ..config import ConfigError

        raise ConfigError(f"params.diffaug: unknown op in {policy!r}; use a comma-separated subset of "
                          f"{','.join(DIFFAUG_OPS)}")

    def rand(*shape):
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    def randint(lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=generator, device=generator.device).to(device)

    out: dict[str, torch.Tensor] = {}
    if "color" in ops:
        out.update(brightness=rand(n) - 0.5, saturation=rand(n) * 2, contrast=rand(n) + 0.5)
    if "translation" in ops:
        s = int(size * 0.125 + 0.5)
        out["shift"] = randint(-s, s + 1, n, 2)
    if "cutout" in ops:
        c = int(size * 0.5 + 0.5)
        out["hole"] = randint(0, size + (1 - c % 2), n, 2)
    return out


def diff_augment(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """DiffAugment of images ``x`` ``(B, C, S, S)`` in [-1, 1] with parameters from :func:`diffaug_params`:
    brightness (add), saturation and contrast (scale around the pixel's / image's mean), translation
    with zero padding, a zeroed square hole. Differentiable in ``x``."""
    b, _, h, w = x.shape
    view = (b, 1, 1, 1)
    if "brightness" in p:
        x = x + p["brightness"].view(view)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * p["saturation"].view(view) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * p["contrast"].view(view) + mean
    if "shift" in p or "hole" in p:
        bi = torch.arange(b, device=x.device).view(b, 1, 1)
        gy = torch.arange(h, device=x.device).view(1, h, 1)
        gx = torch.arange(w, device=x.device).view(1, 1, w)
    if "shift" in p:
        ty, tx = p["shift"][:, 0].view(b, 1, 1), p["shift"][:, 1].view(b, 1, 1)
        padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # zeros around: out-of-image pixels read them
        x = padded[bi, (gy + ty + 1).clamp(0, h + 1), (gx + tx + 1).clamp(0, w + 1)].permute(0, 3, 1, 2)
    if "hole" in p:
        c = int(h * 0.5 + 0.5)
        cy, cx = p["hole"][:, 0].view(b, 1, 1), p["hole"][:, 1].view(b, 1, 1)
        ry, rx = gy - cy + c // 2, gx - cx + c // 2  # position inside the hole's square
        inside = (ry >= 0) & (ry < c) & (rx >= 0) & (rx < c)
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------


def half(aug: dict, lo: int, hi: int) -> dict:
    """DiffAugment parameters ``aug`` (drawn for ``[reals; fakes]``) of the images ``lo:hi``."""
    return {k: v[lo:hi] for k, v in aug.items()}


@contextlib.contextmanager
def reference_batchnorm(module: nn.Module, n_ref: int):
    """Within the block, every BatchNorm layer of ``module`` in training mode normalises its whole batch with
    the statistics of the batch's first ``n_ref`` samples, the reference batch (Salimans et al., "Improved
    Techniques for Training GANs", NeurIPS 2016, Sec. 3.4: reference batch normalisation), and its running
    statistics follow those samples alone; gradients flow through the reference statistics, as through
    batch statistics. Layers in eval mode are unchanged."""
    def forward(bn):
        def fn(x):
            if not bn.training:
                return type(bn).forward(bn, x)
            dims = [0, *range(2, x.dim())]
            ref = x[:n_ref] if x.dtype == torch.float32 else x[:n_ref].float()
            var, mean = torch.var_mean(ref, dims, unbiased=False)
            if bn.track_running_stats:
                with torch.no_grad():
                    n = ref.numel() / ref.shape[1]
                    bn.num_batches_tracked.add_(1)
                    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
                    bn.running_var.lerp_((var * n / max(n - 1, 1)).to(bn.running_var.dtype), m)
            scale = torch.rsqrt(var + bn.eps)  # y = x * scale + shift, one pass over x
            if bn.affine:
                scale = scale * bn.weight
            shift = -mean * scale + (bn.bias if bn.affine else 0)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype))
        return fn

    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.forward = forward(bn)  # an instance attribute: shadows the class's forward until deleted
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward


class GeneratorPlayer:
    """What DCGAN and BiGAN share around their generator ``self.generator`` (``self.hp.z_dim``): noise
    drawn in ``prepare`` from the step's generator (exact resume), and generated images presented
    exactly as real ones are (in [0, 1], then normalised like evaluation's input)."""

    def to_images(self, g_out: torch.Tensor) -> torch.Tensor:
        """The generator's tanh output as images in [0, 1]."""
        return (g_out.float() + 1) / 2

    def fake(self, z: torch.Tensor) -> torch.Tensor:
        """``G(z)`` as the networks see images: in [0, 1], then normalised like the real ones."""
        return self.fmt(normalize(self.to_images(self.generator(z)), self.cfg.aug.mean, self.cfg.aug.std))

    def sample_noise(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randn(n, self.hp.z_dim, generator=generator, device=generator.device).to(device)

    def prepare(self, images, generator):
        """Real views (light augmentation), the step's noise ``z`` and, with ``params.diffaug``, DiffAugment's
        parameters for each phase's real + generated images (drawn here: exact resume)."""
        x = augment(images, self.cfg.aug, generator)
        z = self.sample_noise(x.shape[0], generator, x.device)
        n = 2 * x.shape[0]
        aug = {ph: diffaug_params(n, x.shape[-1], self.hp.diffaug, generator, x.device) for ph in self.phases}
        return self.fmt(x), z, aug

    def d_view(self, x: torch.Tensor, aug: dict | None) -> torch.Tensor:
        """What D sees of the normalised images ``x``: DiffAugmented (in [-1, 1], as the reference code)
        when ``aug`` holds parameters, else ``x``."""
        if not aug:
            return self.fmt(x)
        u = diff_augment(self.pixels(x) * 2 - 1, aug)
        return self.fmt(normalize((u + 1) / 2, self.cfg.aug.mean, self.cfg.aug.std))

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised images ``x`` back in [0, 1] (float32)."""
        return denormalize(x, self.cfg.aug.mean, self.cfg.aug.std)


class DCGAN(GeneratorPlayer, Method):
    name = "dcgan"
    family = "generation-based"
    summary = "DCGAN (Radford et al. 2016): the GAN discriminator (backbone + real/fake logit) is the encoder"
    phases = ("d", "g")

    @dataclass
    class Params:
        z_dim: int = 100  # dimension of the noise z ~ N(0, I) fed to the generator
        gen_width: int = 64  # generator channels at its last hidden layer (DCGAN's ngf); x2 per layer up
        real_label: float = 0.9  # target for real images in D's loss; < 1 is one-sided label smoothing
        beta1: float = 0.5  # Adam's beta1 for both players (DCGAN, Sec. 4); beta2 is 0.999
        diffaug: str = ""  # DiffAugment of D's inputs, e.g. "color,translation,cutout" (Zhao et al. 2020)
        map_head: bool = False  # the logit reads the backbone's last feature map flattened (the paper's D:
        #                         its 4x4 map into one linear unit), not the pooled features
        d_batch: str = "joint"  # how D's BatchNorm sees reals and fakes: "joint", one batch [x; G(z)] and its
        #  statistics; "separate", two batches each with its own (the reference code's D(x), D(G(z)));
        #  "reals", one batch normalised with the reals' statistics (reference batch normalisation)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if self.hp.map_head:  # D = d_head(flatten(last map of backbone(x)))
            self.d_head = LinearClassifier(math.prod(self.backbone.last_map_shape(
                cfg.data.image_size, self.backbone_spec()["in_chans"])), 1)
        else:  # D = d_head(backbone(x))
            self.d_head = LinearClassifier(self.backbone.out_dim, 1)
        self.generator = build_generator(self.hp.z_dim, cfg.data.image_size, self.hp.gen_width)
        diffaug_params(1, cfg.data.image_size, self.hp.diffaug, torch.Generator(), "cpu")  # checks the policy
        if self.hp.d_batch not in D_BATCH:
            raise ConfigError(f"params.d_batch must be one of {', '.join(D_BATCH)}, not {self.hp.d_batch!r}")

    # -- pieces ----------------------------------------------------------------------------------
    def discriminator(self, x: torch.Tensor, aug: dict | None = None) -> torch.Tensor:
        """D's logits of the normalised images ``x``, DiffAugmented first when ``aug`` has parameters."""
        x = self.d_view(x, aug)
        f = self.backbone.forward_stages(x)[-1].flatten(1) if self.hp.map_head else self.backbone(x)
        return self.d_head(f).float().squeeze(1)

    def joint_discriminator(self, x: torch.Tensor, fake: torch.Tensor, aug: dict | None) -> torch.Tensor:
        """D's logits of the batch ``[x; fake]``; with ``d_batch: reals`` its BatchNorm layers normalise the
        whole batch with the statistics of the reals ``x`` (:func:`reference_batchnorm`)."""
        both = torch.cat([x, fake])
        if self.hp.d_batch != "reals":
            return self.discriminator(both, aug)
        with reference_batchnorm(self.backbone, x.shape[0]):
            return self.discriminator(both, aug)

    # -- the step --------------------------------------------------------------------------------
    def phase_step(self, batch, phase):
        x, z, aug = batch
        b = x.shape[0]
        separate = self.hp.d_batch == "separate"
        if phase == "d":
            with torch.no_grad():
                fake = self.fake(z)
            if separate:
                real_logits = self.discriminator(x, half(aug["d"], 0, b))
                fake_logits = self.discriminator(fake, half(aug["d"], b, 2 * b))
            else:
                logits = self.joint_discriminator(x, fake, aug["d"])
                real_logits, fake_logits = logits[:b], logits[b:]
            return {"loss": d_loss(real_logits, fake_logits, self.hp.real_label),
                    **d_accuracies(real_logits, fake_logits)}
        if phase == "g":
            if separate:  # the reference code's G step: D(G(z)) alone
                return {"loss": g_loss(self.discriminator(self.fake(z), half(aug["g"], b, 2 * b)))}
            return {"loss": g_loss(self.joint_discriminator(x, self.fake(z), aug["g"])[b:])}
        raise ValueError(f"unknown phase '{phase}'")

    def param_groups(self):
        betas = (self.hp.beta1, 0.999)
        d = list(self.backbone.parameters()) + list(self.d_head.parameters())
        return (split_decay(d, phase="d", betas=betas)
                + split_decay(self.generator.parameters(), phase="g", betas=betas))

    # -- pictures --------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self, n: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` generated images in [0, 1] from a fixed noise seed."""
        z = self.sample_noise(n, torch.Generator().manual_seed(seed), torch.device(device))
        return self.to_images(self.generator(z))

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        n = 8
        fakes = self.samples(3 * n, device=device).cpu()
        rows = [sample_images(data, n)] + list(fakes.split(n))
        path = image_grid(rows, out_dir / "dcgan_samples.png", row_titles=["real"] + ["G(z)"] * 3,
                          title="DCGAN: real images (top) and samples G(z) of fixed noise")
        return [path]

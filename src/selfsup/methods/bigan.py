"""BiGAN / ALI: learn an encoder by adversarial inference (Donahue, Krähenbühl & Darrell, ICLR 2017,
arXiv 1605.09782; Dumoulin et al., "Adversarially Learned Inference", ICLR 2017, arXiv 1606.00704).

An encoder ``E`` (the backbone + a linear map to ``z``) and a generator ``G`` are trained together so
that the joint pairs ``(x, E(x))`` of real images and ``(G(z), z)`` of noise cannot be told apart by
a discriminator ``D(x, z)`` that sees both the image and the code. At the optimum ``E`` inverts
``G`` (BiGAN, Theorem 2), so ``E`` must capture what ``G`` needs to draw an image: the features
evaluated downstream are ``E``'s backbone.

Algorithm (one training step; two optimizers, phase "d" then phase "g" for E and G together)::

    x = augment(images)                      # light: random flip (preset), normalised as evaluation
    z ~ N(0, I)                              # (B, z_dim), drawn from the step's generator
    fake = norm((tanh(G(z)) + 1) / 2)        # G's images in [0, 1], normalised exactly like x
    # phase d: the joint discriminator (E, G fixed)
    r, f = D(x, E(x).detach()), D(fake.detach(), z)
    loss_d = BCE(r, real_label) + BCE(f, 0)
    # phase g: E and G fool D, non-saturating (labels swapped; BiGAN Sec. 3.4)
    r, f = D(x, E(x)), D(fake, z)
    loss_g = BCE(r, 0) + BCE(f, 1)

``D(x, z) = joint([Dx(x); Dz(z)])``: ``Dx`` is a small DCGAN-style conv net (4x4 stride-2
convolutions + LeakyReLU(0.2) down to 4x4 or 6x6, then a valid convolution to ``disc_hidden``
channels), separate from the backbone; ``Dz`` a 2-layer MLP; ``joint`` a 2-layer MLP to one logit;
dropout on every hidden layer of ``D`` as in ALI (0.2; its masks come from the global RNG, which
checkpoints hold, so a resumed run replays them). ``D`` has no BatchNorm, so reals and fakes can go
through it in separate batches.

What the backbone sees: evaluation feeds it ``(x - mean) / std`` (``eval_view``), so ``E`` is
trained on exactly that; ``D`` sees the same normalised images, real or generated.

Defaults: Adam, lr 2e-4, betas (0.5, 0.999), batch 128 (BiGAN Sec. 4 and ALI's CIFAR setup; the
preset's ``optim.lr`` 4e-4 per 256 images is 2e-4 at batch 128), constant rate. ``z`` has 100 dims
(BiGAN: 200 on ImageNet, ALI: 64 on CIFAR-10). Generator: the DCGAN one shared with ``dcgan``
(scaled to 32-96 px as described there). The encoder is the run's backbone (convnet or resnet18)
instead of BiGAN's AlexNet, with a linear map of its pooled features to ``z`` (deterministic, as in
BiGAN; ALI's encoder is stochastic). Augmentation: horizontal flips only. ``params.diffaug`` applies
DCGAN's DiffAugment option to the images D sees (E encodes the plain view); off in the preset: in a
5-minute CIFAR-10 run (convnet, batch 128) kNN 0.278 / linear 0.323 with it, 0.286 / 0.299 without, both
far below random init (0.422 / 0.444).

``params.enc_bn`` (the preset; not in the papers): a BatchNorm on E's output, so the codes start with the
prior's mean and variance per dimension. Without it the untrained encoder's codes are far narrower than
``z`` (std 0.44 against 1 on CIFAR-10), D tells the real pairs by their codes within ~40 steps and wins
from then on, and E's features fall far below an untrained network's; with it the game stays balanced
(5-minute CIFAR-10 runs: kNN 0.279 -> 0.336, linear 0.311 -> 0.417; benchmarks/results/bigan_5m_fp32.md).

``params.map_head``: E's linear map to ``z`` reads the last feature map flattened, as BiGAN's AlexNet encoder
has fully connected layers on its conv5 map, instead of the pooled features; measured, not adopted (5-minute
run: 0.346 / 0.412 against 0.336 / 0.417 with the linear map on the pooled features, both without cycle).

``params.cycle`` (the preset: 200; not in BiGAN): ALICE's explicit cycle consistency (Li et al., "ALICE: Towards
Understanding Adversarial Learning for Joint Distribution Matching", NeurIPS 2017, arXiv 1709.01215, Sec. 4:
the conditional entropy H(x|z) bounded by a reconstruction loss). In the g phase E and G also minimise
``cycle * mean((G(E(x)) - x)^2)`` on pixels in [-1, 1]::

    loss_g = BCE(D(x, E(x)), 0) + BCE(D(G(z), z), 1) + cycle * mse(G(E(x)), x)

Why (a reading, not measured): early in training G draws noise, so D tells the pairs apart by the image alone
and all E is pushed towards is codes that look like draws of the prior, whatever x is; E's features drift
below an untrained network's (kNN 0.336 at 5 minutes against random init's 0.422). The cycle term makes E's
code carry what G needs to redraw x from the first step. 5-minute CIFAR-10 runs (convnet, a fp32 machine, 164-188
steps; benchmarks/results/bigan_5m_fp32.md), weight 0 / 1 / 10 / 50 / 200 / 1000: kNN 0.336 / 0.365 / 0.400 /
0.414 / 0.431 / 0.435, linear 0.417 / 0.440 / 0.460 / 0.471 / 0.473 / 0.470. From 200 on the reconstruction
is most of E and G's gradient (the term is about 16 against the adversarial 4-5 at 200) and the features stop
improving; at 1000 G ignores D (D(G(z)) 0.06), at 200 the game is still played (D(G(z)) 0.20-0.27). The
control, ``adversarial = 0`` (E and G an autoencoder), gives 0.433 / 0.461 against three seeds of the preset's
0.431-0.441 / 0.465-0.473: at this budget E learns as the encoder of an autoencoder whose decoder is G, and the
joint discriminator adds at most about 0.01 of linear probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.views import eval_view
from ..figures import image_grid, sample_images
from .base import Method, split_decay
from .dcgan import (GeneratorPlayer, build_generator, d_accuracies, d_loss, dcgan_init, diffaug_params,
                    generator_plan)


class JointDiscriminator(nn.Module):
    """``D(x, z)``: an image branch, a code branch and a joint MLP to one real/fake logit."""

    def __init__(self, image_size: int, z_dim: int, width: int = 64, hidden: int = 512,
                 dropout: float = 0.2, in_chans: int = 3) -> None:
        super().__init__()
        base, n = generator_plan(image_size)  # mirror of the generator: n halvings down to base x base
        layers: list[nn.Module] = []
        c = in_chans
        for i in range(n):
            c_out = width * min(2**i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout)]
            c = c_out
        layers += [nn.Conv2d(c, hidden, base), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
                   nn.Flatten()]
        self.x_branch = nn.Sequential(*layers)
        self.z_branch = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout))
        self.joint = nn.Sequential(
            nn.Linear(2 * hidden, 2 * hidden), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
            nn.Linear(2 * hidden, 1))
        dcgan_init(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.x_branch(x), self.z_branch(z)], dim=1)
        return self.joint(h).float().squeeze(1)


class BiGAN(GeneratorPlayer, Method):
    name = "bigan"
    family = "generation-based"
    summary = "BiGAN/ALI (Donahue et al. 2017, Dumoulin et al. 2017): encoder + generator vs a joint D(x, z)"
    phases = ("d", "g")

    @dataclass
    class Params:
        z_dim: int = 100  # dimension of the noise z ~ N(0, I) and of the encoder's output E(x)
        gen_width: int = 64  # generator channels at its last hidden layer (DCGAN's ngf)
        disc_width: int = 64  # channels of D's first image conv; x2 per halving, at most x8
        disc_hidden: int = 512  # width of D's image/code features and joint MLP (joint: 2x)
        dropout: float = 0.2  # dropout on D's hidden layers (ALI)
        real_label: float = 1.0  # target for (x, E(x)) in D's loss; < 1 is one-sided label smoothing
        beta1: float = 0.5  # Adam's beta1 for both players; beta2 is 0.999
        diffaug: str = ""  # DiffAugment of the images D sees (dcgan.diff_augment), e.g. "color,translation,cutout"
        enc_bn: bool = False  # BatchNorm1d on E's output (not in the papers): E(x) starts with the prior's mean
        # and variance per dimension, as z ~ N(0, I) has, instead of near-constant codes
        map_head: bool = False  # E's linear map to z reads the backbone's last feature map flattened (as
        # BiGAN's AlexNet encoder has fully connected layers on its conv5 map), not the pooled features
        cycle: float = 0.0  # weight of ALICE's explicit cycle consistency on x (Li et al. 2017): E and G also
        # minimise the mean squared error of G(E(x)) against x (pixels in [-1, 1], the generator's range);
        # 0: BiGAN as the paper
        adversarial: float = 1.0  # weight of the adversarial term in E and G's loss; 0 with cycle > 0 leaves E and
        # G an autoencoder (D still trains, unused): the control for what the game adds to the cycle term

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        self.generator = build_generator(hp.z_dim, cfg.data.image_size, hp.gen_width)
        self.enc_head = nn.Linear(self._enc_in(cfg.data.image_size), hp.z_dim)  # E = enc_head(backbone(x))
        if hp.enc_bn:
            self.enc_head = nn.Sequential(self.enc_head, nn.BatchNorm1d(hp.z_dim))
        self.disc = JointDiscriminator(cfg.data.image_size, hp.z_dim, hp.disc_width, hp.disc_hidden, hp.dropout)
        diffaug_params(1, cfg.data.image_size, hp.diffaug, torch.Generator(), "cpu")  # checks the policy

    # -- pieces ----------------------------------------------------------------------------------
    def _enc_in(self, size: int) -> int:
        """Width of E's input: the pooled features, or with ``map_head`` the last feature map's size."""
        if not self.hp.map_head:
            return self.backbone.out_dim
        return math.prod(self.backbone.last_map_shape(size, self.backbone_spec()["in_chans"]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_stages(x)[-1].flatten(1) if self.hp.map_head else self.backbone(x)
        return self.enc_head(f).float()

    # -- the step (prepare, fake, sample_noise: GeneratorPlayer) --------------------------------------
    def phase_step(self, batch, phase):
        x, z, aug = batch
        b = x.shape[0]

        def d_views(real, fake):  # DiffAugment (params.diffaug) of the images D sees; E sees x as it is
            both = self.d_view(torch.cat([real, fake]), aug[phase])
            return both[:b], both[b:]

        if phase == "d":
            with torch.no_grad():
                ex, fake = self.encode(x), self.fake(z)
            dx, dfake = d_views(x, fake)
            real_logits, fake_logits = self.disc(dx, ex), self.disc(dfake, z)
            return {"loss": d_loss(real_logits, fake_logits, self.hp.real_label),
                    **d_accuracies(real_logits, fake_logits)}
        if phase == "g":
            ex = self.encode(x)
            dx, dfake = d_views(x, self.fake(z))
            real_logits, fake_logits = self.disc(dx, ex), self.disc(dfake, z)
            loss = self.hp.adversarial * d_loss(fake_logits, real_logits)  # swapped labels: fakes -> 1, reals -> 0
            out = {"enc_z_std": ex.detach().std(0).mean()}
            if self.hp.cycle:  # ALICE: G(E(x)) ~ x
                out["cycle"] = F.mse_loss(self.generator(ex).float(), self.pixels(x) * 2 - 1)
                loss = loss + self.hp.cycle * out["cycle"]
            return {"loss": loss, **out}
        raise ValueError(f"unknown phase '{phase}'")

    def param_groups(self):
        betas = (self.hp.beta1, 0.999)
        eg = [*self.backbone.parameters(), *self.enc_head.parameters(), *self.generator.parameters()]
        return (split_decay(self.disc.parameters(), phase="d", betas=betas)
                + split_decay(eg, phase="g", betas=betas))

    # -- pictures --------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self, n: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` generated images in [0, 1] from a fixed noise seed."""
        z = self.sample_noise(n, torch.Generator().manual_seed(seed), torch.device(device))
        return self.to_images(self.generator(z))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``G(E(x))`` in [0, 1] of uint8 images ``(B, 3, H, W)``, through the evaluation view."""
        return self.to_images(self.generator(self.encode(self.fmt(eval_view(images, self.cfg.aug)))))

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        n = 8
        real = sample_images(data, 2 * n)
        rec = self.reconstruct(torch.from_numpy(real).permute(0, 3, 1, 2).to(device)).cpu()
        recon = image_grid([real[:n], rec[:n], real[n:], rec[n:]], out_dir / "bigan_reconstructions.png",
                           row_titles=["x", "G(E(x))", "x", "G(E(x))"],
                           title="BiGAN: images x and their reconstructions G(E(x))")
        fakes = self.samples(3 * n, device=device).cpu()
        samples = image_grid(list(fakes.split(n)), out_dir / "bigan_samples.png", row_titles=["G(z)"] * 3,
                             title="BiGAN: samples G(z) of fixed noise")
        return [recon, samples]

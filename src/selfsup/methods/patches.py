"""Whitened patches: the label-free single-layer features of Thiry, Arbel, Belilovsky & Oyallon, "The
Unreasonable Effectiveness of Patches in Deep Convolutional Kernels Methods" (ICLR 2021,
arXiv:2101.07528), after Coates, Lee & Ng, "An Analysis of Single-Layer Networks in Unsupervised
Feature Learning" (AISTATS 2011). No gradient: the layer is fitted from the images in one pass, in
seconds to minutes of CPU, and is the baseline every deep method at a small budget must beat.

Algorithm (Thiry et al. Sec. 2-3; the reference code is github.com/louity/patches, ``kneighbors.py``)::

    P = random 6x6 patches of the training images (evaluation view: normalised as evaluation feeds)
    mu, C = mean(P), cov(P)                            # over d = 3 * 6 * 6 = 108 dimensions
    U, L = eigh(C);  W = U (L + eps)^(-1/2) U^T         # ZCA whitening, regularised
    D = K patches of P drawn at random                 # the dictionary: no k-means (Thiry), raw patches
    for every 6x6 window x of an image (stride 1, no padding: 27 x 27 at 32 px):
        code(x)  = 1[atom j among the Q nearest of x   in whitened space]   # K binary features
        code(-x) = 1[atom j among the Q nearest of -x  in whitened space]   # the other polarity
    features = adaptive_avg_pool(codes, grid x grid)   # 2 * K * grid^2 features

Departures from the reference code, and why:

* Pooling: the reference pools to 9 x 9 (average, 5 x 5 windows, stride 3; 331,776 features at
  K = 2048) and trains a low-rank convolutional classifier on them (82.3-82.7%; a plain linear
  classifier on the flattened features: 81.6%). Here the code is pooled to ``grid`` x ``grid``
  (default 2: Coates et al.'s four quadrants), so the features fit the shared evaluation (kNN,
  linear probe on features held in memory): K = 1024 gives 8,192 features.
* Normalisation: the reference computes the whitening and the dictionary on raw [0, 1] pixels but
  feeds the layer images normalised by the dataset's mean and std; here both see the same
  evaluation view. Its whitening epsilon, 1e-3 absolute on [0, 1] pixels, is relative here
  (``whiten_eps`` times the mean eigenvalue, which on [0, 1] CIFAR-10 patches is about 0.06:
  0.0167 is the reference's value).
* Whitening statistics from ``fit_patches`` random patches (default 200,000) instead of all 36.5
  million of CIFAR-10's training set: a 108 x 108 covariance is estimated well from far fewer.
* Selection (``select="threshold"``, the default): instead of the Q largest of the K scores at
  each window (a per-window selection, 22 images/s on 2 cores at K = 1024: 45 minutes to encode
  CIFAR-10's 60,000 images for the evaluation), the atoms whose score is at least the window's mean
  plus ``z`` standard deviations of its K scores. A score is linear in the window, so both moments
  come from one convolution with 2 x 110 filters (:meth:`PatchEncoder.moment_filters`); ``z`` is fitted
  as the mean standardised Q-th largest score over the windows of ``calibrate_images`` training
  images (0.481 at K = 1024, Q = 410; its spread over windows is 0.014, so one z fits all windows;
  the Gaussian quantile would be 0.253). Measured on 256 CIFAR-10 training images (fit seed 0; ``benchmarks/patches_select.py``): 148
  against 22 images/s, 99.3% of the codes equal to the exact ones, 40.08% of the atoms coded (exact
  40.04%), pooled features correlated 0.9997 (0.5% of them differ by more than 0.05, in flat
  regions where ties move whole blocks of windows). ``select="exact"`` keeps the reference's code.
* Q = ``q_frac`` K with ``q_frac = 0.4``, the value of every command of the reference repository
  (its ablation: Q = 800 of 2048 best).
* Output whitening (``whiten_dim``, default 1,024; 0 turns it off): the pooled codes are PCA-whitened
  (Jegou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012) with the mean
  and covariance of the codes of ``whiten_images`` training images (no labels), regularised by
  ``whiten_out_eps`` times the mean kept eigenvalue. The reference only trains classifiers on the
  codes (the linear probe here standardises its features too); the kNN protocol compares features
  by cosine, and the raw codes (non-negative fractions, about 0.4 each) are dominated by their common
  part and by the few directions of largest variance. On CIFAR-10
  (K = 1024, grid 2; kNN k = 200 on the 8,192 features; ``benchmarks/patches_whitening.py``): raw
  0.478, centred 0.497, standardised per feature 0.538, PCA-whitened from 10,000 images to 512 /
  1,024 / 2,048 dimensions 0.663 / 0.671 / 0.674 (eps 0.03; eps 0.1: 0.659 / 0.666 / 0.673; 20,000
  images and 1,024 dimensions: 0.673). The linear probe loses a little: 0.711 on the raw 8,192
  features, 0.686 on 1,024 whitened ones, 0.687 on 2,048. More atoms do not help the whitened kNN
  (10,000 / 2,000 training / test images: K = 2048 0.635 against K = 1024 0.638, at 2.6x the
  encoding time); a 3 x 3 pooling grid adds 0.015 (0.653) there, and on all of CIFAR-10 (18,432
  features whitened to 2,048 dimensions by the randomized path of ``pca_whitening``) gives kNN
  0.692 / linear 0.707 (``benchmarks/results/fast_recipe_v2_grid3_seed0.json``). Fitting it costs the encoding of
  ``whiten_images`` images and an eigendecomposition of the 8,192 x 8,192 covariance (65 s in float32
  on 2 cores).
* Power normalisation (``power``, default 1: off; ``--recipe fast``: 0.5): the pooled codes are
  raised to ``power`` before the output whitening (Perronnin, Sanchez & Mensink, "Improving the
  Fisher kernel", ECCV 2010: the square root of a histogram of visual words damps the words that
  occur everywhere). On the cached codes of one grid-3 layer (``benchmarks/patches_whitening.py
  --power``, whitened to 2,048): kNN 0.691 -> 0.716, linear 0.703 -> 0.715; powers 0.25 / 0.35 /
  0.5: 0.705 / 0.716 / 0.714-0.716 (the randomized SVD moves the kNN by about 0.002 between runs).
* Mirror average (``flip``, default off; ``--recipe fast``: on): the pooled codes are averaged with
  those of the horizontally mirrored image, a fixed label-free average of two views, at twice the
  encoding time. On the same codes: kNN 0.691 -> 0.695, linear 0.703 -> 0.732; with the square root
  0.723 / 0.741 (``benchmarks/results/patches_whitening_grid3.md``).

The fitted layer is the backbone ``patches`` (:class:`selfsup.backbones.PatchEncoder`): the
checkpoint stores its buffers and its sizes (backbone spec ``options``), so evaluation, export and
``load_backbone`` rebuild it like any other backbone. ``model.backbone`` is not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones import PatchEncoder, backbone_spec
from ..config import ConfigError
from ..figures import image_grid
from .base import Method

FIT_CHUNK = 4096  # images read from the decode cache at once while sampling patches


def sample_patches(images: np.ndarray, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random ``size`` x ``size`` patches ``(n, size, size, C)`` (uint8) of uint8 NHWC ``images``:
    an image and a position drawn uniformly for each (repeats possible), read in image order."""
    count, h, w = images.shape[:3]
    if size > min(h, w):
        raise ConfigError(f"params.patch_size={size} is larger than the {h}x{w} images")
    which = np.sort(rng.integers(0, count, n))
    ys, xs = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    out = np.empty((n, size, size, images.shape[3]), dtype=np.uint8)
    dy, dx = np.arange(size)[:, None], np.arange(size)[None, :]
    for lo in range(0, n, FIT_CHUNK):
        hi = min(n, lo + FIT_CHUNK)
        uniq, inv = np.unique(which[lo:hi], return_inverse=True)
        block = np.asarray(images[uniq])  # one read of each image of the chunk
        out[lo:hi] = block[inv[:, None, None], ys[lo:hi, None, None] + dy, xs[lo:hi, None, None] + dx]
    return out


def whitening(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu, W, eigenvalues)`` of the rows of ``x`` ``(n, d)``: the mean and the ZCA whitening
    ``W = U (L + eps * mean(L))^(-1/2) U^T`` of their covariance ``U L U^T`` (float64)."""
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / max(1, len(x) - 1)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0)
    reg = eps * float(evals.mean())
    w = evecs @ torch.diag((evals + reg).rsqrt()) @ evecs.T
    return mu, w, evals


class Patches(Method):
    name = "patches"
    family = "dictionary"
    summary = ("Whitened patches (Thiry et al. 2021, after Coates & Ng 2011): one layer fitted without "
               "gradient, q-nearest-atom codes of 6x6 windows")
    phases = ()  # closed form: the trainer calls fit() once, no optimizer, no steps

    @dataclass
    class Params:
        num_atoms: int = 1024  # K, the dictionary's size; Thiry 2048 (K = 512 / 1024 / 2048: 78.5 / 80.5 / 82.7%)
        patch_size: int = 6  # window side; Thiry and Coates 6 (ablation: 5 to 7 within 0.6%)
        q_frac: float = 0.4  # Q = q_frac * K nearest atoms coded 1 (Thiry's commands: 0.4)
        whiten_eps: float = 0.0167  # regulariser, relative to the mean eigenvalue (see the module docstring)
        fit_patches: int = 200_000  # patches sampled for the whitening statistics and the dictionary
        grid: int = 2  # the codes are average-pooled to grid x grid (Coates' quadrants)
        select: str = "threshold"  # "exact": the q nearest atoms; "threshold": mean + z std (see the docstring)
        calibrate_images: int = 256  # training images whose windows calibrate z (select="threshold")
        whiten_dim: int = 1024  # PCA-whiten the pooled codes to this many dimensions (0: the raw codes; at most 2K grid^2)
        whiten_images: int = 10_000  # training images whose codes fit the output whitening
        whiten_out_eps: float = 0.03  # its regulariser, relative to the mean kept eigenvalue
        power: float = 1.0  # the pooled codes ** power before the output whitening (0.5: square root; see the docstring)
        flip: bool = False  # average the pooled codes with the mirrored image's (twice the encoding time)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        hp = self.hp
        q = int(round(hp.q_frac * hp.num_atoms))
        if hp.num_atoms < 2 or not 1 <= q < hp.num_atoms:
            raise ConfigError(f"params.num_atoms must be >= 2 and params.q_frac in (0, 1) with at least one atom "
                              f"coded (got K={hp.num_atoms}, q_frac={hp.q_frac})")
        if hp.fit_patches < hp.num_atoms or hp.whiten_eps < 0 or hp.grid < 1:
            raise ConfigError("params.fit_patches must be >= params.num_atoms, params.whiten_eps >= 0, "
                              "params.grid >= 1")
        if hp.patch_size > cfg.data.image_size:
            raise ConfigError(f"params.patch_size={hp.patch_size} is larger than the {cfg.data.image_size} px images")
        if hp.select not in ("exact", "threshold") or hp.calibrate_images < 1:
            raise ConfigError(f"params.select must be 'exact' or 'threshold' (got {hp.select!r}) and "
                              f"params.calibrate_images >= 1")
        if hp.whiten_dim < 0 or hp.whiten_images < 2 or hp.whiten_out_eps < 0:
            raise ConfigError("params.whiten_dim must be >= 0 (0: no output whitening), params.whiten_images >= 2, "
                              "params.whiten_out_eps >= 0")
        if not 0 < hp.power <= 1:
            raise ConfigError(f"params.power must be in (0, 1] (1: the pooled codes as they are), got {hp.power}")
        self.options = {"k": hp.num_atoms, "patch": hp.patch_size, "q": q, "grid": hp.grid, "select": hp.select}
        if hp.power != 1:
            self.options["power"] = hp.power
        if hp.flip:
            self.options["flip"] = True
        if hp.whiten_dim:  # at most the pooled features' 2 K grid^2 dimensions
            self.options["whiten"] = min(hp.whiten_dim, 2 * hp.num_atoms * hp.grid ** 2)
        self.backbone = PatchEncoder(cfg.data.image_size, 3, **self.options)  # the run's model.backbone is unused
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("atoms", torch.zeros(hp.num_atoms, 3, hp.patch_size, hp.patch_size))  # for figures

    def backbone_spec(self) -> dict:
        spec = backbone_spec("patches", self.cfg.data.image_size, False, 3, self.options)
        spec["input"] = "rgb"
        spec["weights"] = "backbone"
        return spec

    def param_groups(self):
        return []

    def _view(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC ``images`` (or patches) as the evaluation feeds them: ``(n, 3, h, w)`` float32 in
        [0, 1], normalised by the run's mean and std."""
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.cfg.aug.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.aug.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def fit(self, images: np.ndarray, device: torch.device, seed: int) -> dict[str, float]:
        """Fit the whitening and the dictionary from uint8 NHWC ``images`` (no labels); returns what to
        log: the regulariser, the eigenvalue range and the quantisation error (mean squared whitened
        distance of a patch to its nearest atom, per dimension)."""
        hp = self.hp
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        raw = sample_patches(images, hp.fit_patches, hp.patch_size, rng)
        x = self._view(raw).flatten(1)  # (n, 3 p p), the conv's layout
        mu, w, evals = whitening(x, hp.whiten_eps)
        pick = torch.from_numpy(rng.choice(len(x), hp.num_atoms, replace=False))
        atoms = x[pick].double() - mu  # centred atoms, (K, d)
        m = w @ w  # W^T W (W is symmetric)
        kernel = atoms @ m  # <x - mu, W^T W (p - mu)> = <x, kernel> - <mu, kernel>
        enc = self.backbone
        enc.kernel.copy_(kernel.view_as(enc.kernel).float())
        enc.bias.copy_((-(kernel @ mu)).float())
        enc.norms.copy_((kernel * atoms).sum(1).float())  # |W (p - mu)|^2
        self.atoms.copy_(x[pick].view_as(self.atoms))
        self.fitted.fill_(True)
        self.whitening_ = (mu, w)  # for inspection (tests); the layer needs only the buffers above
        self.to(device)
        probe = (x[:10_000].double() - mu) @ w  # whitened patches; atoms whitened: atoms @ w
        d2 = torch.cdist(probe, atoms @ w).pow(2).min(1).values / x.shape[1]
        # z of the threshold selection: from the exact q-th largest scores of the windows of a sample of
        # training images (the same for select="exact", where it is only recorded)
        which = np.sort(rng.choice(len(images), min(len(images), hp.calibrate_images), replace=False))
        zs = enc.calibrate(self._view(images[which]).to(device))
        info = {"loss": float(d2.mean()), "whiten_eps": hp.whiten_eps * float(evals.mean()),
                "eig_min": float(evals.min()), "eig_max": float(evals.max()), "z": float(enc.z.mean()),
                "z_spread": float(zs.std(1).mean())}
        if hp.whiten_dim:  # the output whitening, from the pooled codes of a sample of training images
            which = np.sort(rng.choice(len(images), min(len(images), hp.whiten_images), replace=False))
            pooled = []
            for lo in range(0, len(which), FIT_CHUNK):
                pooled.append(enc.pooled_features(self._view(images[which[lo:lo + FIT_CHUNK]]).to(device)).cpu())
            pooled = torch.cat(pooled)
            t1 = time.perf_counter()
            fe = enc.fit_output_whitening(pooled.to(device), hp.whiten_out_eps)
            total = float(pooled.var(0).sum())  # float32: no float64 copy of the codes (1.5 GB at grid 3)
            info.update({"out_var_kept": float(fe.double().sum()) / max(total, 1e-12), "out_eig_top": float(fe[0]),
                         "out_whiten_s": time.perf_counter() - t1})
        info["fit_s"] = time.perf_counter() - t0
        return info

    @torch.no_grad()
    def figures(self, data, out_dir, device):
        """``patches.png``: 16 atoms of the dictionary as image patches, and the same atoms whitened
        (each scaled to its own range): the whitened atoms are the edges and colour contrasts the layer
        compares every window with."""
        from ..figures import unnormalize

        n = min(16, self.hp.num_atoms)
        atoms = self.atoms[:n].float().cpu()
        # the whitened atom W^T W (p - mu) (the layer's filter), each scaled to [0, 1]
        white = self.backbone.kernel[:n].float().cpu().flatten(1)
        lo, hi = white.amin(1, keepdim=True), white.amax(1, keepdim=True)
        white = (white - lo) / (hi - lo).clamp_min(1e-8)
        rows = [unnormalize(atoms, self.cfg.aug), white.view_as(atoms)]
        return [image_grid(rows, Path(out_dir) / "patches.png", row_titles=["atoms", "whitened"],
                           title=f"patches: {n} of the {self.hp.num_atoms} atoms ({self.hp.patch_size}x"
                                 f"{self.hp.patch_size} px), as sampled and whitened (W^T W (p - mu))", scale=0.8)]

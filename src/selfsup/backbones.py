"""Backbones: torchvision ResNets (optionally with a small-image stem), a small fast ConvNet, and
Vision Transformers (tiny / small, built from torchvision's ViT modules).

Every backbone maps images ``(B, C, H, W)`` to pooled features ``(B, out_dim)`` and exposes its
intermediate stages through :meth:`Backbone.forward_stages` (feature taps for layer-wise probes and
feature-map pictures). Weights are always randomly initialised: nothing is downloaded.

The small-image stem (He et al. 2016, CIFAR variant as used by SimCLR and solo-learn) replaces the
7x7/2 conv1 and the max-pool with a 3x3/1 conv, so 32 px images keep enough spatial resolution; it is
the default for images of at most 64 px.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = ("resnet18", "resnet50", "convnet", "airbench", "vit_tiny", "vit_small", "vit_micro")
VITS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),  # width, depth, heads (DeiT / DINO sizes)
        "vit_micro": (64, 4, 2)}  # a test / CPU-demo size (~0.2M parameters), not a published model


class Backbone(nn.Module):
    """Base: ``stages`` is an ``nn.ModuleList`` applied in order; features are global-average pooled."""

    out_dim: int
    stage_names: list[str]
    stage_dims: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList()

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def last_map_shape(self, size: int, in_chans: int = 3) -> tuple[int, ...]:
        """``(C, H, W)`` of the last stage's map for ``size`` px images (for heads that read it unpooled):
        a shape probe in eval mode, so the BatchNorm statistics stay as they are."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            shape = tuple(self.forward_stages(torch.zeros(1, in_chans, size, size))[-1].shape[1:])
        self.train(was_training)
        return shape


class ResNet(Backbone):
    """torchvision ResNet without its classifier; stages: stem, layer1..layer4."""

    def __init__(self, name: str, small_stem: bool, in_chans: int = 3) -> None:
        super().__init__()
        import torchvision  # here, not at the top: torchvision.models costs 2 s to import (torch._dynamo)

        net = getattr(torchvision.models, name)(weights=None)
        if small_stem:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stages.append(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool))
        self.stages.extend([net.layer1, net.layer2, net.layer3, net.layer4])
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "layer4"]
        expansion = 4 if name == "resnet50" else 1
        self.stage_dims = [64] + [c * expansion for c in (64, 128, 256, 512)]
        self.out_dim = self.stage_dims[-1]


class ConvNet(Backbone):
    """A small, fast VGG-style ConvNet for CPU work: 4 stages of conv-BN-ReLU x2, the first three
    followed by 2x2 max-pooling; widths 32-64-128-256 (x ``width``)."""

    def __init__(self, in_chans: int = 3, width: int = 1) -> None:
        super().__init__()
        dims = [32 * width, 64 * width, 128 * width, 256 * width]
        c = in_chans
        for i, d in enumerate(dims):
            layers: list[nn.Module] = [
                nn.Conv2d(c, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
                nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            ]
            if i < len(dims) - 1:
                layers.append(nn.MaxPool2d(2))
            self.stages.append(nn.Sequential(*layers))
            c = d
        self.stage_names = [f"block{i + 1}" for i in range(len(dims))]
        self.stage_dims = dims
        self.out_dim = dims[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class _IdentityInitConv(nn.Conv2d):
    """3x3 'same' convolution, no bias, initialised as airbench's: the default init with its first
    ``in_channels`` filters set to the identity (an implicit residual at the start)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:min(c_in, c_out)])


class _ConvGroup(nn.Sequential):
    """airbench's ConvGroup: conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU (BN without a
    trainable scale, as airbench: its weight is frozen at 1)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        bn1, bn2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4), nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
        for bn in (bn1, bn2):
            bn.weight.requires_grad_(False)
        super().__init__(_IdentityInitConv(c_in, c_out), nn.MaxPool2d(2), bn1, nn.GELU(),
                         _IdentityInitConv(c_out, c_out), bn2, nn.GELU())


class Airbench(Backbone):
    """The network of Keller Jordan's CIFAR-10 speedruns (airbench94, github.com/KellerJordan/cifar10-airbench),
    without its classifier: a 2x2 convolution to ``2 * C * 4`` channels whose filters are the whitening of
    the training images' 2x2 patches (both signs) and stay frozen (:meth:`fit_data`, called by the
    trainer before the first step), GELU, then three conv groups of widths 64, 256, 256 (``width``
    scales them); features: the global max of the last map (airbench's final 3x3 max-pool at 32 px).
    Stages: whitening, group1, group2, group3."""

    WHITEN_EPS = 5e-4  # airbench's, on patches of images normalised by the dataset's mean and std

    def __init__(self, in_chans: int = 3, width: int = 64) -> None:
        super().__init__()
        w0 = 2 * in_chans * 4
        whiten = nn.Conv2d(in_chans, w0, 2, padding=0, bias=True)
        whiten.weight.requires_grad_(False)
        nn.init.zeros_(whiten.weight)  # zero until fit_data: an unfitted layer is plain to see
        nn.init.zeros_(whiten.bias)
        dims = [width, 4 * width, 4 * width]
        self.stages.append(nn.Sequential(whiten, nn.GELU()))
        c = w0
        for d in dims:
            self.stages.append(_ConvGroup(c, d))
            c = d
        self.stage_names = ["whiten", "group1", "group2", "group3"]
        self.stage_dims = [w0] + dims
        self.out_dim = dims[-1]

    @property
    def whiten(self) -> nn.Conv2d:
        return self.stages[0][0]

    @torch.no_grad()
    def fit_data(self, x: torch.Tensor) -> None:
        """Set the whitening filters from the 2x2 patches of ``x`` ``(N, C, H, W)`` (the evaluation view
        of training images): eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue + eps),
        with their negatives (airbench's ``init_whitening_conv``)."""
        c = x.shape[1]
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c * 4)
        cov = patches.T.double() @ patches.double() / len(patches)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.T.flip(0)  # largest first
        filters = (evecs / torch.sqrt(evals.clamp_min(0) + self.WHITEN_EPS)[:, None]).reshape(c * 4, c, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)


def vit_patch_size(image_size: int) -> int:
    """Patch side for a ViT on ``image_size`` images: 4 up to 32 px (64 tokens at 32 px), 8 up to 96 px,
    16 above (ImageNet's ViT-S/16)."""
    return 4 if image_size <= 32 else 8 if image_size <= 96 else 16


class ViT(Backbone):
    """A Vision Transformer (Dosovitskiy et al. 2021) from torchvision's modules (patch projection,
    class token, encoder blocks), with what self-supervised methods need on top:

    * any input size: the position embedding is interpolated (bicubic) to the input's patch grid, so
      multi-crop's small local crops go through the same network (as in DINO);
    * :meth:`forward_tokens` with ``keep``: only the given patch tokens enter the encoder (MAE's
      random masking);
    * feature taps: :meth:`forward_stages` returns the patch tokens after each quarter of the blocks as
      ``(B, D, h, w)`` maps.

    ``forward`` returns the class token after the final norm (``out_dim`` = width).
    """

    def __init__(self, name: str, image_size: int, in_chans: int = 3) -> None:
        super().__init__()
        dim, depth, heads = VITS[name]
        self.patch_size = vit_patch_size(image_size)
        if image_size % self.patch_size:
            raise ValueError(f"{name}: image_size {image_size} is not a multiple of the patch size {self.patch_size}")
        import torchvision

        vit = torchvision.models.VisionTransformer(image_size, self.patch_size, depth, heads, dim, 4 * dim)
        if in_chans != 3:
            vit.conv_proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.conv_proj, self.class_token, self.encoder = vit.conv_proj, vit.class_token, vit.encoder
        nn.init.trunc_normal_(self.class_token, std=0.02)
        self.grid = image_size // self.patch_size
        self.dim, self.depth = dim, depth
        self.taps = [depth // 4 * (i + 1) - 1 for i in range(4)]
        self.stage_names = [f"block{t + 1}" for t in self.taps]
        self.stage_dims = [dim] * 4
        self.out_dim = dim

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """``(1, 1 + h*w, D)``: the class position and the patch positions interpolated to ``h x w``."""
        pos = self.encoder.pos_embedding
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.to(pos.dtype).flatten(2).transpose(1, 2)], dim=1)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patch tokens with their position embedding ``(B, h*w, D)`` and the grid size."""
        t = self.conv_proj(x)
        h, w = t.shape[-2:]
        return t.flatten(2).transpose(1, 2) + self.pos_embed(h, w)[:, 1:], h, w

    def forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``(B, 1 + n, D)`` (class token first); with ``keep`` (B, n)
        only those patch indices are encoded."""
        t, h, w = self.patchify(x)
        if keep is not None:
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        cls = (self.class_token + self.encoder.pos_embedding[:, :1]).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        return self.encoder.ln(self.encoder.layers(self.encoder.dropout(t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        t, h, w = self.patchify(x)
        cls = (self.class_token + self.encoder.pos_embedding[:, :1]).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        maps = []
        for i, block in enumerate(self.encoder.layers):
            t = block(t)
            if i in self.taps:
                out = self.encoder.ln(t) if i == self.depth - 1 else t
                maps.append(out[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, h, w))
        return maps


EXACT_PCA_MAX_DIM = 8192  # pca_whitening: above, the leading axes come from a randomized SVD


def pca_whitening(x: torch.Tensor, dim: int, eps: float, exact_max_dim: int = EXACT_PCA_MAX_DIM
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu, P, eigenvalues)`` of the rows of ``x`` ``(n, d)``: with ``U L U^T`` their covariance
    (eigenvalues in decreasing order), ``P = U_dim (L_dim + eps * mean(L_dim))^(-1/2)``, so that
    ``(x - mu) @ P`` has the covariance ``L_dim / (L_dim + eps * mean(L_dim))`` (the identity at
    ``eps = 0``); axes without variance (fewer rows than ``dim``) get a zero column. Up to
    ``exact_max_dim`` features the covariance is accumulated in float64 and eigendecomposed in float32
    (65 s at d = 8,192 on 2 cores; the time grows as d^3); above, the ``dim`` leading axes come from a
    randomized SVD of the centred rows (Halko, Martinsson & Tropp 2011: ``torch.svd_lowrank``, 64 extra
    axes, 4 power iterations), whose time grows as n d dim."""
    n, d = x.shape
    mu = x.sum(0, dtype=torch.float64) / max(1, n)
    if d > exact_max_dim:
        xc = x.float() - mu.float()
        q = min(dim + 64, n, d)
        _, sv, evecs = torch.svd_lowrank(xc, q=q, niter=4)
        del xc
        evals = sv.square() / max(1, n - 1)
        if len(evals) < dim:  # fewer rows than dim: the missing axes have no variance
            evals = torch.cat([evals, evals.new_zeros(dim - len(evals))])
            evecs = torch.cat([evecs, evecs.new_zeros(d, dim - evecs.shape[1])], 1)
        evals, evecs = evals[:dim], evecs[:, :dim]
    else:
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for part in x.split(4096):  # (x - mu)^T (x - mu), without a float64 copy of all of x
            pc = part.double() - mu
            cov.addmm_(pc.T, pc)
        cov /= max(1, n - 1)
        evals, evecs = torch.linalg.eigh(cov.float())  # float32: 2x faster than float64
        evals, evecs = evals.flip(0)[:dim].clamp_min(0), evecs.flip(1)[:, :dim]
    proj = evecs / (evals + eps * evals.mean()).clamp_min(1e-12).sqrt()
    proj[:, evals <= 1e-5 * evals[0]] = 0  # fewer samples than dimensions: no direction without variance (float32)
    return mu.float(), proj.float(), evals.float()


class PatchEncoder(Backbone):
    """The single layer of the ``patches`` method (Thiry et al. 2021, Coates & Ng 2011): every
    ``patch`` x ``patch`` window of the image is whitened and compared with a dictionary of ``k``
    whitened patches; its code is 1 for the ``q`` nearest atoms (Thiry's one-hot of the q nearest
    neighbours), once for the window and once for its negative; the codes are average-pooled to a
    ``grid`` x ``grid`` map. ``out_dim = 2 * k * grid**2``. No trainable weights: the buffers are
    fitted from the data by :class:`selfsup.methods.patches.Patches`.

    With ``W`` the whitening, ``mu`` the patch mean and ``p_j`` the atoms, the squared whitened
    distance is ``|W(x - mu) - W(p_j - mu)|^2 = |W(x - mu)|^2 - 2 c_j + n_j`` with
    ``c_j = <x - mu, W^T W (p_j - mu)>`` (a convolution with ``kernel`` plus ``bias``) and
    ``n_j = |W(p_j - mu)|^2`` (``norms``), so the nearest atoms of ``x`` are those of largest
    ``c_j - n_j / 2``, and those of ``-x`` (in centred whitened space) of largest ``-c_j - n_j / 2``.

    ``select``: ``"exact"`` selects the q largest scores of every window (Thiry's code; a selection
    among k scores at each window, 22 images/s on 2 cores at k = 1024); ``"threshold"`` codes the atoms
    whose score is at least ``mean + z * std`` of the window's scores, both moments from one small
    convolution, ``z`` calibrated on training windows (148 images/s, 6.8x; on CIFAR-10 99.3% of the
    codes and a correlation of 0.9997 of the pooled features with the exact ones).

    ``flip``: the pooled codes are averaged with those of the horizontally mirrored image (a fixed
    average over the two views, no labels; the features become invariant to the mirror, at twice the
    encoding time).

    ``power != 1``: the pooled codes are raised to this power (power normalisation, Perronnin,
    Sanchez & Mensink 2010: with 0.5 the square root damps the atoms that are coded at many windows, as
    for a histogram of visual words) before the output whitening.

    ``whiten > 0``: the pooled (and powered) codes are PCA-whitened to ``whiten`` dimensions
    (``feat_mean``, ``feat_proj``, fitted from training images' codes by :meth:`fit_output_whitening`),
    ``out_dim = whiten``. The codes are non-negative fractions sharing a large common part; whitened,
    every direction counts in a cosine similarity, not the few of largest variance."""

    CHUNK = 32  # images encoded at once (the code map is 2k x 27 x 27 floats per image)

    def __init__(self, image_size: int = 32, in_chans: int = 3, k: int = 1024, patch: int = 6, q: int = 410,
                 grid: int = 2, select: str = "exact", whiten: int = 0, power: float = 1.0,
                 flip: bool = False) -> None:
        super().__init__()
        if not 1 <= q < k or patch > image_size or grid < 1:
            raise ValueError(f"patches: need 1 <= q < k (got q={q}, k={k}), patch <= image size, grid >= 1")
        if select not in ("exact", "threshold"):
            raise ValueError(f"patches: select must be 'exact' or 'threshold', not {select!r}")
        pooled = 2 * k * grid * grid
        if not 0 <= whiten <= pooled:
            raise ValueError(f"patches: whiten must be in [0, {pooled}] (the pooled features), not {whiten}")
        if not 0 < power <= 1:
            raise ValueError(f"patches: power must be in (0, 1], not {power}")
        self.k, self.patch, self.q, self.grid, self.select, self.whiten = k, patch, q, grid, select, whiten
        self.power, self.flip = float(power), bool(flip)
        self.register_buffer("kernel", torch.zeros(k, in_chans, patch, patch))
        self.register_buffer("bias", torch.zeros(k))
        self.register_buffer("norms", torch.zeros(k))
        # select="threshold": the q-th largest score of a window is taken as mean + z * std of its k
        # scores, z calibrated per polarity on the training windows (PatchEncoder.calibrate)
        self.register_buffer("z", torch.zeros(2))
        if whiten:  # PCA whitening of the pooled codes to `whiten` dimensions (fit_output_whitening)
            self.register_buffer("feat_mean", torch.zeros(pooled))
            self.register_buffer("feat_proj", torch.zeros(pooled, whiten))
        self.stage_names = ["codes"]
        self.stage_dims = [2 * k]
        self.pooled_dim = pooled
        self.out_dim = whiten or pooled

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "z", torch.zeros(2))  # layers fitted before select="threshold" existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The scores ``s_j = c_j - n_j / 2`` of every window of ``x`` ``(B, k, h, w)``, float32 (larger
        is nearer); those of the negative window are ``-c_j - n_j / 2 = -s_j - n_j``."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float().contiguous(memory_format=torch.channels_last)  # 1.7x faster on CPU
            return F.conv2d(x, self.kernel, self.bias - self.norms / 2)

    def moment_filters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A convolution ``(weight, bias)`` with ``2 * (d + 2)`` output channels (``d`` the window's
        size) that gives, for every window, the mean of its k scores and ``d + 1`` maps whose squares
        sum to their variance, for the window and for its negative. A score is linear in the window:
        ``s_j = <v_j, [x; 1]>`` with ``v_j = [kernel_j; bias_j - n_j / 2]`` (``[-kernel_j; -bias_j -
        n_j / 2]`` for the negative), so its mean over atoms is ``<mean(v), [x; 1]>`` and its variance
        ``[x; 1]^T C [x; 1] = |R [x; 1]|^2`` with ``C = R^T R`` the covariance of the ``v_j``."""
        k = self.k
        flat = self.kernel.flatten(1).double()
        weights, biases = [], []
        for sign in (1.0, -1.0):
            v = torch.cat([sign * flat, (sign * self.bias.double() - self.norms.double() / 2)[:, None]], 1)
            mean = v.mean(0, keepdim=True)
            vc = v - mean
            evals, evecs = torch.linalg.eigh(vc.T @ vc / k)
            r = evals.clamp_min(0).sqrt()[:, None] * evecs.T  # R = L^(1/2) U^T, R^T R = C
            rows = torch.cat([mean, r])  # (d + 2, d + 1)
            weights.append(rows[:, :-1])
            biases.append(rows[:, -1])
        w = torch.cat(weights).float().view(-1, *self.kernel.shape[1:])
        return w, torch.cat(biases).float()

    def _kth(self, s: torch.Tensor) -> torch.Tensor:
        """The q-th largest of the k scores of every window, ``(B, 1, h, w)``."""
        return s.kthvalue(self.k - self.q + 1, dim=1, keepdim=True).values

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Set ``z`` from images ``x`` (encoded ``CHUNK`` at a time): per polarity, the mean over their
        windows of the exact q-th largest score standardised by the window's mean and std over atoms;
        returns the per-window standardised values ``(2, n_windows)`` (their spread says how good one
        z is)."""
        parts = []
        for chunk in x.split(self.CHUNK):
            sp = self.scores(chunk)
            out = []
            for s in (sp, -sp - self.norms.view(1, -1, 1, 1)):
                mu, sd = s.mean(1, keepdim=True), s.std(1, keepdim=True, unbiased=False)
                out.append(((self._kth(s) - mu) / sd.clamp_min(1e-12)).flatten())
            parts.append(torch.stack(out))
        zs = torch.cat(parts, 1)
        self.z.copy_(zs.mean(1))
        return zs

    def code_maps(self, x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The boolean codes ``(B, k, h, w)`` of every window of ``x`` and of its negative.
        ``select="exact"``: the q atoms of largest score (a selection per window, ~10x the convolution's
        time on 2 cores); ``"threshold"``: the atoms whose score is at least ``mean + z * std`` of the
        window's k scores (computed by the small convolution of :meth:`moment_filters`, passed as
        ``moments`` to reuse it), about q of them."""
        sp = self.scores(x)
        norms = self.norms.view(1, -1, 1, 1)
        if self.select == "exact":
            sn = -sp - norms
            return sp >= self._kth(sp), sn >= self._kth(sn)
        w, b = moments if moments is not None else self.moment_filters()
        with torch.autocast(x.device.type, enabled=False):
            m = F.conv2d(x.float(), w, b)  # (B, 2 (d + 2), h, w)
        d2 = w.shape[0] // 2
        thr = [m[:, i * d2:i * d2 + 1] + self.z[i] * m[:, i * d2 + 1:(i + 1) * d2].square().sum(1, keepdim=True).sqrt()
               for i in (0, 1)]
        # the negative's code -s - n >= t  <=>  s + n <= -t
        return sp >= thr[0], torch.add(sp, norms) <= -thr[1]

    def codes(self, x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``(B, 2k, H - patch + 1, W - patch + 1)``: the codes of every window of ``x`` (first k
        channels) and of its negative (last k), in float32 (:meth:`code_maps`)."""
        return torch.cat(self.code_maps(x, moments), dim=1).float()

    def _pool(self, code: torch.Tensor) -> torch.Tensor:
        """``adaptive_avg_pool2d(code.float(), grid)`` flattened, for boolean ``code``: sums over the
        same bins (4x faster than converting the map to float on CPU)."""
        h, w = code.shape[-2:]
        g = self.grid
        rows = [(i * h // g, -(-(i + 1) * h // g)) for i in range(g)]
        cols = [(j * w // g, -(-(j + 1) * w // g)) for j in range(g)]
        cells = [code[:, :, r0:r1, c0:c1].sum((2, 3), dtype=torch.int32).float() / ((r1 - r0) * (c1 - c0))
                 for r0, r1 in rows for c0, c1 in cols]
        return torch.stack(cells, 2).flatten(1)  # (B, k * g * g), channel-major as adaptive_avg_pool2d

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.codes(x)]

    def pooled_codes(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2 k grid^2)``: the codes of the windows and of their negatives, average-pooled to
        ``grid`` x ``grid`` (``flip``: averaged with those of the mirrored image)."""
        moments = self.moment_filters() if self.select == "threshold" else None
        pooled = []
        def pool(part: torch.Tensor) -> torch.Tensor:
            return torch.cat([self._pool(c) for c in self.code_maps(part, moments)], 1)

        for part in x.split(self.CHUNK):
            pooled.append((pool(part) + pool(part.flip(-1))) / 2 if self.flip else pool(part))
        return torch.cat(pooled) if pooled else x.new_zeros(0, self.pooled_dim)

    @torch.no_grad()
    def fit_output_whitening(self, pooled: torch.Tensor, eps: float) -> torch.Tensor:
        """Set the output whitening from the pooled features ``(n, pooled_dim)`` of training images
        (:meth:`pooled_features`): the projection on the ``whiten`` leading principal axes, each divided
        by ``sqrt(eigenvalue + eps * mean of the kept eigenvalues)`` (PCA whitening, Jegou & Chum 2012);
        returns the eigenvalues."""
        mu, proj, evals = pca_whitening(pooled, self.whiten, eps)
        self.feat_mean.copy_(mu)
        self.feat_proj.copy_(proj)
        return evals

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`pooled_codes` raised to ``power``: the features the output whitening sees."""
        f = self.pooled_codes(x)
        return f if self.power == 1 else f.pow_(self.power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pooled_features(x)
        if self.whiten:
            with torch.autocast(f.device.type, enabled=False):
                f = (f.float() - self.feat_mean) @ self.feat_proj
        return f


class CropBag(Backbone):
    """A backbone evaluated as a bag of crops (EMP-SSL, Tong et al. 2023: features averaged over many
    patches of the image): ``forward`` is the mean of ``inner``'s pooled features over ``n`` crops of
    ``scale`` of the image (square), resized to ``size``; the crops (boxes, and a flip for every other
    one) are fixed by ``seed``, the same for every image, so features are deterministic and do not
    depend on the batch. ``forward_stages`` is ``inner``'s on the whole image."""

    def __init__(self, inner: Backbone, n: int = 16, scale: float = 0.25, size: int = 32, seed: int = 0) -> None:
        super().__init__()
        from .data.views import sample_crop_boxes

        if n < 1 or not 0 < scale <= 1 or size < 1:
            raise ValueError(f"crop bag: need n >= 1, scale in (0, 1], size >= 1 (got {n}, {scale}, {size})")
        self.inner, self.n, self.size = inner, n, size
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("boxes", sample_crop_boxes(n, (scale, scale), (1.0, 1.0), g, "cpu"))
        self.register_buffer("flips", torch.arange(n) % 2 == 1)
        self.stage_names, self.stage_dims, self.out_dim = inner.stage_names, inner.stage_dims, inner.out_dim

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.inner.forward_stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .data.views import resized_crop

        b = x.shape[0]
        boxes = self.boxes.repeat_interleave(b, dim=0)  # crop-major: crop i of image j at i * b + j
        flips = self.flips.repeat_interleave(b)
        crops = resized_crop(x.float().repeat(self.n, 1, 1, 1), boxes, self.size, flips)
        f = self.inner(crops.contiguous(memory_format=torch.channels_last))
        return f.float().view(self.n, b, -1).mean(0)


def cached_torchvision_weights(name: str):
    """The DEFAULT pretrained weights of torchvision model ``name`` when their file is already in torch's
    cache (``torch.hub.get_dir()/checkpoints``); nothing is ever downloaded. Raises ValueError
    (saying where the file is expected) otherwise."""
    import os

    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision has no pretrained weights for '{name}' ({e})") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(path):
        raise ValueError(f"the pretrained weights of torchvision:{name} are not in the local cache ({path}); "
                         f"selfsup never downloads: fetch {weights.url} into that folder, e.g. with "
                         f"torchvision.models.get_model('{name}', weights='DEFAULT') once")
    return weights


class _ZooBackbone(Backbone):
    """A model-zoo network in ``self.model`` whose output is its pooled features: ``forward`` flattens
    them; ``_probe`` sets ``out_dim`` and the stage names and widths from one blank image."""

    model: nn.Module

    def _probe(self, size: int, in_chans: int) -> None:
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            x = torch.zeros(1, in_chans, size, size)
            self.out_dim = int(self.model(x).flatten(1).shape[1])
            maps = self.forward_stages(x)
            self.model.train(was)
        self.stage_names = [f"stage{i + 1}" for i in range(len(maps))]
        self.stage_dims = [int(m.shape[1]) for m in maps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model(x), 1)


class TorchvisionBackbone(_ZooBackbone):
    """Any torchvision classification model (``torchvision.models.get_model(name)``: ResNets, ConvNeXt,
    EfficientNet, MobileNet, RegNet, ...) without its classifier: ``forward`` gives the model's own pooled
    features, ``forward_stages`` the outputs of its stages (a ResNet's ``layer1..4``, the blocks of
    ``features`` otherwise), captured with forward hooks. ``pretrained``: torchvision's DEFAULT weights,
    only from the local cache (:func:`cached_torchvision_weights`). RGB input only."""

    def __init__(self, name: str, image_size: int = 224, in_chans: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        if in_chans != 3:
            raise ValueError(f"torchvision:{name} takes RGB input (3 channels), not {in_chans}")
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model '{name}'; see "
                             f"torchvision.models.list_models(module=torchvision.models)")
        weights = cached_torchvision_weights(name) if pretrained else None
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            model.load_state_dict(weights.get_state_dict(progress=False, check_hash=False))
        if isinstance(getattr(model, "fc", None), nn.Linear):
            model.fc = nn.Identity()
            taps = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
        elif hasattr(model, "classifier"):
            head = model.classifier
            if isinstance(head, nn.Linear):
                model.classifier = nn.Identity()
            elif isinstance(head, nn.Sequential) and any(isinstance(m, nn.Linear) for m in head):
                last = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
                head[last] = nn.Identity()  # keeps e.g. ConvNeXt's LayerNorm + Flatten before it
            else:
                raise ValueError(f"torchvision:{name}: unrecognised classifier {type(head).__name__}")
            taps = list(model.features.children()) if hasattr(model, "features") else []
        elif isinstance(getattr(model, "heads", None), nn.Module):  # ViT: class token features, no maps
            model.heads = nn.Identity()
            taps = []
        else:
            raise ValueError(f"torchvision:{name}: no classifier found to remove (fc, classifier or heads)")
        self.model, self.name = model, name
        self._taps = taps
        self._probe(max(32, image_size) if not name.startswith("vit") else image_size, 3)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self._taps:
            return []
        maps: list[torch.Tensor] = []
        hooks = [t.register_forward_hook(lambda mod, inp, out: maps.append(out)) for t in self._taps]
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return [m for m in maps if m.dim() == 4]


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm:NAME backbones need timm: pip install timm") from None
    return timm


def cached_timm_weights(name: str) -> tuple[str, dict]:
    """``(file, pretrained_cfg)`` of timm model ``name``'s default pretrained weights when that file is
    already in the Hugging Face cache (``$HF_HUB_CACHE``, else ``~/.cache/huggingface/hub``); nothing is
    ever downloaded. Raises ValueError (saying where the file is expected) otherwise."""
    import os

    timm = _timm()
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name) or timm.create_model(name, pretrained=False).pretrained_cfg
    except RuntimeError as e:
        raise ValueError(f"timm has no pretrained weights for '{name}' ({e})") from None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise ValueError(f"timm:{name} has no weights on the Hugging Face hub (its pretrained_cfg names none)")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(path, str) and os.path.exists(path):
            return path, cfg
    raise ValueError(f"the pretrained weights of timm:{name} are not in the local Hugging Face cache ({cache}, "
                     f"repository {repo}); selfsup never downloads: fetch them once, e.g. with "
                     f"timm.create_model('{name}', pretrained=True)")


class TimmBackbone(_ZooBackbone):
    """Any timm model (``timm.create_model(name, num_classes=0)``: ResNets, ConvNeXt, EfficientNet,
    RegNet, ViTs, ...): ``forward`` gives its pooled features, ``forward_stages`` its intermediate maps
    (``forward_intermediates``, NCHW; a ViT's patch tokens as maps), none for a model without it.
    ``pretrained``: timm's default weights, only from the local Hugging Face cache
    (:func:`cached_timm_weights`). ViTs are built for ``image_size`` (their position embeddings)."""

    def __init__(self, name: str, image_size: int = 224, in_chans: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        timm = _timm()
        if not timm.is_model(name.split(".", 1)[0]):
            raise ValueError(f"unknown timm model '{name}'; see timm.list_models()")
        kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
        if pretrained:
            path, _ = cached_timm_weights(name)
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": path})
        try:
            model = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # a model without a fixed input size (convolutional)
            model = timm.create_model(name, **kwargs)
        self.model, self.name = model, name
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self._probe(image_size, in_chans)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not hasattr(self.model, "forward_intermediates"):
            return []
        try:
            maps = self.model.forward_intermediates(x, intermediates_only=True)
        except (NotImplementedError, TypeError):
            return []
        return [m for m in maps if m.dim() == 4]


DATA_FIT_IMAGES = 5000  # training images a layer fitted from the data sees (airbench's whitening: 5,000)


def fit_layers_from_data(module: nn.Module, images, view, input_mode: str = "rgb",
                         device: torch.device | str = "cpu") -> bool:
    """Set every layer of ``module`` that is fitted from the data (``fit_data``: airbench's whitening
    conv), in every copy it holds (EMA teachers too), from the evaluation view of the first
    ``DATA_FIT_IMAGES`` uint8 NHWC ``images``; the trainer calls it before the first step, evaluation
    for a ``random:`` baseline. Returns whether any layer was fitted."""
    from .data.views import eval_input

    layers = [m for m in module.modules() if m is not module and callable(getattr(m, "fit_data", None))]
    if callable(getattr(module, "fit_data", None)):
        layers.append(module)
    if not layers:
        return False
    import numpy as np

    x = torch.from_numpy(np.array(images[:DATA_FIT_IMAGES])).permute(0, 3, 1, 2).to(device)
    x = eval_input(x, view, input_mode)
    for m in layers:
        m.fit_data(x)
    return True


def is_torchvision(name: str) -> bool:
    return name.startswith("torchvision:")


def is_zoo(name: str) -> bool:
    """A model-zoo backbone: ``torchvision:NAME`` or ``timm:NAME`` (the ones with pretrained weights)."""
    return name.startswith(("torchvision:", "timm:"))


def build_backbone(name: str, image_size: int = 32, small_stem: bool | None = None,
                   in_chans: int = 3, options: dict | None = None, pretrained: bool = False) -> Backbone:
    """Build a randomly initialised backbone. ``small_stem=None`` picks it for images <= 64 px.
    ``patches`` (the ``patches`` method's fitted layer, not a choice for the other methods) takes its
    sizes from ``options`` (``k``, ``patch``, ``q``, ``grid``, ``select``, ``whiten``), as stored in its backbone spec;
    ``crop_bag`` (how ``emp_ssl`` is evaluated) wraps ``options["inner"]``; ``torchvision:NAME`` is any
    torchvision classification model (``pretrained``: its cached DEFAULT weights), ``timm:NAME`` any timm
    model (``pretrained``: its default weights from the Hugging Face cache)."""
    if is_torchvision(name):
        return TorchvisionBackbone(name.split(":", 1)[1], image_size, in_chans, pretrained)
    if name.startswith("timm:"):
        return TimmBackbone(name.split(":", 1)[1], image_size, in_chans, pretrained)
    if pretrained:
        raise ValueError(f"model.pretrained needs a torchvision:NAME or timm:NAME backbone; '{name}' has no "
                         f"pretrained weights")
    if name == "patches":
        return PatchEncoder(image_size, in_chans, **(options or {}))
    if name == "crop_bag":  # options: the inner backbone's name and the bag's n, scale, size, seed
        opts = dict(options or {})
        inner = build_backbone(opts.pop("inner"), image_size, small_stem, in_chans)
        return CropBag(inner, **opts)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    if name == "convnet":
        return ConvNet(in_chans=in_chans)
    if name == "airbench":
        return Airbench(in_chans=in_chans)
    if name in VITS:
        return ViT(name, image_size, in_chans=in_chans)
    if small_stem is None:
        small_stem = image_size <= 64
    return ResNet(name, small_stem=small_stem, in_chans=in_chans)


def backbone_spec(name: str, image_size: int, small_stem: bool | None, in_chans: int = 3,
                  options: dict | None = None) -> dict:
    """What is needed to rebuild the same architecture (stored in checkpoints and exports)."""
    if small_stem is None and name.startswith("resnet"):
        small_stem = image_size <= 64
    spec = {"name": name, "image_size": image_size, "small_stem": bool(small_stem), "in_chans": in_chans}
    if options:
        spec["options"] = dict(options)
    return spec

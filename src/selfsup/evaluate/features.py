"""Frozen encoders and their features: embed images with a run's backbone (loaded by ``run.load_encoder``,
re-exported here) or a random one, with a feature cache."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..backbones import fit_layers_from_data
from ..checkpoint import atomic_torch_save
from ..data.cache import default_cache_dir
from ..data.views import AugConfig
from ..run import Encoder, checkpoint_path, load_encoder, read_run_checkpoint  # noqa: F401 - re-exported
from ..runtime import embed, resolve_device

log = logging.getLogger("selfsup")


def fit_random_from_data(encoder: Encoder, images: np.ndarray, device: str | torch.device = "cpu") -> bool:
    """A ``random:`` baseline whose backbone has layers set from the data (airbench's whitening conv,
    ``fit_data``) gets them from ``images`` (the evaluation's training images, no labels), as a run's
    trainer does before its first step; a trained run's are in its checkpoint. Returns whether any
    layer was fitted."""
    if not encoder.name.startswith("random:"):
        return False
    device = resolve_device(device) if isinstance(device, str) else device
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    return fit_layers_from_data(encoder.backbone.to(device), images, view, encoder.input_mode, device)


PROGRESS_MIN_IMAGES = 5000  # feature extraction of at least this many images reports its progress


def extract_features(encoder: Encoder, images: np.ndarray, device: str | torch.device = "auto",
                     batch_size: int = 512, progress: bool = True) -> torch.Tensor:
    """Pooled backbone features ``(N, D)`` (float32, on the CPU) of uint8 NHWC images. ``progress``:
    a bar (terminal) or a periodic log line for passes over ``PROGRESS_MIN_IMAGES`` images or more."""
    device = resolve_device(device) if isinstance(device, str) else device
    model = encoder.backbone.to(device).to(memory_format=torch.channels_last)
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    label = "features" if progress and len(images) >= PROGRESS_MIN_IMAGES else None
    return embed(model, images, view, device, encoder.precision, batch_size, encoder.input_mode, progress=label)


PRECISE_BN_IMAGES = 4096  # images whose evaluation views re-estimate the BatchNorm statistics


@torch.no_grad()
def precise_bn(encoder: Encoder, images: np.ndarray, device: str | torch.device = "auto",
               max_images: int = PRECISE_BN_IMAGES, batch_size: int = 256, seed: int = 0) -> int:
    """Re-estimate the running mean and variance of every BatchNorm of ``encoder.backbone`` on the
    evaluation views of ``images`` (uint8 NHWC, no labels used); returns how many images were used (0
    when the backbone has no BatchNorm, e.g. a ViT: nothing changes).

    A method trained on other inputs than whole images (jigsaw tiles, relative-location patches,
    inpainting's masked images, SwAV/DINO's small local crops, a GAN discriminator's half-generated
    batches) leaves running statistics of *those* inputs, and the eval-mode backbone then normalises
    whole images with the wrong mean and variance. This is precise BN (Wu & Johnson 2021,
    "Rethinking 'Batch' in BatchNorm", Sec. 3; the BiGAN reference code re-estimates its encoder's
    statistics the same way): a fixed random subset of up to ``max_images`` images, in batches, through
    the backbone in train mode with ``momentum=None`` (a cumulative average of the batches' statistics);
    the weights are untouched. Runs in float32."""
    from ..data.views import eval_input

    model = encoder.backbone
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return 0
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    n = min(len(images), max_images)
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
    model.train()
    try:
        for i in range(0, n, batch_size):
            x = torch.from_numpy(np.array(images[idx[i:i + batch_size]])).permute(0, 3, 1, 2).to(device)
            model(eval_input(x, view, encoder.input_mode).contiguous(memory_format=torch.channels_last))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return n


FEATURE_CACHE_KEEP = 16  # feature files kept in the cache folder (the least recently used go first)


def weights_digest(module: torch.nn.Module) -> "hashlib._Hash":
    """A sha256 over ``module``'s weights and buffers (names and bytes), to extend with what else keys a cache."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h


def feature_cache_key(encoder: Encoder, images: np.ndarray) -> str | None:
    """A key for the features of ``encoder`` on ``images``, or None when ``images`` is not a whole
    decoded split (a read-only memmap covering its cache file: only those have a stable identity).
    The key hashes the backbone's weights and buffers, the view (size, mean, std, input, precision)
    and the cache file's name, size and modification time, so new weights or new data never hit."""
    fn = getattr(images, "filename", None)
    if fn is None or not os.path.exists(fn):
        return None
    root = images  # the memmap of the whole file that ``images`` is (or is a view of: a centre square)
    while isinstance(root.base, np.memmap):
        root = root.base
    st = os.stat(fn)
    if st.st_size != root.nbytes or not root.flags.c_contiguous:  # a map of part of the file
        return None
    start = images.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    h = weights_digest(encoder.backbone)
    h.update(repr((sorted(encoder.spec.items()), tuple(encoder.mean), tuple(encoder.std), encoder.precision,
                   encoder.input_mode, os.path.abspath(fn), st.st_size, st.st_mtime_ns, images.shape,
                   images.strides, start,
                   torch.__version__)).encode())
    return h.hexdigest()[:32]


def cached_features(encoder: Encoder, images: np.ndarray, device: str | torch.device = "auto",
                    cache_dir: str | None = None) -> torch.Tensor:
    """:func:`extract_features`, remembered on disk: evaluating one run with several protocols (knn,
    linear, retrieval, robustness) extracts its features once. Files go to ``<cache>/features``
    (``cache_dir`` or ``$SELFSUP_CACHE`` or ``~/.cache/selfsup/cache``), written atomically, read
    with ``weights_only=True``; at most ``FEATURE_CACHE_KEEP`` are kept. Arrays that are not a whole
    decoded split are extracted every time. ``SELFSUP_FEATURE_CACHE=0`` turns the cache off."""
    key = None if os.environ.get("SELFSUP_FEATURE_CACHE", "1") == "0" else feature_cache_key(encoder, images)
    if key is None:
        return extract_features(encoder, images, device)
    folder = Path(cache_dir or default_cache_dir()) / "features"
    path = folder / f"{key}.pt"
    if path.exists():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, torch.Tensor) and feats.ndim == 2 and len(feats) == len(images):
                os.utime(path)
                log.info("features of %d images from %s", len(images), path)
                return feats
        except Exception as e:  # a damaged file: extract again and overwrite it
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    feats = extract_features(encoder, images, device)
    try:
        atomic_torch_save(feats, path)
        old = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime)[:-FEATURE_CACHE_KEEP]
        for p in old:
            p.unlink(missing_ok=True)
    except OSError as e:  # a read-only or full disk costs speed, never the result
        log.warning("could not write the feature cache %s (%s)", path, e)
    return feats


def stage_grid(channels: int, spatial: int, max_dim: int) -> int:
    """Side of the average-pooling grid of a stage's map for the layer-wise probes: the largest
    ``s <= spatial`` with ``channels * s * s <= max_dim`` (at least 1), so early, narrow stages keep some
    spatial layout (as the survey's conv1..conv5 probes do) and every probe has at most ``max_dim``
    inputs."""
    s = max(1, int((max_dim / channels) ** 0.5))
    return min(s, spatial)


@torch.no_grad()
def extract_stage_features(encoder: Encoder, images: np.ndarray, device: str | torch.device = "auto",
                           max_dim: int = 2048, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Features of every stage of the backbone, ``{stage_name: (N, C * s * s)}``: each stage's map
    average-pooled to an ``s x s`` grid (see :func:`stage_grid`), float32 on the CPU."""
    from ..data.views import eval_input
    from ..runtime import autocast

    device = resolve_device(device) if isinstance(device, str) else device
    model = encoder.backbone.to(device).to(memory_format=torch.channels_last).eval()
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    names = model.stage_names
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        with autocast(device, encoder.precision):
            maps = model.forward_stages(eval_input(x, view, encoder.input_mode))
        for name, m in zip(names, maps):
            s = stage_grid(m.shape[1], m.shape[-1], max_dim)
            out[name].append(torch.nn.functional.adaptive_avg_pool2d(m.float(), s).flatten(1).cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def write_embeddings(run: str, data: str, out: str | Path, split: str = "train", device: str = "auto",
                     cache_dir: str | None = None, progress: bool = True) -> dict:
    """Embed every image of ``data`` (its ``split``) with the backbone of ``run`` and write ``out``
    (``.npy``, float32 ``(N, D)``), ``<out>.files.txt`` (row i's source file, one per line) and, for
    labeled data, ``<out>.labels.npy``. Returns a summary dict."""
    from ..data import load_images

    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    encoder = load_encoder(run)
    images = load_images(data, split=split, image_size=encoder.spec["image_size"], cache_dir=cache_dir,
                         progress=progress)
    feats = extract_features(encoder, images.images, device).numpy().astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    files_path = out.with_suffix(".files.txt")
    files_path.write_text("".join(f"{f}\n" for f in images.files))
    result = {"features": str(out), "files": str(files_path), "n": len(feats), "dim": int(feats.shape[1])}
    if len(images.labels) and (np.asarray(images.labels) >= 0).any():
        labels_path = out.with_suffix(".labels.npy")
        np.save(labels_path, np.asarray(images.labels, dtype=np.int64))
        result["labels"] = str(labels_path)
    return result

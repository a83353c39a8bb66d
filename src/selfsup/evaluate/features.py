"""Frozen encoders and their features: load a trained backbone (or a random one) and embed images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, backbone_spec, build_backbone
from ..config import ConfigError
from ..data.views import AugConfig
from ..runtime import embed, resolve_device
from ..train import load_checkpoint


@dataclass
class Encoder:
    backbone: Backbone
    spec: dict  # backbone_spec: name, image_size, small_stem, in_chans
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str  # "random:resnet18" or the run directory
    precision: str = "bf16"
    input_mode: str = "rgb"  # what the backbone was trained to see (spec["input"])


def checkpoint_path(run: str | Path) -> Path:
    p = Path(run)
    if p.is_file():
        return p
    ckpt = p / "checkpoints" / "last.pt"
    if not ckpt.exists():
        raise ConfigError(f"no checkpoint found: {ckpt} does not exist (is '{run}' a selfsup run directory? "
                          f"use random:BACKBONE for the random-init baseline)")
    return ckpt


def load_encoder(run: str, image_size: int | None = None, seed: int = 0) -> Encoder:
    """``run`` is a run directory, a checkpoint file, or ``random:BACKBONE`` (untrained baseline,
    initialised with ``seed``; ``image_size`` picks its stem)."""
    defaults = AugConfig()
    if run.startswith("random:"):
        name = run.split(":", 1)[1]
        size = image_size or 32
        torch.manual_seed(seed)
        try:
            backbone = build_backbone(name, size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return Encoder(backbone.eval(), backbone_spec(name, size, None), defaults.mean, defaults.std, run)
    ckpt = load_checkpoint(checkpoint_path(run))
    spec = ckpt["backbone_spec"]
    backbone = build_backbone(spec["name"], spec["image_size"], spec["small_stem"], spec["in_chans"])
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    aug = ckpt["config"].get("aug", {})
    return Encoder(backbone.eval(), spec, tuple(aug.get("mean", defaults.mean)), tuple(aug.get("std", defaults.std)),
                   str(run), ckpt["config"]["train"].get("precision", "bf16"), spec.get("input", "rgb"))


def extract_features(encoder: Encoder, images: np.ndarray, device: str | torch.device = "auto",
                     batch_size: int = 512) -> torch.Tensor:
    """Pooled backbone features ``(N, D)`` (float32, on the CPU) of uint8 NHWC images."""
    device = resolve_device(device) if isinstance(device, str) else device
    model = encoder.backbone.to(device).to(memory_format=torch.channels_last)
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    return embed(model, images, view, device, encoder.precision, batch_size, encoder.input_mode)


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

"""Where and how tensors run: device choice, bf16 autocast, and embedding images with a backbone.

Shared by the training loop (per-epoch health, ``train.py``) and evaluation (``evaluate/``).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError
from .data.views import AugConfig, eval_input


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    return dev


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU and CUDA (fp32 when asked, or on GPUs without bf16)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def embed(backbone: nn.Module, images: np.ndarray, view: AugConfig, device: torch.device,
          precision: str = "bf16", batch_size: int = 256, input_mode: str = "rgb",
          head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Pooled features ``(N, D)`` (float32, on the CPU) of uint8 NHWC images, through the
    deterministic evaluation view (resize + normalise, or the L channel for ``input_mode="lab_l"``).
    The backbone runs in eval mode and is put back in the mode it had. ``head`` (optional) maps each
    batch of features to what is returned instead (e.g. SwAV's prototype ids), under the same
    autocast; its modules' modes are the caller's business."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        x = eval_input(x, view, input_mode).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            f = backbone(x).float()
            out.append((f if head is None else head(f)).cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, getattr(backbone, "out_dim", 0))


def step_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The augmentation RNG of one step: a pure function of (seed, step) (and of the process rank in
    distributed training, so that processes draw different views of their different images)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step + rank * 0x9E3779B97F4A7C1) % (2**63))
    return g

"""Where and how tensors run: device choice, precision by capability (autocast), and embedding images with a backbone.

Shared by the training loop (per-epoch health, ``train.py``) and evaluation (``evaluate/``).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX-BF16; aarch64 BF16


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``flags`` / ``Features`` lines of /proc/cpuinfo); empty where that
    cannot be read (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_precision(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """``(precision, why)`` for ``train.precision=requested`` on ``device``. ``auto``: bf16 autocast
    only where the hardware computes in bf16 natively (CUDA compute capability >= 8.0; a CPU with
    AVX512-BF16, AMX-BF16 or aarch64 BF16: elsewhere bf16 is emulated and slower than fp32), fp16
    with a gradient scaler on older GPUs, fp32 otherwise. ``bf16``, ``fp16`` and ``fp32`` are honoured
    as asked."""
    if requested not in PRECISIONS:
        raise ConfigError(f"unknown precision '{requested}'; choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, f"train.precision={requested}"
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if (major, minor) >= (8, 0):
            return "bf16", f"CUDA compute capability {major}.{minor} computes in bf16"
        return "fp16", f"CUDA compute capability {major}.{minor} has no native bf16: fp16 with a gradient scaler"
    if device.type == "cpu":
        native = sorted(cpu_flags() & _CPU_BF16_FLAGS)
        if native:
            return "bf16", f"the CPU has {', '.join(native)}"
        return "fp32", "the CPU has no native bf16 (AVX512-BF16, AMX or BF16): emulated bf16 is slower than fp32"
    return "fp32", f"{device.type} device"


def autocast(device: torch.device, precision: str):
    """Autocast to the precision :func:`resolve_precision` picks (``auto``) or to the one asked:
    bf16 or fp16 (the caller scales the loss: :func:`grad_scaler`); fp32 is no autocast."""
    precision = resolve_precision(device, precision)[0]
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler when training runs in fp16 (its small range underflows gradients), else None."""
    if resolve_precision(device, precision)[0] != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


PROGRESS_EVERY_S = 30.0  # a plain progress line this often when stderr is not a terminal


class ProgressMeter:
    """Progress of a long pass over ``total`` items: a tqdm bar when stderr is a terminal, otherwise a log
    line every ``PROGRESS_EVERY_S`` seconds (``label: done/total, rate/s, about S s left``), so a run
    under ``nohup`` or a pipe says where it is."""

    def __init__(self, label: str, total: int) -> None:
        import logging
        import sys
        import time

        self.label, self.total, self._time = label, total, time.perf_counter
        self.t0 = self.last = self._time()
        self.log = logging.getLogger("selfsup")
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="img", leave=False)
        self.done = 0

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = self._time()
        if self.bar is None and now - self.last >= PROGRESS_EVERY_S and done < self.total:
            rate = done / max(now - self.t0, 1e-9)
            self.log.info("%s: %d/%d images, %.0f img/s, about %.0f s left", self.label, done, self.total, rate,
                          (self.total - done) / max(rate, 1e-9))
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def embed(backbone: nn.Module, images: np.ndarray, view: AugConfig, device: torch.device,
          precision: str = "auto", batch_size: int = 256, input_mode: str = "rgb",
          head: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: str | None = None) -> torch.Tensor:
    """Pooled features ``(N, D)`` (float32, on the CPU) of uint8 NHWC images, through the
    deterministic evaluation view (resize + normalise, or the L channel for ``input_mode="lab_l"``).
    The backbone runs in eval mode and is put back in the mode it had. ``head`` (optional) maps each
    batch of features to what is returned instead (e.g. SwAV's prototype ids), under the same
    autocast; its modules' modes are the caller's business. ``progress`` (a label) shows a progress
    bar on a terminal, else a plain log line every ``PROGRESS_EVERY_S`` seconds (images done, img/s,
    time left)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    meter = ProgressMeter(progress, len(images)) if progress else None
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        x = eval_input(x, view, input_mode).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            f = backbone(x).float()
            out.append((f if head is None else head(f)).cpu())
        if meter is not None:
            meter.update(min(i + batch_size, len(images)))
    if meter is not None:
        meter.close()
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, getattr(backbone, "out_dim", 0))


def step_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The augmentation RNG of one step: a pure function of (seed, step) (and of the process rank in
    distributed training, so that processes draw different views of their different images)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step + rank * 0x9E3779B97F4A7C1) % (2**63))
    return g

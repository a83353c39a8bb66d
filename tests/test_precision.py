"""Precision by capability (``train.precision=auto``): bf16 only where the hardware computes in it
natively, fp16 with a gradient scaler on older GPUs, fp32 otherwise; the capability queries are
mocked, the training is real (on the CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

import selfsup.runtime as rt
from selfsup.config import ConfigError
from selfsup.configure import build_config
from selfsup.train import Trainer, load_checkpoint


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))  # bf16 emulated
    assert rt.resolve_precision(cpu)[0] == "fp32"
    for flag in ("avx512_bf16", "amx_bf16", "bf16"):  # x86 AVX512-BF16, AMX, aarch64 BF16
        monkeypatch.setattr(rt, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        precision, why = rt.resolve_precision(cpu)
        assert precision == "bf16" and flag in why
    monkeypatch.setattr(rt, "cuda_capability", lambda d: (7, 5))  # T4: is_bf16_supported() says yes, emulated
    assert rt.resolve_precision(cuda)[0] == "fp16"
    monkeypatch.setattr(rt, "cuda_capability", lambda d: (8, 0))  # A100
    assert rt.resolve_precision(cuda)[0] == "bf16"
    for forced in ("bf16", "fp16", "fp32"):  # asked for: honoured, whatever the hardware
        assert rt.resolve_precision(cuda, forced) == (forced, f"train.precision={forced}")
    with pytest.raises(ConfigError, match="unknown precision"):
        rt.resolve_precision(cpu, "fp8")
    with pytest.raises(ConfigError, match="unknown precision"):
        build_config("rotation", {"train": {"precision": "half"}})
    assert build_config("rotation").train.precision == "auto"


def _cfg(data, precision):
    return build_config("rotation", {"model": {"backbone": "convnet"}, "data": {"path": str(data), "image_size": 16},
                                     "optim": {"warmup_epochs": 0},
                                     "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": precision}})


def test_the_trainer_prints_its_choice_and_autocasts_to_it(tiny_dataset, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx2"}))
    seen = []
    real = rt.autocast

    def spy(device, precision):
        seen.append(rt.resolve_precision(device, precision)[0])
        return real(device, precision)

    import selfsup.train as train_mod

    monkeypatch.setattr(train_mod, "autocast", spy)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        t = Trainer(_cfg(tiny_dataset / "train", "auto"), tmp_path / "run", progress=False)
    assert t.precision == "fp32" and t.scaler is None
    assert "precision fp32 (the CPU has no native bf16" in caplog.text
    t.fit()
    assert seen and set(seen) == {"fp32"}


def test_fp16_trains_with_a_gradient_scaler_that_the_checkpoint_keeps(tiny_dataset, tmp_path):
    """fp16 (forced here on the CPU; what auto picks on a pre-Ampere GPU): the loss is scaled, the
    scaler's state is checkpointed and restored, and a resumed run ends where a straight one does."""
    from conftest import assert_resume_is_exact

    cfg = _cfg(tiny_dataset / "train", "fp16")
    straight = assert_resume_is_exact(cfg, tmp_path, stop_step=1)
    assert straight.precision == "fp16" and isinstance(straight.scaler, torch.amp.GradScaler)
    ckpt = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert ckpt["grad_scaler"]["scale"] == straight.scaler.get_scale() > 0
    assert torch.isfinite(torch.tensor([float(v) for v in straight.state()["model"]["backbone.stages.0.0.weight"]
                                        .flatten()])).all()

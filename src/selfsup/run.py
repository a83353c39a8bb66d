"""The run directory as one thing: its layout, its files, and reading a run back.

Written by the training loop (``train.py``) and evaluation, read by evaluation, export, the report
and the methods that build on another run (``distill``, ``simclr_v2``), so that none of them imports
the loop. Checkpoint files themselves (atomic writes, checked ``weights_only=True`` loads) are
``checkpoint.py``; the config's schema is ``config.py``.

Layout::

    RUN_DIR/config.yaml            the resolved config
    RUN_DIR/metrics.csv            one row every log_every steps (step, epoch, loss, lr, img_per_s, ...);
                                   the last row of each epoch adds label-free health (monitor.py)
    RUN_DIR/checkpoints/last.pt    the latest checkpoint
    RUN_DIR/checkpoints/previous.pt   the one before it (--resume falls back to it when last.pt is damaged)
    RUN_DIR/checkpoints/step_N.pt  every train.keep_every-th step's, when asked
    RUN_DIR/checkpoints/at_Ss.pt   the step that ended S seconds into the session (train.keep_seconds)
    RUN_DIR/tensorboard/           the same scalars as TensorBoard events (train.logger=tensorboard)
    RUN_DIR/figures/               the method's pictures of its own task, drawn at the end of training
    RUN_DIR/skipped.txt            inputs that could not be decoded (if any)

    RUN_DIR/eval/*.json            evaluation results (``selfsup evaluate RUN``), one file per protocol
                                   (``<protocol>[_<fraction>].json``), and the kept classifiers
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backbones import Backbone, backbone_spec, build_backbone, cached_torchvision_weights
from .checkpoint import CheckpointError, check_matches, load_checkpoint
from .config import ConfigError
from .data.views import AugConfig


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "config.yaml"


def read_saved_config(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/config.yaml`` as a plain dict, unchecked (``configure.load_config`` checks it)."""
    path = config_path(run_dir)
    if not path.exists():
        raise ConfigError(f"{run_dir} has no config.yaml; is it a selfsup run directory?")
    return read_config_file(path)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A saved config file as a plain dict, unchecked; a clear error for bad YAML or no ``method``."""
    import yaml

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"{path} is not a selfsup run config (no 'method')")
    return d


class MetricsLog:
    """``metrics.csv``: one row per logged step. On resume, rows after the checkpoint's step are
    dropped (they will be replayed), so no step appears twice. With ``tensorboard`` (a folder), every
    numeric column is also written as a TensorBoard scalar (``train.logger=tensorboard``; the events
    after the checkpoint's step are purged on resume, likewise)."""

    def __init__(self, path: Path, keep_until_step: int | None = None, tensorboard: Path | None = None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        self.tb = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(tensorboard), purge_step=keep_until_step + 1 if keep_until_step else None)
        if keep_until_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            fields = list(rows[0].keys()) if rows else None
            rows = [r for r in rows if int(r["step"]) <= keep_until_step]
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                if fields:
                    w = csv.DictWriter(f, fieldnames=fields)
                    w.writeheader()
                    w.writerows(rows)
            os.replace(tmp, path)
            self.fields = fields
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        if self.tb is not None:
            for k, v in row.items():
                if k in ("step", "epoch"):
                    continue
                try:
                    self.tb.add_scalar(k, float(v), int(row["step"]))
                except (TypeError, ValueError):  # empty cells (health between epochs), text
                    pass
            self.tb.flush()
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def read_metrics(run_dir: str | Path, missing_ok: bool = False) -> list[dict[str, str]]:
    """The rows of ``RUN_DIR/metrics.csv`` (strings, as written); ``[]`` for a run without one when
    ``missing_ok``."""
    path = Path(run_dir) / "metrics.csv"
    if missing_ok and not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# evaluation results


def eval_dir(run_dir: str | Path) -> Path:
    """Where ``selfsup evaluate RUN`` writes its results by default."""
    return Path(run_dir) / "eval"


def write_result(folder: str | Path, name: str, result: dict[str, Any]) -> Path:
    """``folder/name.json``, written atomically (a reader never sees half a file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{result name: result}`` of a run's evaluations (``eval/*.json``), in name order; a folder
    holding the jsons directly (``selfsup evaluate random:... --out DIR``) works too. Files that are
    not a result (unreadable, not an object with ``top1``) are left out."""
    run_dir = Path(run_dir)
    folder = eval_dir(run_dir) if eval_dir(run_dir).is_dir() else run_dir
    out = {}
    for f in sorted(folder.glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(r, dict) and "top1" in r:
            out[f.stem] = r
    return out


# --------------------------------------------------------------------------------------------------
# checkpoints and the encoder


@dataclass
class Encoder:
    backbone: Backbone
    spec: dict  # backbone_spec: name, image_size, small_stem, in_chans
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str  # "random:resnet18" or the run directory
    precision: str = "auto"
    input_mode: str = "rgb"  # what the backbone was trained to see (spec["input"])


def checkpoint_path(run: str | Path) -> Path:
    p = Path(run)
    if p.is_file():
        return p
    ckpt = p / "checkpoints" / "last.pt"
    if not ckpt.exists():
        if (p / "checkpoints" / "previous.pt").exists():
            raise ConfigError(f"{ckpt} is missing (a crash while it was replaced?); the checkpoint before it is "
                              f"{p / 'checkpoints' / 'previous.pt'}: pass that file, or --resume the run")
        raise ConfigError(f"no checkpoint found: {ckpt} does not exist (is '{run}' a selfsup run directory? "
                          f"use random:BACKBONE for the random-init baseline)")
    return ckpt


def read_run_checkpoint(run: str | Path) -> dict:
    """The checkpoint of a run directory or file, checked (:func:`selfsup.checkpoint.load_checkpoint`);
    a damaged ``last.pt`` names ``previous.pt`` when there is one."""
    path = checkpoint_path(run)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        previous = path.with_name("previous.pt")
        if path.name == "last.pt" and previous.exists():
            raise CheckpointError(f"{e}; the checkpoint before it is {previous}: pass that file, or --resume "
                                  f"the run (which falls back to it)") from None
        raise
    config = config_path(path.parent.parent)
    if path.parent.name == "checkpoints" and config.exists():  # a run directory: its config names its run
        try:
            saved = read_config_file(config)
            method, backbone = saved.get("method"), (saved.get("model") or {}).get("backbone")
        except (ConfigError, AttributeError, OSError):
            method = backbone = None
        if method and backbone:
            check_matches(ckpt, path, method, backbone)
    return ckpt


def load_encoder(run: str | Path, image_size: int | None = None, seed: int = 0) -> Encoder:
    """``run`` is a run directory, a checkpoint file (a ``str`` or a ``Path``, e.g. what
    :func:`selfsup.pretrain` returns), ``random:BACKBONE`` (untrained baseline, initialised with
    ``seed``; ``image_size`` picks its stem), or ``pretrained:torchvision:NAME`` (torchvision's DEFAULT
    weights from the local cache, its ImageNet normalisation; ``image_size`` default 224) or
    ``pretrained:timm:NAME`` (timm's default weights from the Hugging Face cache, their normalisation)."""
    defaults = AugConfig()
    run = str(run)
    if run.startswith("pretrained:"):  # an off-the-shelf encoder: pretrained:torchvision:NAME or pretrained:timm:NAME
        name = run.split(":", 1)[1]
        if not name.startswith(("torchvision:", "timm:")):
            raise ConfigError(f"{run}: pretrained encoders are torchvision:NAME or timm:NAME (e.g. "
                              f"pretrained:torchvision:resnet50, pretrained:timm:convnext_tiny)")
        size = image_size or 224
        try:
            backbone = build_backbone(name, size, pretrained=True)
            if name.startswith("timm:"):
                mean, std = backbone.pretrained_cfg.get("mean"), backbone.pretrained_cfg.get("std")
            else:
                t = cached_torchvision_weights(name.split(":", 1)[1]).transforms()
                mean, std = t.mean, t.std
        except ValueError as e:
            raise ConfigError(str(e)) from None
        mean, std = tuple(mean or defaults.mean), tuple(std or defaults.std)
        return Encoder(backbone.eval(), backbone_spec(name, size, None), mean, std, run)
    if run.startswith("random:"):
        name = run.split(":", 1)[1]
        size = image_size or 32
        torch.manual_seed(seed)
        try:
            backbone = build_backbone(name, size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return Encoder(backbone.eval(), backbone_spec(name, size, None), defaults.mean, defaults.std, run)
    ckpt = read_run_checkpoint(run)
    spec = ckpt["backbone_spec"]
    try:
        backbone = build_backbone(spec["name"], spec["image_size"], spec["small_stem"], spec["in_chans"],
                                  spec.get("options"))
        prefix = spec.get("weights", "backbone") + "."  # e.g. DINO's teacher_backbone
        state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        backbone.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint_path(run)}: its backbone weights do not fit its backbone spec "
                              f"({str(e).splitlines()[0][:200]})") from None
    aug = ckpt["config"].get("aug", {})
    return Encoder(backbone.eval(), spec, tuple(aug.get("mean", defaults.mean)), tuple(aug.get("std", defaults.std)),
                   str(run), ckpt["config"]["train"].get("precision", "bf16"), spec.get("input", "rgb"))

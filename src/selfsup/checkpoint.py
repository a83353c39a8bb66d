"""Checkpoint files: written atomically, read with ``weights_only=True``, and checked, so that a damaged,
foreign or hostile file gets one clear sentence instead of a traceback.

Used by the training loop (``train.py``), evaluation (``evaluate/features.py``), export, report and the
methods that read another run (``distill``, ``simclr_v2``), so none of them imports the loop.

A run keeps two checkpoints, ``checkpoints/last.pt`` and the one before it, ``checkpoints/previous.pt``
(:func:`save_keeping_previous`): a ``last.pt`` cut short by a full disk or a bad copy costs the steps
since the previous checkpoint, never the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

REQUIRED_KEYS = ("model", "config", "backbone_spec", "method")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: unreadable, not a selfsup checkpoint, refused, or of
    another run than expected. The message is one line naming the file."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over ``path``:
    a crash at any point leaves either the old or the new file, never a torn one. On an error (a
    full disk) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_keeping_previous(obj: Any, path: Path) -> None:
    """``atomic_torch_save`` that first keeps the checkpoint being replaced as ``previous.pt`` next
    to it. The new file is complete on disk before the old one is renamed; a crash between the two
    renames leaves ``previous.pt`` (and the complete temporary file), which :func:`load_run_checkpoint`
    falls back to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new{os.getpid()}")
    atomic_torch_save(obj, tmp)
    if path.exists():
        os.replace(path, path.with_name("previous.pt"))
    os.replace(tmp, path)


CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (no pickled code is ever run) with one-line
    :class:`CheckpointError` answers for a missing, empty, damaged or truncated file, a file that is not
    a torch file, or one holding objects ``weights_only`` refuses (e.g. a pickle that would run code)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one sentence below
        raise CheckpointError(f"{path}: {_why_unloadable(path, e)}") from None


def _why_unloadable(path: Path, error: Exception) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        n = path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e})"
    text = str(error)
    if n == 0:
        return "damaged or truncated checkpoint (an empty file)"
    if "Unsupported global" in text or "Unsupported class" in text:
        return ("refused, not a selfsup checkpoint: it holds pickled objects or code that safe loading "
                "(weights_only=True) never runs")
    if head.startswith(b"PK\x03\x04"):  # torch's zip format, cut short or damaged
        return f"damaged or truncated checkpoint ({n:,} bytes; {_first_line(error)})"
    if head.startswith(b"\x80"):  # a raw pickle (or torch's legacy format): code in it?
        import pickletools

        try:
            with open(path, "rb") as f:
                ops = {op.name for op, _, _ in pickletools.genops(f)}
        except Exception:  # noqa: BLE001
            return f"damaged or truncated checkpoint ({n:,} bytes, an unreadable pickle)"
        if ops & CODE_OPCODES:
            return ("refused, not a selfsup checkpoint: a pickle that names functions or classes to call on "
                    "loading; safe loading (weights_only=True) never runs them")
        return f"damaged or truncated checkpoint ({n:,} bytes; {_first_line(error)})"
    return f"not a readable checkpoint: not a torch file ({n:,} bytes starting {head!r})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A selfsup checkpoint, read by :func:`safe_torch_load` and checked to hold a run's model,
    config and backbone spec; :class:`CheckpointError` (one line naming the file) otherwise."""
    path = Path(path)
    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in REQUIRED_KEYS):
        found = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a selfsup checkpoint (it holds {found}, not a selfsup run's "
                              f"model, config and backbone spec)")
    return ckpt


def check_matches(ckpt: dict, path: Path, method: str, backbone: str) -> None:
    """Raise :class:`CheckpointError` when the checkpoint is of another method or backbone than the
    run's config says (e.g. a file copied from another run)."""
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    # the run's model.backbone as the checkpoint's own config recorded it (a method may store another
    # spec name: patches' fitted layer, emp_ssl's bag of crops); old checkpoints: the spec's name
    theirs = (ckpt.get("method"), model.get("backbone") or ckpt.get("backbone_spec", {}).get("name"))
    if theirs != (method, backbone):
        raise CheckpointError(f"{path}: a checkpoint of a {theirs[0]} run with backbone {theirs[1]}, but this run's "
                              f"config.yaml says {method} with {backbone}; it was not made by this run")


def load_run_checkpoint(ckpt_dir: Path, map_location: str | torch.device = "cpu", method: str | None = None,
                        backbone: str | None = None, log=None) -> tuple[dict, Path]:
    """The newest usable checkpoint of a run: ``last.pt``, else (unreadable or missing, with a
    warning) ``previous.pt``. With ``method``/``backbone``, a checkpoint of another run is an error,
    not a fallback. Returns ``(checkpoint, path)``."""
    ckpt_dir = Path(ckpt_dir)
    last, previous = ckpt_dir / "last.pt", ckpt_dir / "previous.pt"
    errors = []
    for path in (last, previous):
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if method is not None:
            check_matches(ckpt, path, method, backbone)
        if errors and log is not None:
            log.warning("%s; continuing from %s (step %s)", errors[0], path.name, ckpt.get("step"))
        return ckpt, path
    if errors:
        raise CheckpointError(" and ".join(errors) + ("" if previous.exists() else "; no previous.pt to fall back to"))
    raise CheckpointError(f"no checkpoint in {ckpt_dir} (neither last.pt nor previous.pt)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]

"""Exported backbones: the trained encoder alone, loadable without selfsup's training code.

Two formats (``selfsup export RUN_DIR --format ...``):

* ``safetensors`` -> ``backbone.safetensors``: the backbone's weights in selfsup's own module layout,
  with the backbone spec (architecture, stem, input channels and mode) and the input normalisation
  in the file's metadata. ``selfsup.load_backbone`` rebuilds the :class:`~selfsup.backbones.Backbone`
  (a plain ``nn.Module``: pooled features from ``forward``, stage maps from ``forward_stages``).
* ``torchvision`` -> ``backbone_torchvision.pt`` + ``backbone_torchvision.json``: for ResNets, a state
  dict with torchvision's key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...; no ``fc``),
  tensors only, so ``torch.load(..., weights_only=True)`` reads it; the json says how to build the
  model. ``selfsup.load_backbone`` returns a ``torchvision.models.resnet18/50`` with the small stem
  if the run used it and ``fc = nn.Identity()``, so ``model(x)`` gives the pooled features.

Neither format unpickles code: safetensors holds raw tensors, the ``.pt`` file is read with
``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .backbones import build_backbone
from .checkpoint import CheckpointError, safe_torch_load
from .config import ConfigError

FORMATS = ("safetensors", "torchvision")


def _to_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """selfsup ResNet keys (``stages.0.0`` = conv1, ``stages.0.1`` = bn1, ``stages.i`` = layer i)
    -> torchvision's."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        assert parts[0] == "stages", k
        i = int(parts[1])
        if i == 0:
            name = {"0": "conv1", "1": "bn1"}[parts[2]]
            out[".".join([name] + parts[3:])] = v
        else:
            out[".".join([f"layer{i}"] + parts[2:])] = v
    return out


def export(run: str | Path, fmt: str = "safetensors", out: str | Path | None = None) -> Path:
    """Write the backbone of ``run`` (a run directory or checkpoint) in ``fmt``; returns the weights
    file. ``out`` is a folder (default ``RUN_DIR/export``)."""
    from .run import load_encoder

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    enc = load_encoder(str(run))
    run = Path(run)
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "export"
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(enc.spec)
    spec.setdefault("input", enc.input_mode)
    spec.pop("weights", None)  # the state below is the evaluated backbone itself
    meta = {"spec": spec, "mean": list(enc.mean), "std": list(enc.std), "source": str(run)}
    state = {k: v.detach().cpu().contiguous() for k, v in enc.backbone.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out / "backbone.safetensors"
        save_file(state, str(path), metadata={"selfsup": json.dumps(meta)})
        return path
    if not spec["name"].startswith("resnet"):
        raise ConfigError(f"--format torchvision exports ResNets; this run's backbone is '{spec['name']}' "
                          f"(use --format safetensors)")
    path = out / "backbone_torchvision.pt"
    torch.save(_to_torchvision_keys(state), path)
    (out / "backbone_torchvision.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _torchvision_resnet(spec: dict) -> nn.Module:
    import torchvision  # here: torchvision.models costs 2 s to import

    net = getattr(torchvision.models, spec["name"])(weights=None)
    c = spec.get("in_chans", 3)
    if spec["small_stem"]:
        net.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif c != 3:
        net.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def load_backbone(path: str | Path, with_meta: bool = False):
    """Load an exported backbone (``.safetensors`` or torchvision ``.pt``) as a plain torch model in
    eval mode whose ``forward`` returns pooled features. With ``with_meta`` also returns the dict
    ``{"spec", "mean", "std"}`` (the input the model expects: normalise with mean/std; ``spec["input"]``
    is ``"lab_l"`` for colorization backbones, which see the Lab lightness only)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no exported backbone at {path}")
    try:
        model, meta = _load_exported(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line, not a traceback
        raise CheckpointError(f"{path}: not a usable exported backbone ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    model.eval()
    return (model, meta) if with_meta else model


def _load_exported(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("selfsup", "null") or "null")
        if meta is None:
            raise ConfigError(f"{path} has no selfsup metadata; was it written by `selfsup export`?")
        spec = meta["spec"]
        model = build_backbone(spec["name"], spec["image_size"], spec["small_stem"], spec.get("in_chans", 3),
                               spec.get("options"))
        model.load_state_dict(load_file(str(path)))
    else:
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            raise ConfigError(f"{meta_path} (the architecture of {path.name}) is missing")
        meta = json.loads(meta_path.read_text())
        model = _torchvision_resnet(meta["spec"])
        model.load_state_dict(safe_torch_load(path))
    return model, meta

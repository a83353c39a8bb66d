"""Typed run configuration: dataclasses, one YAML preset per method, ``key=value`` overrides.

A run is described by one :class:`Config`. It is built in three layers, each visible in a single place:

1. the dataclass defaults below,
2. the method's preset ``src/selfsup/presets/<method>.yaml`` (a flat override of 1, no inheritance),
3. command-line overrides ``section.key=value`` (values parsed as YAML, then type-checked).

The resolved config is written to ``RUN_DIR/config.yaml`` and is all that is needed to repeat a run.
Method-specific hyper-parameters live in ``params`` and are checked against the method's own
``Params`` dataclass (see ``selfsup/methods/<method>.py``) by ``configure.py``, which builds a checked
Config (``build_config``); this module knows no method.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.views import AugConfig

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A user-facing configuration problem (unknown key, wrong type, unknown method...)."""


@dataclass
class DataConfig:
    path: str | None = None  # image folder, dataset folder, or a dataset name (digits, cifar10, ...)
    split: str = "train"  # which split to pretrain on ("train", "unlabeled", "train+unlabeled", ...)
    image_size: int = 0  # images are decoded once and resized (shorter side + centre crop) to this; 0: chosen
    #                      from the images (data/size.py: tiny stay tiny, photos 96 px on a CPU, 224 on a GPU)
    view_size: int = 0  # side of the training views (augmented crops); 0: image_size. Smaller is cheaper
    #                     (e.g. 24 for 32 px data); the backbone is evaluated at image_size
    view_frac: float = 0.0  # the same as a fraction of image_size (0.75: 24 px views of 32 px images, 72 of
    #                         96), for any folder; 0: not used. At most one of view_size and view_frac
    cache_dir: str | None = None  # decode cache; default $SELFSUP_CACHE or ~/.cache/selfsup/cache
    download: bool = False  # allow downloading a named dataset (cifar10, stl10, ...)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18 | resnet50 | convnet | airbench | vit_tiny | vit_small | vit_micro
    #                             (tests) | torchvision:NAME (any torchvision classification model)
    #                             | timm:NAME (any timm model; needs timm)
    small_stem: bool | None = None  # 3x3 conv1, no max-pool; None = automatic (image_size <= 64)
    pretrained: bool = False  # torchvision:NAME / timm:NAME only: start from their default weights (local cache)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.1  # base learning rate for a batch of 256; the run uses lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0  # linear warm-up, capped at 10% of the run, then cosine decay
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    lars_eta: float = 0.02  # LARS trust coefficient (You et al. 2017)
    lars_clip: bool = True  # LARS: cap each layer's adapted rate at the global lr (solo-learn's clip_lr)
    freeze_backbone_frac: float = 0.0  # the first fraction of the run trains the heads only (projector,
    # predictor, prototypes, ...): the backbone's gradients are dropped (a step costs the same); then its rate
    # ramps up linearly over the warm-up's length before it follows the run's schedule. 0: off. Why, and
    # what it measured: selfsup.optim.backbone_factor
    freeze_backbone_max_steps: int = 200  # ...at most this many steps (the measured runs held 40-162), so that
    # a long run stays the paper's recipe (200 CIFAR-10 epochs at batch 256: 0.5% of the run)


@dataclass
class TrainConfig:
    epochs: int = 100  # ignored when time_budget is set
    time_budget: str | None = None  # e.g. "90s", "20m", "2h", "1h30m": the whole run ends within it
    total_steps: int | None = None  # the run's length in optimizer steps; fixed by the time budget's plan
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where native, fp16 + scaler on older GPUs, else fp32) | bf16 | fp16 | fp32
    channels_last: bool = True
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_every: int = 0  # also write and keep every N-th step's checkpoint as checkpoints/step_<N>.pt (0: only last + previous)
    keep_seconds: list[float] = field(default_factory=list)  # also keep checkpoints/at_<S>s.pt at the first step
    #                            ending S seconds after the session started (e.g. [300, 600, 1200]: a curve of one run)
    log_every: int = 20  # steps between rows of metrics.csv
    log_seconds: float = 30.0  # seconds between plain progress lines when no progress bar is shown
    logger: str = "csv"  # csv (metrics.csv) | tensorboard (metrics.csv and RUN_DIR/tensorboard events)
    sync_bn: bool = False  # distributed runs: SyncBatchNorm (batch statistics over all processes; CUDA)


@dataclass
class Config:
    method: str = "rotation"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    params: dict[str, Any] = field(default_factory=dict)  # the method's own hyper-parameters

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so the dict is plain YAML / torch ``weights_only`` material."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# type checking of values coming from YAML or the command line


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, arg, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown option '{where}{key}'{hint}")


def update_dataclass(obj: Any, values: dict[str, Any], where: str = "") -> Any:
    """Set fields of a dataclass instance from a (nested) dict, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        if key not in names:
            raise _unknown(key, names, where)
        current = getattr(obj, key)
        if isinstance(current, dict) and isinstance(value, dict):
            # e.g. params: an override sets the keys it names and keeps the others (the preset's)
            setattr(obj, key, {**current, **value})
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' is a section; set its fields, e.g. {where}{key}.<name>=...")
            update_dataclass(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.3", "train.epochs=5"]`` -> nested dict, values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=0.3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of '{item}': {e}") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def preset(method: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{method}.yaml"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


RECIPE_DIR = PRESET_DIR / "recipes"


def recipes() -> list[str]:
    """The recipes: ``presets/recipes/<name>.yaml``, each a method and config sections chosen for a goal
    (e.g. ``fast``: the best features in a short budget), applied over the method's preset."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe(name: str) -> tuple[str, dict[str, Any]]:
    """``(method, overrides)`` of recipe ``name``."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown recipe '{name}'; choose one of: {', '.join(recipes()) or 'none'}")
    d = yaml.safe_load(path.read_text()) or {}
    if "method" not in d:
        raise ConfigError(f"{path} names no method")
    method = d.pop("method")
    return method, d


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (one level of nesting, as the config's)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def validate(cfg: Config) -> None:
    from .backbones import BACKBONES

    name = cfg.model.backbone
    if name.startswith("torchvision:"):
        import torchvision

        if name.split(":", 1)[1] not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(f"unknown torchvision classification model '{name.split(':', 1)[1]}'; see "
                              f"torchvision.models.list_models(module=torchvision.models)")
    elif name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ConfigError(f"{name}: timm:NAME backbones need timm (pip install timm)") from None
        if not timm.is_model(name.split(":", 1)[1].split(".", 1)[0]):
            raise ConfigError(f"unknown timm model '{name.split(':', 1)[1]}'; see timm.list_models()")
    elif name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}, torchvision:NAME or "
                          f"timm:NAME")
    if cfg.model.pretrained and not name.startswith(("torchvision:", "timm:")):
        raise ConfigError(f"model.pretrained=true needs a torchvision:NAME or timm:NAME backbone; '{name}' has no "
                          f"pretrained weights")
    if cfg.optim.name not in ("sgd", "lars", "adamw"):
        raise ConfigError(f"unknown optimizer '{cfg.optim.name}'; choose sgd, lars or adamw")
    if cfg.train.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"unknown precision '{cfg.train.precision}'; choose auto, bf16, fp16 or fp32")
    for name, v in (("train.epochs", cfg.train.epochs), ("train.batch_size", cfg.train.batch_size),
                    ("train.ckpt_every", cfg.train.ckpt_every),
                    ("train.log_every", cfg.train.log_every)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if cfg.data.image_size < 0 or isinstance(cfg.data.image_size, bool):
        raise ConfigError(f"data.image_size must be >= 1, or 0 to choose it from the images, got {cfg.data.image_size}")
    if cfg.data.view_size < 0:
        raise ConfigError(f"data.view_size must be >= 0 (0: the image size), got {cfg.data.view_size}")
    if not 0 <= cfg.data.view_frac <= 1:
        raise ConfigError(f"data.view_frac must be in (0, 1] (0: not used), got {cfg.data.view_frac}")
    if cfg.data.view_size and cfg.data.view_frac:
        raise ConfigError(f"data.view_size={cfg.data.view_size} and data.view_frac={cfg.data.view_frac} both set "
                          f"the training views' side: give one")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.train.time_budget is not None:
        parse_duration(cfg.train.time_budget)  # raises ConfigError when malformed
    if any(float(t) <= 0 for t in cfg.train.keep_seconds):
        raise ConfigError(f"train.keep_seconds must be positive seconds, got {cfg.train.keep_seconds}")
    if cfg.train.logger not in ("csv", "tensorboard"):
        raise ConfigError(f"unknown train.logger '{cfg.train.logger}'; choose csv or tensorboard")
    if not 0 <= cfg.optim.freeze_backbone_frac < 1:
        raise ConfigError(f"optim.freeze_backbone_frac must be in [0, 1) (0: off), got {cfg.optim.freeze_backbone_frac}")
    if cfg.optim.freeze_backbone_max_steps < 0:
        raise ConfigError(f"optim.freeze_backbone_max_steps must be >= 0, got {cfg.optim.freeze_backbone_max_steps}")
    if cfg.train.keep_every < 0:
        raise ConfigError(f"train.keep_every must be >= 0 (0: off), got {cfg.train.keep_every}")
    if cfg.train.total_steps is not None and cfg.train.total_steps < 1:
        raise ConfigError(f"train.total_steps must be >= 1, got {cfg.train.total_steps}")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"90s"``, ``"20m"``, ``"2h"``, ``"1h30m"`` or a plain number of seconds."""
    raw = str(text).strip()
    try:
        seconds = float(raw)
    except ValueError:
        parts = _DURATION.findall(raw)
        if not parts or _DURATION.sub("", raw).strip():
            raise ConfigError(f"cannot read the time budget '{text}': use e.g. 90s, 20m, 2h or 1h30m") from None
        seconds = sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u.lower()] for v, u in parts)
    if not seconds > 0:
        raise ConfigError(f"the time budget must be positive, got '{text}'")
    return seconds


def restore_config(d: dict[str, Any]) -> Config:
    """A Config saved by :meth:`Config.to_dict` (e.g. ``RUN_DIR/config.yaml``), with ``params`` as saved:
    they are checked when the method is built (``Method.__init__``) or by
    :func:`selfsup.configure.config_from_dict`, which also validates the whole config."""
    d = dict(d)
    cfg = Config(method=d.pop("method"))
    update_dataclass(cfg, d)
    cfg.aug.size = view_side(cfg.data)
    return cfg


def view_side(data: DataConfig) -> int:
    """The training views' side: ``data.view_size``, else ``data.view_frac`` of the image size (rounded,
    at least 4 px), else the image size (0 while the image size is still to be chosen)."""
    if data.view_size:
        return data.view_size
    if data.view_frac and data.image_size:
        return max(4, min(data.image_size, int(round(data.image_size * data.view_frac))))
    return data.image_size


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

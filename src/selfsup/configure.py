"""Build and check a run's :class:`~selfsup.config.Config`: defaults <- the method's preset <- overrides,
with ``params`` checked against the method's own ``Params`` dataclass.

It sits above ``config.py`` (the plain schema, presets and overrides, which knows no method) and the
method registry (``methods/``, whose methods read the schema), so that neither imports the other.
Used by the command line, the training loop and the library API (``selfsup.build_config``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, _plain, preset, restore_config, update_dataclass, validate, view_side
from .methods import get_method
from .run import read_config_file, read_saved_config


def build_config(method: str, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- the method's preset <- overrides; validates ``params`` against the method."""
    get_method(method)  # raises ConfigError for an unknown method
    cfg = Config(method=method)
    update_dataclass(cfg, {k: v for k, v in preset(method).items() if k != "method"})
    if overrides:
        overrides = dict(overrides)
        if "method" in overrides and overrides.pop("method") != method:
            raise ConfigError("the method is chosen with --method, not as an override")
        update_dataclass(cfg, overrides)
    return finalize(cfg)


def finalize(cfg: Config) -> Config:
    """Derive what follows from other fields, fill the method's params, validate."""
    cfg.aug.size = view_side(cfg.data)  # the training views' side
    cfg.params = resolve_params(get_method(cfg.method), cfg.params)
    validate(cfg)
    return cfg


def resolve_params(method_cls: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Fill the method's parameter defaults and check names/types; returns a plain dict."""
    p = method_cls.Params()
    update_dataclass(p, params or {}, "params.")
    return _plain(dataclasses.asdict(p))


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild and check a Config saved by :meth:`Config.to_dict` (e.g. ``RUN_DIR/config.yaml``)."""
    return finalize(restore_config(d))


def load_config(path: Path) -> Config:
    return config_from_dict(read_config_file(path))


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The saved config of a run, with optional overrides (e.g. more epochs)."""
    try:
        d = read_saved_config(run_dir)
    except ConfigError as e:
        raise ConfigError(f"--resume: {e}") from None
    cfg = config_from_dict(d)
    if overrides:
        update_dataclass(cfg, overrides)
        finalize(cfg)
    return cfg

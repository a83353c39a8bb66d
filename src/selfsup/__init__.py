"""selfsup: self-supervised visual representation learning, classic pretext tasks and modern methods
under one evaluation protocol."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import selfsup` stays cheap, the API is one attribute away
    if name in ("pretrain", "Trainer"):
        from . import train

        return getattr(train, name)
    if name in ("build_config", "load_config"):
        from . import configure

        return getattr(configure, name)
    if name == "Config":
        from .config import Config

        return Config
    if name in ("evaluate", "load_encoder", "extract_features"):
        import importlib  # not `from . import evaluate`: that asks this __getattr__ for "evaluate" again

        ev = importlib.import_module(".evaluate", __name__)
        return getattr(ev, name)
    if name in ("load_images",):
        from . import data

        return data.load_images
    if name == "load_backbone":
        from .export import load_backbone

        return load_backbone
    if name == "METHODS":
        from .methods import METHODS

        return METHODS
    raise AttributeError(f"module 'selfsup' has no attribute '{name}'")


__all__ = ["__version__", "pretrain", "Trainer", "build_config", "load_config", "Config", "evaluate",
           "load_encoder", "extract_features", "load_images", "METHODS", "load_backbone"]

"""All methods, one file each. This table is the only registry: a method lives where it is imported."""

from __future__ import annotations

from .barlow_twins import BarlowTwins
from .base import Method
from .bigan import BiGAN
from .byol import BYOL
from .colorization import Colorization
from .dcgan import DCGAN
from .dino import DINO
from .emp_ssl import EMPSSL
from .distill import Distill
from .deepcluster import DeepCluster
from .inpainting import Inpainting
from .jigsaw import Jigsaw
from .mae import MAE
from .moco_v2 import MoCoV2
from .moco_v3 import MoCoV3
from .patches import Patches
from .relative_location import RelativeLocation
from .rotation import Rotation
from .simclr import SimCLR
from .simclr_v2 import SimCLRv2
from .simsiam import SimSiam
from .swav import SwAV
from .vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (
        # context-based (spatial context, then context similarity)
        Rotation, Jigsaw, RelativeLocation, DeepCluster,
        # generation-based
        Colorization, Inpainting, DCGAN, BiGAN, MAE,
        # joint-embedding
        SimCLR, MoCoV2, BYOL, SimSiam, BarlowTwins, VICReg, MoCoV3, SimCLRv2, Distill, SwAV, DINO, EMPSSL,
        # no gradient: a dictionary of whitened patches (the classic baseline)
        Patches,
    )
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        from ..config import ConfigError

        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]

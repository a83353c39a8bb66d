"""The base class every method derives from.

A method owns its backbone and heads and splits a training step in two:

* :meth:`Method.prepare` turns a batch of raw ``uint8`` images (already on the training device) into
  the method's inputs: augmented views and, for pretext tasks, the pseudo labels made from the
  images themselves. It runs in float32, outside autocast.
* :meth:`Method.training_step` is the method's forward pass and loss, run under autocast. It reads
  like the paper's pseudocode and returns a dict with ``"loss"`` and any scalars worth logging.
* :meth:`Method.after_step` runs after the optimizer step (EMA / momentum-encoder updates).

The training loop (``selfsup/train.py``) does everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ..backbones import Backbone, backbone_spec, build_backbone

if TYPE_CHECKING:
    from ..config import Config


class Method(nn.Module):
    name: ClassVar[str]
    family: ClassVar[str]  # survey taxonomy: context-based, generation-based, joint-embedding
    summary: ClassVar[str]  # one line for `selfsup methods`
    views_per_image: ClassVar[int] = 1  # how many encoder inputs one source image becomes

    @dataclass
    class Params:
        pass

    def __init__(self, cfg: "Config") -> None:
        super().__init__()
        self.cfg = cfg
        self.hp = self.Params(**cfg.params)
        self.backbone: Backbone = build_backbone(cfg.model.backbone, cfg.data.image_size, cfg.model.small_stem)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def backbone_spec(self) -> dict:
        return backbone_spec(self.cfg.model.backbone, self.cfg.data.image_size, self.cfg.model.small_stem)

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the run's memory format (channels_last by default)."""
        return x.contiguous(memory_format=self.memory_format)

    def prepare(self, images: torch.Tensor, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (``step`` is 0-based): momentum-encoder (EMA) updates,
        schedules of the method's own. Nothing by default."""

    def param_groups(self) -> list[dict]:
        """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (neither),
        as in SimCLR/BYOL's LARS setup."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]

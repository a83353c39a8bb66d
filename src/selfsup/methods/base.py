"""The base class every method derives from.

A method owns its backbone and heads and splits a training step in two:

* :meth:`Method.prepare` turns a batch of raw ``uint8`` images (already on the training device) into
  the method's inputs: augmented views and, for pretext tasks, the pseudo labels made from the
  images themselves. It runs in float32, outside autocast.
* :meth:`Method.training_step` is the method's forward pass and loss, run under autocast. It reads
  like the paper's pseudocode and returns a dict with ``"loss"`` and any scalars worth logging.
* :meth:`Method.after_step` runs after the optimizer step (EMA / momentum-encoder updates).

Hooks that some methods need (all optional):

* ``phases``: methods with several players (GANs) name one optimizer per phase, e.g. ``("d", "g")``;
  the loop then calls :meth:`Method.phase_step` once per phase, in order, each followed by its own
  backward and optimizer step. Each param group from :meth:`Method.param_groups` says its ``"phase"``.
* :meth:`Method.on_epoch_start` runs before each epoch (DeepCluster re-clusters the data there) and
  :meth:`Method.epoch_order` may replace the epoch's uniform random order of the images.
* :meth:`Method.figures` draws the method's own task (e.g. colorized images) into
  ``RUN_DIR/figures/`` at the end of training.
* ``input_mode``: what the backbone sees, ``"rgb"`` or ``"lab_l"`` (the L channel only, for
  colorization); it is saved with the backbone so evaluation feeds the same input.

The training loop (``selfsup/train.py``) does everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from ..backbones import Backbone, backbone_spec, build_backbone
from ..data.views import INPUT_CHANNELS, multi_crop

if TYPE_CHECKING:
    from ..config import Config
    from ..data import CachedImages


@dataclass
class RunState:
    """What :meth:`Method.on_epoch_start` sees of the run that trains it: the training images and where
    the run stands, not the loop itself (the trainer builds one before each epoch; a test or a script
    builds its own)."""

    images: np.ndarray  # the training images, (N, H, W, 3) uint8 (the decode cache)
    device: torch.device
    seed: int  # train.seed
    step: int  # the step about to run
    total_steps: int  # the run's length in steps (planned, for a time budget)
    optimizer: torch.optim.Optimizer | None = None  # the first phase's optimizer (DeepCluster resets its head's state)


class Method(nn.Module):
    name: ClassVar[str]
    family: ClassVar[str]  # survey taxonomy: context-based, generation-based, joint-embedding
    summary: ClassVar[str]  # one line for `selfsup methods`
    views_per_image: ClassVar[int] = 1  # how many encoder inputs one source image becomes
    input_mode: ClassVar[str] = "rgb"  # what the backbone sees: "rgb" or "lab_l" (see data.views.INPUT_CHANNELS)
    phases: ClassVar[tuple[str, ...]] = ("main",)  # one optimizer per phase, stepped in this order
    # the submodule that evaluation, export and the health checks use as the encoder: the trained
    # ``backbone``, or e.g. DINO's EMA teacher (the paper evaluates the teacher)
    eval_backbone: ClassVar[str] = "backbone"
    # whether ``prepare`` takes the whole frames of a non-square collection (``CachedImages.frames``):
    # methods whose views are random-resized crops only (the joint-embedding ones) sample the whole
    # frame; the others (tiles, rotations, masks, ...) get the centre squares (``CachedImages.images``)
    full_frame: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, cfg: "Config") -> None:
        super().__init__()
        self.cfg = cfg
        self.hp = self.Params(**cfg.params)
        try:
            self.backbone: Backbone = build_backbone(cfg.model.backbone, cfg.data.image_size, cfg.model.small_stem,
                                                     in_chans=INPUT_CHANNELS[self.input_mode],
                                                     pretrained=cfg.model.pretrained)
        except ValueError as e:  # e.g. pretrained weights not in the cache, a non-RGB torchvision model
            from ..config import ConfigError

            raise ConfigError(str(e)) from None
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        # the dataset indices (int64, CPU) of the images of the batch handed to the next ``prepare``, in
        # the batch's order (this process's slice under torchrun); set by the trainer before each step,
        # for methods whose pseudo labels are per image (DeepCluster)
        self.batch_indices: torch.Tensor | None = None

    def backbone_spec(self) -> dict:
        """What rebuilds the backbone and feeds it (stored in checkpoints and exports)."""
        spec = backbone_spec(self.cfg.model.backbone, self.cfg.data.image_size, self.cfg.model.small_stem,
                             in_chans=INPUT_CHANNELS[self.input_mode])
        spec["input"] = self.input_mode
        spec["weights"] = self.eval_backbone  # the state_dict prefix evaluation loads (absent: "backbone")
        return spec

    @property
    def encoder(self) -> Backbone:
        """The backbone that is evaluated (:attr:`eval_backbone`)."""
        return getattr(self, self.eval_backbone)

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the run's memory format (channels_last by default)."""
        return x.contiguous(memory_format=self.memory_format)

    def prepare(self, images: torch.Tensor, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def phase_step(self, batch: Any, phase: str) -> dict[str, torch.Tensor]:
        """One phase of a multi-optimizer step (``phases`` has more than one entry): return the loss
        that this phase's optimizer minimises as ``"loss"``, plus scalars to log. The trainer logs
        phase ``p``'s loss as ``loss_p`` and their sum as ``loss``."""
        return self.training_step(batch)

    def on_epoch_start(self, run: RunState, epoch: int) -> None:
        """Called before the first step of each epoch (also when a run resumes mid-epoch: keep state
        in buffers so that work already done for ``epoch`` is not redone). Nothing by default."""

    def rehearse(self) -> None:
        """Called before a time budget's rehearsal steps (``Trainer.plan``), which are rolled back after:
        put the method in the state most of the run's steps will be in, so that they are timed as they
        will cost (SwAV: its queue in use). Nothing by default."""

    def epoch_order(self, epoch: int, generator: torch.Generator, n: int) -> np.ndarray | None:
        """Indices of the images to visit in ``epoch`` (any length, repeats allowed), drawn with
        ``generator`` (seeded by (seed, epoch)); ``None`` for a uniform random permutation of the ``n``
        images."""
        return None

    @torch.no_grad()
    def figures(self, data: "CachedImages", out_dir: Path, device: torch.device) -> list[Path]:
        """Pictures of the method's own task, written into ``out_dir`` (``RUN_DIR/figures``) at the end
        of training; returns the files written. Nothing by default."""
        return []

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (``step`` is 0-based): momentum-encoder (EMA) updates,
        schedules of the method's own. Nothing by default."""

    def param_groups(self) -> list[dict]:
        """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (neither),
        as in SimCLR/BYOL's LARS setup."""
        return split_decay(self.parameters())


class TwoViewFigures:
    """``figures`` of the two-view methods (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins, VICReg...):
    ``views.png``, each image's two training views and the nearest second view to its first among 64
    images (:func:`selfsup.figures.views_figure`)."""

    def figures(self, data, out_dir, device):
        from ..figures import views_figure

        return [views_figure(self, data, Path(out_dir) / "views.png", device)]


class MultiCropViews:
    """``prepare`` of the multi-crop methods (SwAV, DINO; Caron et al. 2020 Sec. 3.2): two global crops
    ``[x1; x2]`` and ``hp.n_local`` local crops (None without), from the method's ``n_local``,
    ``global_scale``, ``local_scale`` and ``local_size`` params (see ``data.views.multi_crop``)."""

    def prepare(self, images, generator):
        hp = self.hp
        glob, loc = multi_crop(images, self.cfg.aug, generator, 2, hp.n_local, hp.global_scale, hp.local_scale,
                               hp.local_size)
        return self.fmt(glob), (self.fmt(loc) if loc is not None else None)


def split_decay(params, **extra) -> list[dict]:
    """Param groups for ``params``: weights (decayed, LARS-adapted) and biases/norm parameters (neither);
    ``extra`` (e.g. ``phase="d"``, ``lr=...``, ``betas=...``) is added to both groups."""
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, **extra}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **extra}]

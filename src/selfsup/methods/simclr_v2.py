"""SimCLR v2: SimCLR with a deeper projection head, fine-tuned from the head's first layer
(Chen, Kornblith, Swersky, Norouzi & Hinton, "Big Self-Supervised Models are Strong Semi-Supervised
Learners", NeurIPS 2020, arXiv 2006.10029).

Algorithm (Sec. 2 of the paper; the pretraining step is SimCLR's, :mod:`selfsup.methods.simclr`)::

    for minibatch x:
        x1, x2 = t(x), t'(x)                         # two random augmentations per image
        z1, z2 = g(f(x1)), g(f(x2))                  # g: 3-layer MLP, Linear-BN-ReLU x2 + Linear-BN
        loss = NT-Xent(z1, z2; temperature)          # SimCLR's Eq. 1
    # fine-tuning (Sec. 2, "Fine-tuning"): keep f and the first `finetune_from_layer` layers of g,
    # put the classifier on top: h(x) = W_task . relu(BN(W1 f(x)))   (layer 1, the paper's choice)
    # distillation on unlabeled data: see selfsup.methods.distill

What changes from SimCLR (Sec. 2): (1) a bigger encoder (ResNet-152 3x with selective kernels; here
any backbone); (2) a deeper head, 3 layers instead of 2 (``params.proj_layers``), whose output layer
has BatchNorm as in the reference code; (3) fine-tuning starts from the middle of the head rather
than from ``f(x)``: fine-tuning from the first layer of the 3-layer head works best in the paper's
ablation (``params.finetune_from_layer``, recorded in the run's config and checkpoint).
The paper also borrows MoCo's memory of negatives, for "a modest 1%" (Sec. 2); it is not used here
(see ``moco_v2`` for the queue).

Fine-tuning from a projector layer::

    from selfsup.methods.simclr_v2 import encoder_with_projector, projected_encoder
    net = encoder_with_projector(RUN_DIR)            # backbone + head layer 1 (the run's setting)
    feats = net(images)                              # (B, proj_hidden_dim): an nn.Module like a backbone
    # the evaluation protocols take it as the encoder, e.g. fine-tuning with 1% of the labels:
    from selfsup.evaluate import evaluate
    evaluate(RUN_DIR, "finetune", TRAIN, TEST, fraction=0.01, encoder=projected_encoder(RUN_DIR))

``encoder_with_projector(RUN_DIR, 0)`` is the plain backbone (what ``selfsup evaluate`` and
``selfsup export`` use); ``layer`` = ``proj_layers`` is the whole head.

Defaults: the paper's ImageNet head is 2048-2048-128 (hidden = the ResNet's width), temperature
0.1, LARS lr 0.1 * sqrt(batch), weight decay 1e-4, batch 4096. For 32-96 px images the preset keeps
SimCLR's CIFAR recipe (solo-learn): temperature 0.2, hidden 2048, output 128, LARS lr 0.4 per 256,
weight decay 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..backbones import Backbone
from ..heads import MLP
from .simclr import SimCLR


def head_layers(projector: nn.Sequential, layer: int) -> nn.Sequential:
    """The first ``layer`` layers of an MLP head (``heads.MLP``): each layer is a Linear with what
    follows it up to the next Linear (BN + ReLU for hidden layers, the output BN for the last).
    ``layer=0`` is the empty head. Shares the modules (no copy)."""
    starts = [i for i, m in enumerate(projector) if isinstance(m, nn.Linear)] + [len(projector)]
    if not 0 <= layer < len(starts):
        raise ValueError(f"the head has {len(starts) - 1} layers; layer must be in 0..{len(starts) - 1}, got {layer}")
    return nn.Sequential(*list(projector)[:starts[layer]])


class BackboneWithProjector(Backbone):
    """A backbone followed by the first layers of its projection head, usable wherever a backbone is
    (``forward`` gives ``(B, out_dim)``; ``forward_stages`` is the backbone's, for layer-wise probes)."""

    def __init__(self, backbone: Backbone, head: nn.Sequential) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        linears = [m for m in head if isinstance(m, nn.Linear)]
        self.out_dim = linears[-1].out_features if linears else backbone.out_dim
        self.stage_names, self.stage_dims = backbone.stage_names, backbone.stage_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_stages(x)


class SimCLRv2(SimCLR):
    name = "simclr_v2"
    family = "joint-embedding"
    summary = "SimCLR v2 (Chen et al. 2020): SimCLR with a 3-layer head, fine-tuned from the head's first layer"
    views_per_image = 2

    @dataclass
    class Params(SimCLR.Params):  # temperature 0.2, proj_hidden_dim 2048, proj_dim 128 (see simclr.py)
        proj_layers: int = 3  # depth of the projection head (paper: 3; SimCLR: 2)
        finetune_from_layer: int = 1  # downstream encoder = backbone + this many head layers (paper: 1)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)  # SimCLR: backbone, 2-layer projector (replaced below), prepare, training_step
        hp = self.hp
        if hp.proj_layers < 1 or not 0 <= hp.finetune_from_layer <= hp.proj_layers:
            from ..config import ConfigError

            raise ConfigError(f"simclr_v2 needs params.proj_layers >= 1 and 0 <= params.finetune_from_layer <= "
                              f"proj_layers, got {hp.proj_layers} and {hp.finetune_from_layer}")
        self.projector = MLP(self.backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers,
                             last_bn=True)

    def finetune_encoder(self, layer: int | None = None) -> BackboneWithProjector:
        """This model's backbone + the first ``layer`` head layers (default ``finetune_from_layer``),
        sharing the weights."""
        layer = self.hp.finetune_from_layer if layer is None else layer
        return BackboneWithProjector(self.backbone, head_layers(self.projector, layer))


def encoder_with_projector(run: str | Path, layer: int | None = None) -> BackboneWithProjector:
    """The backbone of a ``simclr_v2`` run (a run directory or checkpoint file) followed by the first
    ``layer`` layers of its projection head (default: the run's ``params.finetune_from_layer``), in
    eval mode, on the CPU. Loaded with ``weights_only=True``. Its input is the run's evaluation view
    (``selfsup.data.views.eval_view`` with the run's ``aug.mean``/``aug.std``; see
    :func:`projected_encoder`)."""
    from ..checkpoint import load_checkpoint
    from ..config import ConfigError
    from ..run import checkpoint_path, load_encoder

    ckpt = load_checkpoint(checkpoint_path(str(run)))
    if ckpt.get("method") != SimCLRv2.name:
        raise ConfigError(f"{run} is a '{ckpt.get('method')}' run; encoder_with_projector needs a simclr_v2 run")
    hp = SimCLRv2.Params(**ckpt["config"]["params"])
    layer = hp.finetune_from_layer if layer is None else layer
    if not 0 <= layer <= hp.proj_layers:
        raise ConfigError(f"layer must be in 0..{hp.proj_layers} (the run's head has {hp.proj_layers} layers), "
                          f"got {layer}")
    backbone = load_encoder(str(run)).backbone
    projector = MLP(backbone.out_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers, last_bn=True)
    projector.load_state_dict({k[len("projector."):]: v for k, v in ckpt["model"].items()
                               if k.startswith("projector.")})
    return BackboneWithProjector(backbone, head_layers(projector, layer)).eval()


def projected_encoder(run: str | Path, layer: int | None = None):
    """:func:`encoder_with_projector` as a ``selfsup.evaluate.Encoder`` (with the run's input
    normalisation and precision), to pass as ``evaluate(..., encoder=...)``: every protocol (knn,
    linear, finetune, pseudolabel, fixmatch...) then runs on backbone + head layers."""
    import dataclasses

    from ..run import load_encoder

    enc = load_encoder(str(run))
    return dataclasses.replace(enc, backbone=encoder_with_projector(run, layer))

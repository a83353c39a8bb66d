"""Exponential moving averages of networks: MoCo's key encoder and BYOL's target network.

Both papers keep a second copy of the encoder whose weights follow the trained (online/query)
encoder slowly::

    theta_target <- m * theta_target + (1 - m) * theta_online        (MoCo Eq. 2, BYOL Sec. 3.1)

MoCo uses a fixed ``m`` (0.999); BYOL raises ``m`` from ``base`` to 1 along the run with a cosine
(:func:`cosine_momentum`). The target is never trained by the optimizer (``requires_grad=False``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: every parameter of ``target`` becomes ``momentum * target + (1 - momentum) * online``;
    every buffer (BatchNorm running mean/var, num_batches_tracked) is copied from ``online``.

    ``target`` must have the structure of ``online`` (typically ``copy.deepcopy(online)``).
    """
    t_params, o_params = list(target.named_parameters()), list(online.named_parameters())
    t_bufs, o_bufs = list(target.named_buffers()), list(online.named_buffers())
    if [n for n, _ in t_params] != [n for n, _ in o_params] or [n for n, _ in t_bufs] != [n for n, _ in o_bufs]:
        raise ValueError("ema_update: target and online modules differ in structure")
    if t_params:
        # lerp: t + (1 - m) * (o - t) == m * t + (1 - m) * o, one fused kernel per tensor list
        torch._foreach_lerp_([p for _, p in t_params], [p.detach() for _, p in o_params], 1.0 - momentum)
    for (_, tb), (_, ob) in zip(t_bufs, o_bufs):
        tb.copy_(ob)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's target decay rate (Grill et al. 2020, Sec. 3.2)::

        tau = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2

    for step ``k`` of ``K``: ``base`` at step 0, 1.0 at the end. ``final`` generalises the end value
    (``final - (final - base) * (cos(pi k / K) + 1) / 2``, e.g. 0.99 -> 0.999 for MoCo v2 as in
    solo-learn); ``final == base`` gives a constant momentum (MoCo's fixed m).
    """
    if total_steps <= 0:
        return final
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` everywhere: the initial target/key
    network (equal to the online one, as both papers initialise it). Registered as a submodule it is
    part of the ``state_dict`` (checkpointed) and skipped by :meth:`Method.param_groups`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target

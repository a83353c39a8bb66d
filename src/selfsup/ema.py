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


MIN_RUN_MOMENTUM = 0.9


def run_momentum(base: float, total_steps: int, ref_steps: int) -> float:
    """The starting EMA momentum for a run of ``total_steps`` when a recipe gives ``base`` for runs of
    ``ref_steps`` steps: below ``ref_steps`` the EMA's horizon ``1 / (1 - m)`` (steps the target lags
    behind) shrinks with the square root of the run's length, so a short run's target does not lag
    behind most of the run; at ``ref_steps`` or more (or ``ref_steps == 0``) it is ``base``::

        m = 1 - (1 - base) * sqrt(ref_steps / total_steps)       (total_steps < ref_steps)

    The square root fits the BYOL repository's own presets (``_EMA_PRESETS`` of byol/configs: 0.996
    at 1000 ImageNet epochs, 0.99 at 300 and 100, 0.97 at 40; the rule gives 0.993, 0.987, 0.980).
    It never goes below :data:`MIN_RUN_MOMENTUM` (0.9; BYOL Table 5a: 0.9 still learns, 68.4% against
    72.5% at 0.99, while 0, a target equal to the online network, collapses to 0.3%), nor above ``base``.
    E.g. solo-learn's CIFAR BYOL (0.99 for 1000 epochs of 195 steps) at 10,000 steps: 0.956; at
    1,200 steps the rule's 0.872 is held at 0.9."""
    if ref_steps <= 0 or total_steps >= ref_steps or total_steps <= 0:
        return base
    return min(base, max(MIN_RUN_MOMENTUM, 1 - (1 - base) * math.sqrt(ref_steps / total_steps)))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` everywhere: the initial target/key
    network (equal to the online one, as both papers initialise it). Registered as a submodule it is
    part of the ``state_dict`` (checkpointed) and skipped by :meth:`Method.param_groups`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target

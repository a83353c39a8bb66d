"""Batched colour-space conversions in torch: sRGB <-> CIE Lab (D65), for colorization.

Standard formulas (IEC 61966-2-1 sRGB transfer curve, sRGB->XYZ matrix, CIE 1976 L*a*b* with the
D65 white point), on whole batches ``(B, 3, H, W)`` of float RGB in [0, 1], on any device, in float32
(autocast is disabled inside). L is in [0, 100]; a and b roughly in [-110, 110].
"""

from __future__ import annotations

import torch
from torch import Tensor

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])  # D65, the XYZ of RGB (1, 1, 1) under the matrix above
_EPS = (6 / 29) ** 3
_KAPPA = (29 / 6) ** 2 / 3  # slope of the linear segment of f


def _mix(x: Tensor, m: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", m.to(x.device, x.dtype), x)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] ``(B, 3, H, W)`` -> Lab ``(B, 3, H, W)`` (L in [0, 100])."""
    with torch.autocast(rgb.device.type, enabled=False):
        rgb = rgb.float().clamp(0, 1)
        lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
        xyz = _mix(lin, _RGB_TO_XYZ) / _WHITE.to(rgb.device).view(1, 3, 1, 1)
        f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1 / 3), _KAPPA * xyz + 4 / 29)
        fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
        return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor, clamp: bool = True) -> Tensor:
    """Lab ``(B, 3, H, W)`` -> sRGB ``(B, 3, H, W)``, clamped to [0, 1] unless ``clamp=False``
    (out-of-gamut colours then show up as values outside [0, 1])."""
    with torch.autocast(lab.device.type, enabled=False):
        lab = lab.float()
        fy = (lab[:, 0] + 16) / 116
        f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
        xyz = torch.where(f > 6 / 29, f ** 3, (f - 4 / 29) / _KAPPA) * _WHITE.to(lab.device).view(1, 3, 1, 1)
        lin = _mix(xyz, torch.linalg.inv(_RGB_TO_XYZ.double()).float())
        pos = lin.clamp_min(0.0031308)
        rgb = torch.where(lin > 0.0031308, 1.055 * pos ** (1 / 2.4) - 0.055, 12.92 * lin)
        return rgb.clamp(0, 1) if clamp else rgb


def lightness(rgb: Tensor) -> Tensor:
    """The network input of colorization: L of ``rgb`` in [0, 1], scaled to [-1, 1], ``(B, 1, H, W)``."""
    return rgb_to_lab(rgb)[:, :1] / 50 - 1

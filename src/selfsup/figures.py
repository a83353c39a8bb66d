"""Small picture helpers shared by the methods' ``figures`` hooks and the report: image grids as PNG.

Images are float tensors ``(N, 3 or 1, H, W)`` in [0, 1] (or uint8 NHWC arrays from the decode cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.views import denormalize


def to_display(images) -> np.ndarray:
    """``(N, H, W, 3)`` float in [0, 1] from a float ``(N, C, H, W)`` tensor in [0, 1] (C = 1 or 3) or a
    uint8 ``(N, H, W, C)`` array."""
    if isinstance(images, np.ndarray):
        x = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return np.clip(x, 0, 1)
    x = images.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def image_grid(rows: Sequence, path: str | Path, row_titles: Sequence[str] | None = None,
               col_titles: Sequence[str] | None = None, title: str | None = None, scale: float = 1.0) -> Path:
    """A grid with one row per entry of ``rows`` (each a batch of images, all of one size per row)
    and optional row/column titles, written as a PNG. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [to_display(r) for r in rows]
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(scale * 1.1 * ncol + 1.2, scale * 1.1 * len(rows) + 0.4),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(r):
                ax.imshow(r[j], interpolation="nearest")
            if i == 0 and col_titles is not None and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
        if row_titles is not None and i < len(row_titles):
            axes[i][0].set_ylabel(row_titles[i], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_images(data, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images (uint8 NHWC) of a decode cache, a fixed spread-out choice for pictures."""
    g = torch.Generator().manual_seed(seed)
    idx = np.sort(torch.randperm(len(data.images), generator=g)[:n].numpy())
    return np.asarray(data.images[idx])


def sample_batch(data, n: int, device, seed: int = 0) -> torch.Tensor:
    """:func:`sample_images` as a uint8 ``(n, 3, H, W)`` batch on ``device``, for a method's pictures."""
    return torch.from_numpy(sample_images(data, n, seed)).permute(0, 3, 1, 2).to(device)


def unnormalize(x: torch.Tensor, aug) -> torch.Tensor:
    """A normalised view batch ``(N, 3, H, W)`` back to RGB in [0, 1] (``aug``: its AugConfig)."""
    return denormalize(x, aug.mean, aug.std).clamp(0, 1)


@torch.no_grad()
def view_matching(method, images: torch.Tensor, generator: torch.Generator):
    """The two-view task of a joint-embedding method on a uint8 batch: its two training views (the
    method's own ``prepare``: ``[x1; x2]``), and for view 1 of each image the index of the nearest
    view 2 by cosine of the backbone's features. Returns ``(x1, x2, nearest, hits)``, ``hits[i]`` when
    image ``i``'s nearest second view is its own."""
    import torch.nn.functional as F

    views = method.prepare(images, generator)
    x1, x2 = (views[0] if isinstance(views, tuple) else views).chunk(2)  # multi-crop: its two large views
    f1 = F.normalize(method.backbone(x1).float(), dim=1)
    f2 = F.normalize(method.backbone(x2).float(), dim=1)
    nearest = (f1 @ f2.t()).argmax(1)
    return x1, x2, nearest, (nearest == torch.arange(len(x1), device=nearest.device)).cpu()


def views_figure(method, data, path: str | Path, device, n: int = 64, show: int = 8) -> Path:
    """``n`` sample images through :func:`view_matching`; rows: view 1, view 2 and the nearest view 2
    found, for ``show`` images; the title counts how many of the ``n`` find their own partner (the task
    the loss trains; 1/n by chance)."""
    x1, x2, nearest, hits = view_matching(method, sample_batch(data, n, device),
                                          torch.Generator(device=device).manual_seed(0))
    k = min(show, len(x1))
    aug = method.cfg.aug
    return image_grid([unnormalize(x1[:k], aug), unnormalize(x2[:k], aug), unnormalize(x2[nearest[:k]], aug)], path,
                      row_titles=["view 1", "view 2", "nearest\nview 2"],
                      col_titles=["found" if h else "missed" for h in hits[:k].tolist()],
                      title=f"{method.name}: the nearest of {len(x1)} second views to each first view (backbone "
                            f"features) is its own for {int(hits.sum())} of {len(x1)}")

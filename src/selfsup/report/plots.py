"""The report's pictures, each a function returning PNG bytes (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.views import AugConfig, augment, eval_input


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _float_rows(rows: list[dict[str, str]], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key, "")
        if v not in ("", None):
            try:
                ys.append(float(v))
                xs.append(float(r["epoch"]))
            except ValueError:
                pass
    return np.array(xs), np.array(ys)


SKIP = {"step", "epoch", "elapsed_s", "img_per_s"}


def curves(named_rows: dict[str, list[dict[str, str]]], keys: list[str] | None = None) -> bytes | None:
    """One panel per logged scalar (loss, pretext_acc, lr, feat_std, rankme, ...), one line per run."""
    plt = _plt()
    if keys is None:
        keys = []
        for rows in named_rows.values():
            for k in (rows[0].keys() if rows else []):
                if k not in SKIP and k not in keys:
                    keys.append(k)
    keys = [k for k in keys if any(len(_float_rows(rows, k)[1]) for rows in named_rows.values())]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in named_rows.items():
            x, y = _float_rows(rows, key)
            if len(y):
                ax.plot(x, y, marker="o" if len(y) < 12 else None, ms=3, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("rankme",) or key.startswith("loss"):
            ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(named_rows) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _show(ax, img) -> None:
    ax.imshow(img, interpolation="nearest", cmap=None if img.ndim == 3 else "gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _denorm(x: torch.Tensor, cfg: AugConfig) -> np.ndarray:
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def augmentation_views(images: np.ndarray, cfg: AugConfig, n_views: int = 5, seed: int = 0) -> bytes:
    """Each row: an image, then ``n_views`` random views of it with the run's augmentation."""
    plt = _plt()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(seed)
    views = [_denorm(augment(x, cfg, g), cfg) for _ in range(n_views)]
    fig, axes = plt.subplots(len(images), n_views + 1, figsize=(1.3 * (n_views + 1), 1.3 * len(images)), squeeze=False)
    for i in range(len(images)):
        _show(axes[i][0], images[i])
        for j in range(n_views):
            _show(axes[i][j + 1], views[j][i])
    axes[0][0].set_title("image", fontsize=8)
    for j in range(n_views):
        axes[0][j + 1].set_title(f"view {j + 1}", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def first_layer_filters(backbone: torch.nn.Module, max_filters: int = 64) -> bytes | None:
    """The first convolution's filters, each scaled to [0, 1] (RGB, or gray for 1-channel input)."""
    conv = next((m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None:
        return None
    plt = _plt()
    w = conv.weight.detach().float().cpu()[:max_filters]
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = ((w - lo) / (hi - lo).clamp_min(1e-8)).permute(0, 2, 3, 1).numpy()
    cols = 16 if len(w) > 16 else len(w)
    rows = math.ceil(len(w) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.55 * cols, 0.55 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, w):
        ax.imshow(f if f.shape[-1] == 3 else f[..., 0], cmap=None if f.shape[-1] == 3 else "gray",
                  interpolation="nearest")
    fig.suptitle(f"first-layer filters ({conv.in_channels}->{conv.out_channels}, {conv.kernel_size[0]}x"
                 f"{conv.kernel_size[1]})", fontsize=8)
    return _png(fig)


@torch.no_grad()
def feature_maps(backbone, images: np.ndarray, view: AugConfig, input_mode: str, channels: int = 4) -> bytes:
    """For each image: the image, then for each stage the ``channels`` most active maps."""
    plt = _plt()
    backbone = backbone.float().eval()
    x = eval_input(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), view, input_mode)
    maps = backbone.forward_stages(x)
    names = getattr(backbone, "stage_names", [f"stage{i}" for i in range(len(maps))])
    ncol = 1 + len(maps) * channels
    fig, axes = plt.subplots(len(images), ncol, figsize=(0.9 * ncol, 0.95 * len(images) + 0.3), squeeze=False)
    for i in range(len(images)):
        _show(axes[i][0], images[i])
        for s, m in enumerate(maps):
            top = m[i].mean(dim=(1, 2)).topk(min(channels, m.shape[1])).indices
            for c, ch in enumerate(top):
                ax = axes[i][1 + s * channels + c]
                _show(ax, m[i, ch].float().numpy())
                if i == 0 and c == 0:
                    ax.set_title(names[s], fontsize=7, loc="left")
    fig.tight_layout()
    return _png(fig)


def tsne(features: torch.Tensor, labels: np.ndarray, classes: list[str], seed: int = 0, split: str = "test") -> bytes:
    """t-SNE (scikit-learn; PCA to 50 dims first) of the embeddings, coloured by label."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _plt()
    x = F.normalize(features.float(), dim=1).numpy()
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (len(x) - 1) / 3)))
    y2 = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    labeled = labels >= 0
    if labeled.any():
        cmap = plt.get_cmap("tab10" if max(labels) < 10 else "tab20")
        for c in np.unique(labels[labeled]):
            m = labels == c
            ax.scatter(y2[m, 0], y2[m, 1], s=5, color=cmap(int(c) % cmap.N),
                       label=classes[c] if c < len(classes) else str(c))
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    else:
        ax.scatter(y2[:, 0], y2[:, 1], s=5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(x)} {split} embeddings", fontsize=9)
    return _png(fig)


def nearest(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int,
            exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, cosine similarities)`` ``(Q, k)`` of each query's ``k`` nearest gallery rows;
    ``exclude[i]`` (a gallery index, or -1) is never among query ``i``'s (the query itself, when the
    queries come from the gallery)."""
    sim = F.normalize(query_feats.float(), dim=1) @ F.normalize(gallery_feats.float(), dim=1).t()
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).flatten()
        sim[rows, exclude[rows]] = -float("inf")
    top = sim.topk(min(k, sim.shape[1] - (1 if exclude is not None else 0)), dim=1)
    return top.indices, top.values


def near_duplicates(feats: torch.Tensor, n: int = 8) -> list[tuple[int, int, float]]:
    """The ``n`` most similar pairs ``(i, j, cosine)`` (i < j) of distinct rows of ``feats``."""
    x = F.normalize(feats.float(), dim=1)
    sim = x @ x.t()
    sim = torch.triu(sim, diagonal=1) - torch.tril(torch.full_like(sim, 4.0))  # each pair once, no self
    top = sim.flatten().topk(min(n, len(x) * (len(x) - 1) // 2))
    return [(int(v) // len(x), int(v) % len(x), float(s)) for v, s in zip(top.indices, top.values)]


def outliers(feats: torch.Tensor, n: int = 16, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, scores)`` of the ``n`` rows least like the others: the lowest mean cosine to their
    ``k`` nearest other rows."""
    x = F.normalize(feats.float(), dim=1)
    sim = x @ x.t()
    sim.fill_diagonal_(-float("inf"))
    density = sim.topk(min(k, len(x) - 1), dim=1).values.mean(1)
    low = density.topk(min(n, len(x)), largest=False)
    return low.indices, low.values


def neighbours(query_images: np.ndarray, query_feats: torch.Tensor, query_labels: np.ndarray,
               gallery_images: np.ndarray, gallery_feats: torch.Tensor, gallery_labels: np.ndarray, k: int = 8,
               exclude: torch.Tensor | None = None, title: str | None = None) -> bytes:
    """Each row: a query, then its ``k`` nearest gallery images by cosine similarity (a red title marks
    a neighbour of another class); ``exclude``: see :func:`nearest`."""
    plt = _plt()
    idx_all, sims = nearest(query_feats, gallery_feats, k, exclude)
    fig, axes = plt.subplots(len(query_images), idx_all.shape[1] + 1,
                             figsize=(1.2 * (idx_all.shape[1] + 1), 1.25 * len(query_images) + 0.3), squeeze=False)
    for i in range(len(query_images)):
        _show(axes[i][0], query_images[i])
        axes[i][0].set_title("query", fontsize=7)
        for j, (idx, s) in enumerate(zip(idx_all[i].tolist(), sims[i].tolist())):
            ax = axes[i][j + 1]
            _show(ax, gallery_images[idx])
            same = query_labels[i] < 0 or gallery_labels[idx] == query_labels[i]
            ax.set_title(f"{s:.2f}", fontsize=7, color="black" if same else "red")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def image_rows(rows: list[np.ndarray], titles: list[str], col_titles: list[list[str]] | None = None,
               title: str | None = None) -> bytes:
    """Rows of uint8 NHWC images, a title per row (left) and optional per-image titles."""
    plt = _plt()
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.1 * ncol + 1.0, 1.2 * len(rows) + 0.3), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            if j < len(r):
                _show(ax, r[j])
                if col_titles:
                    ax.set_title(col_titles[i][j], fontsize=6)
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(titles[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _png(fig)

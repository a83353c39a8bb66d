"""``report.html`` for one run (and the per-run pictures that ``compare`` lays side by side)."""

from __future__ import annotations

import base64
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data import DataError, load_images
from ..data.views import AugConfig
from ..run import eval_dir, read_metrics, read_results
from . import plots

log = logging.getLogger("selfsup")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:22px} h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 14px} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f3f3f3}
img{max-width:100%;height:auto} .muted{color:#777;font-size:12px}
.row{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start} .row>div{flex:1 1 0;min-width:260px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="muted">({html.escape(alt)}: nothing to show)</p>'
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def eval_tables(run_dir: Path) -> str:
    """HTML tables of every evaluation json of the run."""
    results = read_results(eval_dir(run_dir)) if eval_dir(run_dir).is_dir() else {}
    if not results:
        return '<p class="muted">No evaluations yet: run <code>selfsup evaluate RUN_DIR --protocol ...</code>.</p>'
    rows, extra = [], []
    for name, r in results.items():
        detail = {k: r[k] for k in ("k", "weight_decay", "fraction", "n_labeled", "map", "clean_top1", "best_layer",
                                    "mask_rate", "pixel_acc", "finetune") if k in r}
        rows.append([name, float(r["top1"]), r.get("n_train", ""), r.get("n_test", ""),
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())])
        if "layers" in r:
            extra.append("<h3>Layer-wise linear probes</h3>" + table(
                ["stage", "features", "top-1"], [[n, v["dim"], float(v["top1"])] for n, v in r["layers"].items()]))
        if "per_severity" in r:
            sev = ["1", "2", "3", "4", "5"]
            extra.append("<h3>Robustness: linear probe top-1 per corruption and severity</h3>" + table(
                ["corruption", *sev, "mean"],
                [[n, *[float(v[s]) for s in sev], float(r["corruptions"][n])] for n, v in r["per_severity"].items()]))
        if "per_class_iou" in r:
            extra.append(f"<h3>Segmentation ({html.escape(name)}): IoU per class</h3>" + table(
                ["class", "IoU"], [[c, "-" if v is None else float(v)] for c, v in r["per_class_iou"].items()]))
        picture = eval_dir(run_dir) / f"{name}.png"
        if picture.exists():  # e.g. segment.png: test frames, ground truth and prediction
            extra.append(f"<h3>{html.escape(name)}</h3>" + img_tag(picture.read_bytes(), name))
    return table(["protocol", "top-1", "train", "test", "details"], rows) + "".join(extra)


@dataclass
class RunPictures:
    """Everything drawn for one run (PNG bytes or None)."""

    name: str
    method: str = ""
    config: dict = field(default_factory=dict)
    metrics: list[dict[str, str]] = field(default_factory=list)
    views: bytes | None = None
    filters: bytes | None = None
    maps: bytes | None = None
    tsne: bytes | None = None
    neighbours: bytes | None = None
    clusters: bytes | None = None
    duplicates: bytes | None = None
    outliers: bytes | None = None
    query_split: str = "test"
    gallery_split: str = "train"
    method_figures: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _pick(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` indices spread over the classes (or random when unlabeled), sorted."""
    rng = np.random.default_rng(seed)
    if len(labels) <= n:
        return np.arange(len(labels))
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        return np.sort(rng.choice(len(labels), n, replace=False))
    per = max(1, n // len(classes))
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(idx))


def _load_split(spec: str, split: str, size: int):
    try:
        return load_images(spec, split=split, image_size=size, progress=False)
    except DataError:
        return None


def draw_run(run_dir: str | Path, data: str | None = None, device: str = "auto", max_points: int = 1000,
             seed: int = 0) -> RunPictures:
    """Draw the pictures of one run. ``data``: a labeled folder/dataset for the embedding pictures
    (test split as queries, train split as gallery); default: the run's own training data."""
    from ..evaluate.features import extract_features
    from ..run import load_encoder
    from ..runtime import resolve_device

    run_dir = Path(run_dir)
    pics = RunPictures(name=run_dir.name)
    pics.metrics = read_metrics(run_dir, missing_ok=True)
    shown_with_results = {f.stem for f in eval_dir(run_dir).glob("*.png")} if eval_dir(run_dir).is_dir() else set()
    for f in sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []:
        if f.stem not in shown_with_results:  # e.g. segment.png: drawn once, beside its scores
            pics.method_figures.append((f.stem, f.read_bytes()))
    if not (run_dir / "checkpoints" / "last.pt").exists():
        pics.notes.append("no checkpoint in this directory (an evaluation-only or baseline directory)")
        return pics
    import yaml

    pics.config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    pics.method = pics.config.get("method", "")
    enc = load_encoder(str(run_dir))
    size = enc.spec["image_size"]
    spec = data or pics.config.get("data", {}).get("path")
    if not spec:
        pics.notes.append("no data to draw embeddings with (pass --data)")
        return pics
    gallery = _load_split(spec, "train", size) or _load_split(spec, pics.config.get("data", {}).get("split", "train"), size)
    queries = _load_split(spec, "test", size)
    pics.query_split = "test"
    if queries is None or (gallery is not None and queries.source == gallery.source):
        queries, pics.query_split = gallery, pics.gallery_split  # one split: queries from the gallery itself
    if gallery is None:
        pics.notes.append(f"could not load {spec} for the embedding pictures")
        return pics
    dev = resolve_device(device)
    sample = gallery.images[_pick(gallery.labels, 6, seed)[:6]]
    aug = AugConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pics.config.get("aug", {}).items()})
    pics.views = plots.augmentation_views(np.asarray(sample[:4]), aug, seed=seed)
    pics.filters = plots.first_layer_filters(enc.backbone)
    view = AugConfig(size=size, mean=enc.mean, std=enc.std)
    pics.maps = plots.feature_maps(enc.backbone.cpu(), np.asarray(sample[:4]), view, enc.input_mode)
    qi = _pick(queries.labels, max_points, seed)
    qf = extract_features(enc, queries.images[qi], dev)
    qy = queries.labels[qi]
    pics.tsne = plots.tsne(qf, qy, queries.classes, seed, split=pics.query_split)
    gi = _pick(gallery.labels, 5000, seed + 1)
    gf = extract_features(enc, gallery.images[gi], dev)
    show = _pick(qy, 6, seed + 2)[:6]
    exclude = None
    if queries is gallery:  # a query is never its own neighbour
        where = {int(g): j for j, g in enumerate(gi)}
        exclude = torch.tensor([where.get(int(qi[i]), -1) for i in show])
    gimg = np.asarray(gallery.images[gi])
    pics.neighbours = plots.neighbours(np.asarray(queries.images[qi][show]), qf[show], qy[show], gimg, gf,
                                       gallery.labels[gi], exclude=exclude,
                                       title=f"queries from the {pics.query_split} split, their nearest "
                                             f"{pics.gallery_split} images (the query itself excluded)")
    collection_pictures(pics, gimg, gf, seed)
    return pics


def collection_pictures(pics: RunPictures, images: np.ndarray, feats: torch.Tensor, seed: int = 0,
                        clusters: int = 8, per_cluster: int = 8) -> None:
    """What a collection holds, without labels: k-means clusters of the embeddings (each row: the
    images nearest one centroid), the most similar pairs (near-duplicates) and the images least like
    any other (outliers)."""
    from ..cluster import kmeans

    if len(images) < 4:
        return
    x = torch.nn.functional.normalize(feats.float(), dim=1)
    k = min(clusters, len(x))
    centroids, assign = kmeans(x, k, iters=20, generator=torch.Generator().manual_seed(seed))
    rows, titles = [], []
    for c in range(k):
        members = torch.nonzero(assign == c).flatten()
        if len(members) == 0:
            continue
        d = (x[members] - centroids[c]).pow(2).sum(1)
        rows.append(images[members[d.argsort()[:per_cluster]].numpy()])
        titles.append(f"cluster {c + 1}\n{len(members)} images")
    pics.clusters = plots.image_rows(rows, titles, title=f"k-means ({k} clusters) of {len(x)} {pics.gallery_split} "
                                                            f"embeddings: the images nearest each centre")
    pairs = plots.near_duplicates(x, 8)
    pics.duplicates = plots.image_rows(
        [images[[i for i, _, _ in pairs]], images[[j for _, j, _ in pairs]]], ["image", "its twin"],
        [[f"{s:.3f}" for _, _, s in pairs]] * 2, title="near-duplicates: the most similar pairs (cosine)")
    idx, score = plots.outliers(x, 16)
    halves = [h for h in (slice(0, 8), slice(8, 16)) if len(idx[h])]
    pics.outliers = plots.image_rows([images[idx[h].numpy()] for h in halves], [""] * len(halves),
                                     [[f"{float(v):.2f}" for v in score[h]] for h in halves],
                                     title="outliers: the lowest mean cosine to their 10 nearest other images")


def run_sections(p: RunPictures, run_dir: Path) -> str:
    cfg = p.config
    parts = [f"<h1>selfsup report: {html.escape(p.name)}</h1>"]
    if cfg:
        t = cfg.get("train", {})
        parts.append(f'<p>method <b>{html.escape(p.method)}</b>, backbone {html.escape(str(cfg.get("model", {}).get("backbone")))}, '
                     f'{cfg.get("data", {}).get("image_size")} px, {t.get("epochs")} epochs x batch {t.get("batch_size")}, '
                     f'data <code>{html.escape(str(cfg.get("data", {}).get("path")))}</code></p>')
    for n in p.notes:
        parts.append(f'<p class="muted">{html.escape(n)}</p>')
    parts.append("<h2>Evaluation</h2>" + eval_tables(run_dir))
    health = ["feat_std", "rankme"]
    if p.metrics:
        keys = [k for k in p.metrics[0] if k not in plots.SKIP and k not in health]
        parts.append("<h2>Training curves</h2>" + img_tag(plots.curves({p.name: p.metrics}, keys), "training curves"))
        parts.append("<h2>Label-free health</h2><p class=\"muted\">Per-dimension std of the normalised embeddings "
                     "(collapse when it goes to 0) and effective rank (RankMe), every epoch.</p>"
                     + img_tag(plots.curves({p.name: p.metrics}, health), "health curves"))
    if p.method_figures:
        parts.append("<h2>The method's own task</h2>" + "".join(
            f"<h3>{html.escape(n)}</h3>{img_tag(b, n)}" for n, b in p.method_figures))
    for title, png in (("Augmentation views", p.views), ("First-layer filters", p.filters),
                       ("Feature maps (most active channels per stage)", p.maps),
                       (f"t-SNE of {p.query_split} embeddings", p.tsne),
                       (f"Nearest neighbours (cosine, {p.gallery_split} images)", p.neighbours),
                       ("Clusters of the collection (k-means, no labels)", p.clusters),
                       ("Near-duplicates", p.duplicates), ("Outliers", p.outliers)):
        if png is not None:
            parts.append(f"<h2>{title}</h2>{img_tag(png, title)}")
    return "\n".join(parts)


def write_report(run_dir: str | Path, data: str | None = None, out: str | Path | None = None,
                 device: str = "auto") -> Path:
    """Write ``report.html`` (default ``RUN_DIR/report.html``) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory")
    pics = draw_run(run_dir, data, device)
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"selfsup: {pics.name}", run_sections(pics, run_dir)))
    return out


__all__ = ["RunPictures", "draw_run", "write_report", "page", "table", "img_tag", "eval_tables"]

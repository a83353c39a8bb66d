"""``selfsup compare RUN_DIR...``: one table across runs (markdown, CSV, HTML) and the runs side by side."""

from __future__ import annotations

import csv
import html
from pathlib import Path

from ..config import ConfigError
from ..run import read_results
from . import plots
from .html import draw_run, img_tag, page, table


def eval_results(run_dir: str | Path) -> dict[str, float]:
    """``{result name: top1}`` of a run's evaluations (``eval/<protocol>[_<fraction>].json``); a
    directory holding the jsons directly (``selfsup evaluate random:... --out DIR``) works too."""
    return {name: float(r["top1"]) for name, r in read_results(run_dir).items()}


def _order(names: set[str], wanted: list[str] | None) -> list[str]:
    base = ["knn", "linear", "layers", "retrieval", "robustness", "finetune", "pseudolabel", "fixmatch"]

    def key(n: str):
        proto, _, frac = n.partition("_")
        return (base.index(proto) if proto in base else len(base), proto, float(frac) if frac else 0.0)

    cols = sorted(names, key=key)
    if wanted:
        cols = [c for c in cols if c in wanted or c.partition("_")[0] in wanted]
    return cols


def compare(runs: list[str | Path], out: str | Path, protocols: list[str] | None = None, data: str | None = None,
            pictures: bool = True, device: str = "auto") -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv`` and ``compare.html`` into ``out``; returns their paths."""
    runs = [Path(r) for r in runs]
    for r in runs:
        if not r.is_dir():
            raise ConfigError(f"{r} is not a run directory")
    results = {str(r): eval_results(r) for r in runs}
    names = {r.name for r in runs}
    label = {str(r): (r.name if len(names) == len(runs) else str(r)) for r in runs}
    cols = _order(set().union(*[set(v) for v in results.values()]), protocols)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows = [[label[str(r)]] + [results[str(r)].get(c) for c in cols] for r in runs]
    md = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        md.append("| " + " | ".join([row[0]] + ["-" if v is None else f"{v:.4f}" for v in row[1:]]) + " |")
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "html": out / "compare.html"}
    paths["md"].write_text("\n".join(md) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *cols])
        for row in rows:
            w.writerow([row[0]] + ["" if v is None else f"{v:.6f}" for v in row[1:]])

    body = [f"<h1>selfsup: {len(runs)} runs compared</h1>", "<h2>Top-1 by protocol</h2>",
            table(["run", *cols], [[row[0]] + ["-" if v is None else v for v in row[1:]] for row in rows])]
    if pictures:
        pics = [draw_run(r, data, device) for r in runs]
        metrics = {label[str(r)]: p.metrics for r, p in zip(runs, pics) if p.metrics}
        if metrics:
            keys = sorted({k for m in metrics.values() for k in (m[0] if m else {}) if k not in plots.SKIP},
                          key=lambda k: (k != "loss", k))
            body.append("<h2>Training curves and label-free health</h2>" + img_tag(plots.curves(metrics, keys), "curves"))
        for title, attr in (("t-SNE of test embeddings", "tsne"), ("Nearest neighbours", "neighbours"),
                            ("First-layer filters", "filters"), ("Augmentation views", "views")):
            cells = [(label[str(r)], getattr(p, attr)) for r, p in zip(runs, pics) if getattr(p, attr) is not None]
            if cells:
                body.append(f"<h2>{title}</h2><div class=\"row\">" + "".join(
                    f"<div><h3>{html.escape(n)}</h3>{img_tag(b, f'{title}: {n}')}</div>" for n, b in cells) + "</div>")
        own = [(label[str(r)], p.method_figures) for r, p in zip(runs, pics) if p.method_figures]
        if own:
            body.append("<h2>The methods' own tasks</h2><div class=\"row\">" + "".join(
                f"<div><h3>{html.escape(n)}</h3>" + "".join(img_tag(b, f"{n}: {t}") for t, b in figs) + "</div>"
                for n, figs in own) + "</div>")
    paths["html"].write_text(page("selfsup compare", "\n".join(body)))
    return paths

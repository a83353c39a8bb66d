"""Self-contained HTML reports of runs: ``selfsup report RUN_DIR`` and ``selfsup compare RUN_DIR...``.

A report is one ``report.html`` file with every picture embedded as a PNG data URI (no scripts, no
external files), so it can be mailed or opened offline. It shows, for a run:

* training curves (loss, pretext accuracy and the method's other logged scalars, learning rate)
  and the label-free health curves (feature std, RankMe) from ``metrics.csv``;
* the augmentation views of the run's config on a few images;
* the first-layer filters and the feature maps of a few images, stage by stage;
* a t-SNE of test embeddings coloured by label and a nearest-neighbour retrieval grid;
* the method's own pictures (``RUN_DIR/figures/*.png``);
* the evaluation tables (every ``RUN_DIR/eval/*.json``).

``compare`` writes ``compare.md``, ``compare.csv`` and ``compare.html``: one table of top-1 per
protocol across runs (the random-init baseline directories written by ``selfsup evaluate
random:BACKBONE --out DIR`` are accepted as runs), then the runs' curves overlaid and their
pictures side by side.
"""

from __future__ import annotations

from .compare import compare, eval_results
from .html import write_report

__all__ = ["compare", "eval_results", "write_report"]

"""HTML report and comparison: content checks, and a real browser (headless Chromium) loading the page."""

import csv
import json
import re
import shutil
import subprocess

import pytest

from selfsup.cli import main
from selfsup.configure import build_config
from selfsup.evaluate import evaluate
from selfsup.report import compare, eval_results, write_report
from selfsup.train import Trainer

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny rotation run and a tiny SimCLR run with kNN results, and a random-init baseline dir."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("rep")
    data = root / "data"
    make_folder(data / "train", 8, size=16, seed=0)
    make_folder(data / "test", 4, size=16, seed=1)
    out = {"data": data}
    for method in ("rotation", "simclr"):
        cfg = build_config(method, {"model": {"backbone": "convnet"}, "data": {"path": str(data / "train"),
                           "image_size": 16, "cache_dir": str(root / "cache")},
                           "train": {"epochs": 2, "batch_size": 8, "log_every": 1, "ckpt_every": 1000}})
        Trainer(cfg, root / method, progress=False).fit()
        evaluate(str(root / method), "knn", str(data), str(data), progress=False, cache_dir=str(root / "cache"))
        out[method] = root / method
    evaluate("random:convnet", "knn", str(data), str(data), out=root / "random", image_size=16, progress=False,
             cache_dir=str(root / "cache"))
    out["random"] = root / "random"
    return out


def test_report_holds_every_section_with_embedded_images(runs, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE", str(runs["rotation"].parent / "cache"))
    path = write_report(runs["rotation"], data=str(runs["data"]))
    text = path.read_text()
    for section in ("Evaluation", "Training curves", "Label-free health", "Augmentation views", "First-layer filters",
                    "Feature maps", "t-SNE", "Nearest neighbours"):
        assert f"<h2>{section}" in text, section
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) >= 7
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    knn = json.loads((runs["rotation"] / "eval" / "knn.json").read_text())["top1"]
    assert f"{knn:.4f}" in text


def test_compare_writes_one_table_in_three_formats(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFSUP_CACHE", str(runs["rotation"].parent / "cache"))
    assert eval_results(runs["random"]) == {"knn": json.loads((runs["random"] / "knn.json").read_text())["top1"]}
    paths = compare([runs["rotation"], runs["simclr"], runs["random"]], tmp_path / "cmp", data=str(runs["data"]))
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["run"] for r in rows] == ["rotation", "simclr", "random"]
    for r, name in zip(rows, ("rotation", "simclr", "random")):
        folder = runs[name] / "eval" if name != "random" else runs[name]
        assert float(r["knn"]) == pytest.approx(json.loads((folder / "knn.json").read_text())["top1"], abs=1e-6)
    md = paths["md"].read_text().splitlines()
    assert md[0] == "| run | knn |" and len(md) == 5
    html_text = paths["html"].read_text()
    assert html_text.count("<h3>rotation</h3>") >= 2 and "<h3>simclr</h3>" in html_text
    assert main(["compare", str(runs["rotation"]), str(runs["random"]), "--out", str(tmp_path / "c2"),
                 "--no-pictures"]) == 0
    assert "| rotation |" in capsys.readouterr().out


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium; "
                                             ".ci/run installs it): the browser test of the report is skipped")
def test_report_loads_in_headless_chromium_without_errors(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE", str(runs["rotation"].parent / "cache"))
    report = write_report(runs["rotation"], data=str(runs["data"]), out=tmp_path / "report.html")
    probe = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && e.target.alt))), true);
const __ce = console.error; console.error = (...a) => { window.__errors.push('console: ' + a.join(' ')); __ce(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const pre = document.createElement('pre'); pre.id = '__probe';
  pre.textContent = JSON.stringify({images: imgs.length, bad: bad, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("<head>", "<head>" + probe, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--enable-logging=stderr", "--v=0"]
    r = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="__probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the page did not finish loading in chromium:\n{r.stderr[-2000:]}"
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["images"] >= 7 and result["bad"] == [] and result["errors"] == [], result
    assert "Uncaught" not in r.stderr and "CONSOLE(" not in r.stderr, r.stderr[-2000:]  # nothing logged to the console
    shot = tmp_path / "report.png"  # (kept in the test's tmp dir for a look)
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                   capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_neighbours_duplicates_and_outliers_by_hand():
    import torch

    from selfsup.report.plots import near_duplicates, nearest, outliers

    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, generator=g)
    feats = base + 0.3 * torch.randn(20, 8, generator=g)  # a crowd around one direction
    feats[7] = feats[3] * 2.0  # a planted near-duplicate (same direction)
    odd = torch.randn(8, generator=g)
    feats[12] = odd - (odd @ base) / (base @ base) * base  # orthogonal to the crowd: the outlier
    idx, sims = nearest(feats[:5], feats, 3, exclude=torch.arange(5))  # the queries are gallery rows 0-4
    assert not any(int(i) in idx[i].tolist() for i in range(5))  # never its own neighbour
    assert int(idx[3, 0]) == 7 and float(sims[3, 0]) == pytest.approx(1.0, abs=1e-5)
    assert near_duplicates(feats, 1)[0][:2] == (3, 7)
    out, _ = outliers(feats, 1, k=3)
    assert int(out[0]) == 12


def test_report_of_an_unlabeled_collection(tmp_path, monkeypatch):
    """A flat folder (no classes, no test split): queries come from the collection itself and are never
    their own neighbour, and the report shows its clusters, near-duplicates and outliers."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.png")
    cfg = build_config("rotation", {"model": {"backbone": "convnet"}, "data": {"path": str(photos), "image_size": 16},
                                    "train": {"epochs": 1, "batch_size": 8}})
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    text = write_report(tmp_path / "run").read_text()
    for section in ("Clusters of the collection", "Near-duplicates", "Outliers", "t-SNE of train embeddings",
                    "Nearest neighbours (cosine, train images)"):
        assert f"<h2>{section}" in text, section

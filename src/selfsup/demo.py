"""``selfsup demo``: the whole pipeline in a few minutes, offline.

Pretrains rotation and SimCLR briefly on the training split of the data (labels unused), then
evaluates them, the random-init baseline and raw pixels with kNN and a linear probe trained on 10
labels per class, and prints a table. Default data: the embedded ``digits`` (scikit-learn's 8x8
digits, upsampled to 32 px). Digits are easy (raw pixels already give ~96% kNN with all labels), so
the demo shows the pipeline working, not the value of pretraining: for that, see the CIFAR-10
table in the README.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import ConfigError
from .configure import build_config
from .data import load_images
from .evaluate import balanced_subset, extract_features, knn_top1, linear_probe, load_encoder
from .train import pretrain

LABELS_PER_CLASS = 10
KNN_K = 20  # with only 10 labels per class, 200 neighbours would be the whole labeled set

# Budgets sized so the demo finishes in well under 3 minutes on a 2-core CPU.
DEMO_RUNS = {
    "rotation": {"train": {"epochs": 8, "batch_size": 128}},  # 4 rotations per image: 4x the images
    "simclr": {"train": {"epochs": 15, "batch_size": 128}, "optim": {"warmup_epochs": 1}},
}


def run_demo(data: str | None = None, out: str | Path = "runs/demo", epochs: int | None = None,
             device: str = "auto", progress: bool = True, image_size: int = 32, backbone: str = "convnet") -> list[dict]:
    out = Path(out)
    held = [out / m for m in DEMO_RUNS if (out / m).exists() and any((out / m).iterdir())]
    if held:  # never delete or overwrite a run this call did not make
        raise ConfigError(f"{', '.join(map(str, held))} already exist{'s' if len(held) == 1 else ''} (an earlier "
                          f"demo's runs, or yours; its table is in {out / 'results.md'} if it finished): "
                          f"choose another --out, or delete {'it' if len(held) == 1 else 'them'} to start over")
    spec = data or "digits"
    train = load_images(spec, "train", image_size, progress=progress)
    test = load_images(spec, "test", image_size, progress=progress)
    print(f"demo data: {train.source} ({len(train)} train / {len(test)} test images, {train.num_classes} classes); "
          f"backbone {backbone}, {image_size} px")

    runs: dict[str, str] = {"random init": f"random:{backbone}"}
    times: dict[str, float] = {}
    for method, budget in DEMO_RUNS.items():
        overrides = {**budget, "model": {"backbone": backbone}, "train": {**budget["train"], "device": device},
                     "data": {"path": spec, "image_size": image_size}}
        if epochs is not None:
            overrides["train"]["epochs"] = epochs
        cfg = build_config(method, overrides)
        run_dir = out / method
        t0 = time.perf_counter()
        pretrain(cfg, run_dir, progress=progress, data=train)
        times[method] = time.perf_counter() - t0
        runs[method] = str(run_dir)

    sub = train.subset(balanced_subset(train.labels, LABELS_PER_CLASS))
    ytr, yte = torch.from_numpy(sub.labels).long(), torch.from_numpy(test.labels).long()
    nc = train.num_classes
    rows = []

    def score(name: str, ftr: torch.Tensor, fte: torch.Tensor) -> None:
        rows.append({"model": name, "knn": knn_top1(ftr, ytr, fte, yte, nc, k=KNN_K),
                     "linear": linear_probe(ftr, ytr, fte, yte, nc)["top1"],
                     "pretrain_s": round(times.get(name, 0.0), 1)})

    pix = lambda x: torch.from_numpy(x.reshape(len(x), -1).astype("float32") / 255)  # noqa: E731
    score("raw pixels", pix(sub.images), pix(test.images))
    for name, run in runs.items():
        enc = load_encoder(run, image_size=image_size)
        score(name, extract_features(enc, sub.images, device), extract_features(enc, test.images, device))

    lines = [f"Top-1 on {len(test)} test images; kNN (k={KNN_K}) and linear probe trained on "
             f"{LABELS_PER_CLASS} labels per class ({len(sub)} labeled images).",
             "", "| model | kNN top-1 | linear top-1 | pretraining (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['knn']:.3f} | {r['linear']:.3f} | {r['pretrain_s'] or '-'} |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    if data is None:
        print("Digits are easy (raw pixels already do well): this shows the pipeline working, not the value of\n"
              "pretraining. The README's CIFAR-10 table shows that.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    from .report import write_report

    report = write_report(out / "simclr", data=spec, device=device)
    print(f"runs and results in {out}/ ; the SimCLR run's report: {report}")
    print("next: selfsup pretrain --method simclr --data YOUR_IMAGES")
    return rows

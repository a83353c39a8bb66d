"""Downstream evaluation of frozen backbones.

``evaluate(run, protocol, train, test)`` embeds the labeled ``train`` and ``test`` data with the
run's backbone (or ``random:BACKBONE``, the untrained baseline), runs the protocol and writes
``<out>/<protocol>.json`` (default ``RUN_DIR/eval/``) holding at least ``{"top1": ...}``.

Protocols:

* ``knn``: weighted kNN (k=200, T=0.1) on pooled features (``knn.py``).
* ``linear``: linear probe on standardised pooled features, weight decay chosen on a validation
  split of train (``linear.py``).
* ``layers``: one linear probe per stage of the backbone on its pooled map (the survey's
  conv1..conv5 tables); ``top1`` is the best stage's, ``layers`` holds every stage's.
* ``retrieval``: test images query the training images; precision@k and mAP by label
  (``retrieval.py``); ``top1`` is precision@1.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data import CachedImages, load_images
from .features import Encoder, extract_features, load_encoder
from .knn import knn_predict, knn_top1
from .features import extract_stage_features
from .linear import linear_probe
from .retrieval import retrieval_scores

PROTOCOLS = ("knn", "linear", "layers", "retrieval")
log = logging.getLogger("selfsup")


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` samples of every class, drawn with a fixed seed (sorted)."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        idx.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)


def _labeled(spec: str, split: str, image_size: int, cache_dir: str | None, progress: bool) -> CachedImages:
    data = load_images(spec, split=split, image_size=image_size, cache_dir=cache_dir, progress=progress)
    if data.num_classes == 0 or (data.labels < 0).all():
        raise ConfigError(f"{spec} ({split}) has no labels; evaluation needs a labeled folder "
                          f"(one sub-folder per class) or a labeled dataset")
    return data


def evaluate(run: str, protocol: str, train: str, test: str, out: str | Path | None = None,
             labels_per_class: int | None = None, image_size: int | None = None, k: int = 200,
             temperature: float = 0.1, device: str = "auto", seed: int = 0, cache_dir: str | None = None,
             progress: bool = True, encoder: Encoder | None = None) -> dict:
    """Run one protocol and write its json; returns the result dict."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    if out is None:
        if run.startswith("random:"):
            raise ConfigError("for a random:BACKBONE baseline, say where the result goes with --out DIR")
        out = Path(run) / "eval"
    t0 = time.perf_counter()
    encoder = encoder or load_encoder(run, image_size=image_size, seed=seed)
    size = encoder.spec["image_size"]
    tr = _labeled(train, "train", size, cache_dir, progress)
    te = _labeled(test, "test", size, cache_dir, progress)
    if labels_per_class:
        tr = tr.subset(balanced_subset(tr.labels, labels_per_class, seed))
    if tr.classes != te.classes:
        log.warning("train and test class lists differ: %s vs %s", tr.classes, te.classes)
    num_classes = max(tr.num_classes, te.num_classes)
    ytr, yte = torch.from_numpy(tr.labels).long(), torch.from_numpy(te.labels).long()
    result = {"protocol": protocol, "run": run, "train": train, "test": test, "n_train": len(tr),
              "n_test": len(te), "num_classes": num_classes, "labels_per_class": labels_per_class,
              "backbone": encoder.spec}
    if protocol == "layers":
        str_, ste = extract_stage_features(encoder, tr.images, device), extract_stage_features(encoder, te.images, device)
        layers = {}
        for name in str_:
            r = linear_probe(str_[name], ytr, ste[name], yte, num_classes, epochs=30, seed=seed)
            layers[name] = {"top1": r["top1"], "dim": int(str_[name].shape[1]), "weight_decay": r["weight_decay"]}
            log.info("layers: %s (%d features) top-1 %.4f", name, layers[name]["dim"], r["top1"])
        best = max(layers, key=lambda n: layers[n]["top1"])
        result.update(top1=layers[best]["top1"], best_layer=best, layers=layers)
    else:
        ftr = extract_features(encoder, tr.images, device)
        fte = extract_features(encoder, te.images, device)
        if protocol == "knn":
            result.update(top1=knn_top1(ftr, ytr, fte, yte, num_classes, k, temperature), k=k,
                          temperature=temperature)
        elif protocol == "linear":
            result.update(linear_probe(ftr, ytr, fte, yte, num_classes, seed=seed))
        else:
            r = retrieval_scores(ftr, ytr, fte, yte)
            result.update(top1=r["precision@1"], **r)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{protocol}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


__all__ = ["PROTOCOLS", "Encoder", "balanced_subset", "evaluate", "extract_features", "extract_stage_features",
           "knn_predict", "knn_top1", "linear_probe", "load_encoder", "retrieval_scores"]

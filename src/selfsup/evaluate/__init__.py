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
* ``robustness``: the clean linear probe on corrupted test images, 10 corruptions x 5 severities
  (``corruptions.py``, ``robustness.py``); ``top1`` is the mean corrupted accuracy.

Protocols that train the backbone, on a class-balanced ``fraction`` of the training labels
(:func:`fraction_subset`: the same subset for every method and call); they write
``<out>/<protocol>_<fraction>.json`` (e.g. ``finetune_0.01.json``) with ``top1``, ``fraction``,
``n_labeled``, ``epochs``, ``steps``, ``seconds``:

* ``finetune``: backbone + linear head fine-tuned on the labeled fraction (``finetune.py``);
  ``random:BACKBONE`` with fraction 1 is the supervised-from-scratch baseline.
* ``pseudolabel``: Pseudo-Label (Lee 2013) with the rest of the training set as unlabeled images
  (``semi.py``).
* ``fixmatch``: FixMatch (Sohn et al. 2020), likewise; also reports the mask rate and the
  pseudo-labels' accuracy (from the true labels, for logging only) (``semi.py``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data import CachedImages, default_test_split, load_images
from ..data.views import AugConfig
from ..run import eval_dir, write_result
from ..runtime import resolve_device
from .classifier import class_scores, classifier_path, load_classifier, predict_folder, save_classifier
from .features import Encoder, cached_features, extract_features, fit_random_from_data, load_encoder, precise_bn
from .knn import knn_predict, knn_top1
from .features import extract_stage_features
from .linear import linear_probe
from .retrieval import retrieval_scores
from .semi import PROTOCOLS as FRACTION_PROTOCOLS
from .semi import fraction_protocol

PROTOCOLS = ("knn", "linear", "layers", "retrieval", "robustness") + FRACTION_PROTOCOLS + ("segment",)
ROBUSTNESS_MAX_TEST = 2000  # test images per corruption and severity (class-balanced, fixed seed)
log = logging.getLogger("selfsup")


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` samples of every class, drawn with a fixed seed (sorted)."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        idx.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)


def fraction_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a class-balanced ``fraction`` of the labeled samples: of every class,
    ``round(fraction * its count)`` (half up, at least 1) drawn with a fixed seed. The draw depends
    only on the labels and the seed, so every method gets the same subset, and a smaller fraction's
    subset is contained in a larger one's."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(labels[labels >= 0]):
        members = rng.permutation(np.flatnonzero(labels == c))
        idx.append(members[:max(1, int(np.floor(fraction * len(members) + 0.5)))])
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)


def result_name(protocol: str, fraction: float | None = None) -> str:
    """The json file a protocol writes: ``<protocol>.json``, ``<protocol>_<fraction>.json`` for the
    fraction protocols."""
    if protocol in FRACTION_PROTOCOLS:
        return f"{protocol}_{1.0 if fraction is None else fraction:g}.json"
    return f"{protocol}.json"


def holdout_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded split of one labeled set: ``(train_idx, test_idx)``, sorted and disjoint; of
    every class ``round(fraction * its count)`` (half up, at least 1, at most all but 1 when the class
    has 2 or more) go to test, the other labeled samples to train (unlabeled ones to neither). The draw
    depends only on the labels and the seed, and is independent of :func:`fraction_subset`'s."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0x7E57])  # its own stream: not the labeled-fraction draw
    train, test = [], []
    for c in np.unique(labels[labels >= 0]):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = min(max(1, int(np.floor(fraction * len(members) + 0.5))), max(1, len(members) - 1))
        test.append(members[:n])
        train.append(members[n:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(train)) if train else empty, np.sort(np.concatenate(test)) if test else empty)


def _labeled(spec: str, split: str, image_size: int, cache_dir: str | None, progress: bool) -> CachedImages:
    data = load_images(spec, split=split, image_size=image_size, cache_dir=cache_dir, progress=progress)
    if data.num_classes == 0 or (data.labels < 0).all():
        raise ConfigError(f"{spec} ({split}) has no labels; evaluation needs a labeled folder "
                          f"(one sub-folder per class) or a labeled dataset")
    return data


def evaluate(run: str | Path, protocol: str, train: str | Path, test: str | Path | None = None,
             out: str | Path | None = None,
             labels_per_class: int | None = None, image_size: int | None = None, k: int = 200,
             temperature: float = 0.1, device: str = "auto", seed: int = 0, cache_dir: str | None = None,
             progress: bool = True, encoder: Encoder | None = None, fraction: float | None = None,
             epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
             mu: int | None = None, threshold: float | None = None, steps: int | None = None,
             precise_bn_stats: bool = True, test_split: str | None = None,
             test_fraction: float | None = None, finetune: bool = False, ignore_index: int | None = None) -> dict:
    """Run one protocol and write its json; returns the result dict. ``fraction`` (default 1),
    ``epochs`` or ``steps``, ``batch_size``, ``lr`` and, for the semi-supervised ones, ``mu`` and ``threshold``
    (fixmatch) apply to the fraction protocols; None keeps their defaults (``finetune.py``, ``semi.py``).

    Frozen protocols first re-estimate the backbone's BatchNorm statistics on the evaluation views of
    the training images (:func:`selfsup.evaluate.features.precise_bn`; no labels), recorded as
    ``precise_bn`` (images used) in the json; ``precise_bn_stats=False`` keeps the checkpoint's.

    Data: the ``train`` split of ``train`` (a folder's ``train/``, or the whole folder when it has no
    split sub-folders) against ``test``'s ``test_split``, by default its ``test`` split, else ``val``
    (:func:`selfsup.data.default_test_split`); or, with ``test_fraction`` and no other ``test``, a
    stratified seeded hold-out of ``train``'s own labeled images (:func:`holdout_split`). Training
    images are never tested on: the same folder as both is refused."""
    run, train = str(run), str(train)  # Paths (what selfsup.pretrain returns) or strs
    test = None if test is None else str(test)
    if test_fraction is not None and test not in (None, train):
        raise ConfigError("--test-fraction holds out part of --train's images as the test set; give no other --test")
    if test_fraction is None and test is None:
        raise ConfigError("evaluation needs test images: --test PATH (its test/ or val/ split, or the whole folder), "
                          "or --test-fraction F to hold out a stratified part of --train's images")
    if test_fraction is not None and test_split is not None:
        raise ConfigError("--test-split names a split of --test; --test-fraction takes the test images from --train")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    if protocol in FRACTION_PROTOCOLS:
        fraction = 1.0 if fraction is None else float(fraction)
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {fraction}")
        if labels_per_class:
            raise ConfigError(f"{protocol} takes --fraction, not --labels-per-class")
        if protocol != "fixmatch" and threshold is not None:
            raise ConfigError("--threshold applies to fixmatch only")
        if protocol == "finetune" and mu is not None:
            raise ConfigError("--mu applies to pseudolabel and fixmatch only")
        if steps is not None and steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {steps}")
    elif protocol == "segment":
        if any(v is not None for v in (fraction, steps, mu, threshold, labels_per_class, test_fraction)):
            raise ConfigError("segment takes --epochs, --lr, --batch-size, --finetune and --ignore-index, not "
                              "--fraction/--steps/--mu/--threshold/--labels-per-class/--test-fraction")
    elif any(v is not None for v in (fraction, epochs, steps, batch_size, lr, mu, threshold)):
        raise ConfigError(f"--fraction/--epochs/--steps/--batch-size/--lr/--mu/--threshold apply to the "
                          f"{', '.join(FRACTION_PROTOCOLS)} protocols (and --epochs/--lr/--batch-size to segment), "
                          f"not {protocol}")
    if protocol != "segment" and (finetune or ignore_index is not None):
        raise ConfigError("--finetune and --ignore-index apply to the segment protocol")
    if out is None:
        if run.startswith(("random:", "pretrained:")):
            raise ConfigError(f"for a {run.split(':', 1)[0]}:BACKBONE baseline, say where the result goes with --out DIR")
        out = eval_dir(run)
    t0 = time.perf_counter()
    encoder = encoder or load_encoder(run, image_size=image_size, seed=seed)
    size = encoder.spec["image_size"]
    if protocol == "segment":
        return _segment_protocol(encoder, run, train, test, test_split, out, device, seed, finetune, epochs, lr,
                                 batch_size, ignore_index, precise_bn_stats, cache_dir, t0)
    if test_fraction is not None:
        full = _labeled(train, "train", size, cache_dir, progress)
        tr_idx, te_idx = holdout_split(full.labels, test_fraction, seed)
        tr, te = full.subset(tr_idx), full.subset(te_idx)
        test, test_split = train, f"{test_fraction:g} held out of train (stratified, seed {seed})"
    else:
        test_split = test_split or default_test_split(test)
        tr = _labeled(train, "train", size, cache_dir, progress)
        te = _labeled(test, test_split, size, cache_dir, progress)
        if te.source == tr.source:
            raise ConfigError(f"the test images would be the training images ({tr.source}): give a --test folder "
                              f"with a test/ or val/ split, another folder, or --test-fraction F")
    fit_random_from_data(encoder, tr.images, device)  # e.g. random:airbench's whitening, from these images
    if labels_per_class:
        tr = tr.subset(balanced_subset(tr.labels, labels_per_class, seed))
    if tr.classes != te.classes:
        log.warning("train and test class lists differ: %s vs %s", tr.classes, te.classes)
    num_classes = max(tr.num_classes, te.num_classes)
    class_names = list(tr.classes if tr.num_classes >= te.num_classes else te.classes)
    ytr, yte = torch.from_numpy(tr.labels).long(), torch.from_numpy(te.labels).long()
    result = {"protocol": protocol, "run": run, "train": train, "test": test, "test_split": test_split,
              "n_train": len(tr),
              "n_test": len(te), "num_classes": num_classes, "labels_per_class": labels_per_class,
              "backbone": encoder.spec, "seed": seed}
    if protocol not in FRACTION_PROTOCOLS:
        result["precise_bn"] = precise_bn(encoder, tr.images, device, seed=seed) if precise_bn_stats else 0
        if result["precise_bn"]:
            log.info("BatchNorm statistics re-estimated on %d training images (precise BN)", result["precise_bn"])
    if protocol in FRACTION_PROTOCOLS:
        options = {k: v for k, v in dict(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, mu=mu,
                                         threshold=threshold).items() if v is not None}
        r, model = fraction_protocol(protocol, encoder, tr.images, tr.labels,
                                     fraction_subset(tr.labels, fraction, seed), te.images, te.labels, num_classes,
                                     device=device, seed=seed, classes=class_names, **options)
        result.update(fraction=fraction, **r)
        result["classifier"] = str(save_classifier(classifier_path(out, result_name(protocol, fraction)),
                                                   model.backbone, model.head, class_names, encoder, protocol))
        log.info("%s (fraction %g: %d labels): top-1 %.4f", protocol, fraction, r["n_labeled"], r["top1"])
    elif protocol == "layers":
        str_, ste = extract_stage_features(encoder, tr.images, device), extract_stage_features(encoder, te.images, device)
        layers = {}
        for name in str_:
            r = linear_probe(str_[name], ytr, ste[name], yte, num_classes, epochs=30, seed=seed)
            layers[name] = {"top1": r["top1"], "dim": int(str_[name].shape[1]), "weight_decay": r["weight_decay"]}
            log.info("layers: %s (%d features) top-1 %.4f", name, layers[name]["dim"], r["top1"])
        best = max(layers, key=lambda n: layers[n]["top1"])
        result.update(top1=layers[best]["top1"], best_layer=best, layers=layers)
    else:
        ftr = cached_features(encoder, tr.images, device, cache_dir)
        fte = cached_features(encoder, te.images, device, cache_dir)
        if protocol == "knn":
            pred = knn_predict(ftr, ytr, fte, num_classes, k, temperature)
            result.update(top1=float((pred == yte).float().mean()), k=k, temperature=temperature,
                          **class_scores(pred, yte, class_names))
        elif protocol == "robustness":
            from .robustness import robustness

            idx = np.arange(len(te))
            if len(te) > ROBUSTNESS_MAX_TEST:
                idx = balanced_subset(te.labels, max(1, ROBUSTNESS_MAX_TEST // num_classes), seed)
            result.update(robustness(encoder, ftr, ytr, te.images[idx], yte[torch.from_numpy(idx)], num_classes,
                                     device, seed), n_test=len(idx))
        elif protocol == "linear":
            r, predict = linear_probe(ftr, ytr, fte, yte, num_classes, seed=seed, return_model=True)
            result.update(r, **class_scores(predict(fte).argmax(1), yte, class_names))
            result["classifier"] = str(save_classifier(
                classifier_path(out, result_name(protocol)), encoder.backbone, predict.head, class_names, encoder,
                protocol, predict.mean, predict.std))
        else:
            r = retrieval_scores(ftr, ytr, fte, yte)
            result.update(top1=r["precision@1"], **r)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_result(out, result_name(protocol, fraction)[:-len(".json")], result)
    return result


__all__ = ["PROTOCOLS", "Encoder", "balanced_subset", "evaluate", "fraction_subset", "holdout_split", "result_name",
           "extract_features", "extract_stage_features",
           "knn_predict", "knn_top1", "linear_probe", "load_encoder", "retrieval_scores",
           "class_scores", "load_classifier", "predict_folder", "save_classifier"]


def _segment_protocol(encoder, run, train, test, test_split, out, device, seed, finetune, epochs, lr, batch_size,
                      ignore_index, precise_bn_stats, cache_dir, t0) -> dict:
    """``segment``: a segmentation folder's train split against its test split (else val; see
    :mod:`selfsup.evaluate.segment`); writes ``segment.json`` (``segment_finetune.json`` with
    ``finetune``) and a picture of test frames."""
    from ..data.segmentation import load_segmentation
    from .segment import segment, segmentation_figure

    split = test_split or default_test_split(test)
    tr = load_segmentation(train, "train", ignore_index=ignore_index)
    if os.path.abspath(test) == os.path.abspath(train) and split == "train":
        raise ConfigError(f"{train} has no test/ or val/ split: the test frames would be the training frames; "
                          f"give another --test folder or --test-split")
    fit_random_from_data(encoder, tr.images, device)
    te = load_segmentation(test, split, size=(tr.images.shape[2], tr.images.shape[1]), ignore_index=tr.ignore_index,
                           num_classes=tr.num_classes, classes=tr.classes)
    for data in (tr, te):
        if data.skipped:
            log.warning("segment: skipped %d pair(s) of %s: %s", len(data.skipped), data.source,
                        "; ".join(f"{Path(f).name}: {why}" for f, why in data.skipped[:5]))
    r, backbone, head, size = segment(encoder, tr, te, device, finetune=finetune, epochs=epochs, lr=lr,
                                      batch_size=batch_size or 8, seed=seed, precise_bn_stats=precise_bn_stats,
                                      cache_dir=cache_dir)
    name = "segment_finetune" if finetune else "segment"
    result = {"protocol": "segment", "run": run, "train": train, "test": test, "test_split": split,
              "n_train": len(tr), "n_test": len(te), "num_classes": tr.num_classes, "classes": tr.classes,
              "ignore_index": tr.ignore_index, "image_size": [int(tr.images.shape[2]), int(tr.images.shape[1])],
              "skipped": [list(x) for x in tr.skipped + te.skipped], "backbone": encoder.spec, **r}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    try:
        result["figure"] = str(segmentation_figure(backbone, head, te, view, size, resolve_device(device)
                                                   if isinstance(device, str) else device, encoder.input_mode,
                                                   encoder.precision, out / f"{name}.png"))
        if ":" not in run and (Path(run) / "checkpoints").is_dir():  # a run directory: its figures/ too
            figures = Path(run) / "figures"
            figures.mkdir(exist_ok=True)
            tmp = figures / f".{name}.png.tmp"
            tmp.write_bytes(Path(result["figure"]).read_bytes())
            os.replace(tmp, figures / f"{name}.png")
    except Exception as e:  # noqa: BLE001 - a picture must not lose the scores
        log.warning("could not draw the segmentation figure: %s: %s", type(e).__name__, e)
    log.info("segment: mIoU %.4f, pixel accuracy %.4f", result["miou"], result["pixel_acc"])
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_result(out, name, result)
    return result


class _CallableModule(types.ModuleType):
    """``selfsup.evaluate`` is both this package and the function :func:`evaluate`: once the package is
    imported (as training and the CLI do), Python binds it as the attribute ``selfsup.evaluate``, in
    place of the lazily exported function, so ``selfsup.evaluate(run, ...)`` calls the function here."""

    def __call__(self, *args, **kwargs) -> dict:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

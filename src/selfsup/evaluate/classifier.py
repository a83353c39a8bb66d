"""Kept classifiers and per-class scores.

The protocols that train a classifier keep it: ``linear`` writes ``OUT/linear.classifier.safetensors``
next to ``linear.json``, ``finetune`` / ``pseudolabel`` / ``fixmatch`` write
``OUT/<protocol>_<fraction>.classifier.safetensors``. One file holds everything prediction needs,
so neither the run directory nor selfsup's training code is needed to use it:

* tensors: the backbone as it was evaluated (for the linear probe, with the BatchNorm statistics
  that precise BN re-estimated; for the fine-tuning protocols, the fine-tuned weights), the linear
  head, and the standardisation of the features the probe was trained on (``feat_mean``,
  ``feat_std``; 0 and 1 for the fine-tuned models);
* metadata (json under the key ``selfsup``): the class names (index = label), the backbone spec,
  the input normalisation, precision and input mode, the protocol and the run it came from.

:func:`load_classifier` rebuilds it as a plain ``nn.Module`` (normalised images -> logits);
:func:`predict_folder` (``selfsup predict``) writes a CSV of predictions for a folder of images.

:func:`class_scores` turns a protocol's test predictions into per-class accuracy and a confusion
matrix (rows: true class, columns: predicted), recorded in the results json.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..backbones import build_backbone
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import load_images
from ..data.views import AugConfig
from ..runtime import embed, resolve_device

SUFFIX = ".classifier.safetensors"
CONFUSION_MAX_CLASSES = 100  # above this the json keeps per-class accuracy only (C x C ints)


class SavedClassifier(nn.Module):
    """Normalised images -> class logits: ``head((backbone(x) - feat_mean) / feat_std)``."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)
        self.register_buffer("feat_mean", torch.zeros(backbone.out_dim))
        self.register_buffer("feat_std", torch.ones(backbone.out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x).float()
        return self.head((f - self.feat_mean) / self.feat_std)


def classifier_path(out_dir: str | Path, result_name: str) -> Path:
    """``OUT/linear.classifier.safetensors`` for the result ``linear.json``."""
    return Path(out_dir) / (Path(result_name).stem + SUFFIX)


def save_classifier(path: str | Path, backbone: nn.Module, head: nn.Linear, classes: list[str], encoder,
                    protocol: str, feat_mean: torch.Tensor | None = None,
                    feat_std: torch.Tensor | None = None) -> Path:
    """Write one classifier file (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    path = Path(path)
    model = SavedClassifier(backbone, head.out_features)
    model.head.load_state_dict(head.state_dict())
    if feat_mean is not None:
        model.feat_mean.copy_(torch.as_tensor(feat_mean).reshape(-1))
        model.feat_std.copy_(torch.as_tensor(feat_std).reshape(-1))
    spec = dict(encoder.spec)
    spec.setdefault("input", encoder.input_mode)
    spec.pop("weights", None)  # the tensors below are the evaluated backbone itself
    meta = {"classes": list(classes), "spec": spec, "mean": list(encoder.mean), "std": list(encoder.std),
            "precision": encoder.precision, "input": encoder.input_mode, "protocol": protocol,
            "run": str(encoder.name)}
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"selfsup": json.dumps(meta)})
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def load_classifier(path: str | Path) -> tuple[SavedClassifier, dict]:
    """``(model, meta)`` of a classifier file; the model is in eval mode on the CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no classifier at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("selfsup", "null") or "null")
        if not isinstance(meta, dict) or "classes" not in meta:
            raise ConfigError(f"{path} is not a selfsup classifier (no class names in its metadata)")
        spec = meta["spec"]
        backbone = build_backbone(spec["name"], spec["image_size"], spec["small_stem"], spec.get("in_chans", 3),
                                  spec.get("options"))
        model = SavedClassifier(backbone, len(meta["classes"]))
        model.load_state_dict(load_file(str(path)))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line, not a traceback
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a usable classifier ({type(e).__name__}: {first})") from None
    return model.eval(), meta


def find_classifier(where: str | Path, name: str | None = None) -> Path:
    """The classifier file to predict with: ``where`` is the file itself, or a run / evaluation folder
    (``RUN_DIR`` looks in ``RUN_DIR/eval`` and ``RUN_DIR``); ``name`` picks one by its result name
    (``linear``, ``finetune_0.1``); by default the only one there, or ``linear``."""
    where = Path(where)
    if where.is_file():
        return where
    if not where.is_dir():
        raise ConfigError(f"{where} is neither a classifier file nor a folder")
    found = sorted({p for d in (where / "eval", where) if d.is_dir() for p in d.glob("*" + SUFFIX)})
    if name is not None:
        hits = [p for p in found if p.name == name + SUFFIX or p.name == name]
        if not hits:
            raise ConfigError(f"no classifier '{name}' in {where}; there: "
                              f"{', '.join(p.name[:-len(SUFFIX)] for p in found) or 'none'}")
        return hits[0]
    if not found:
        raise ConfigError(f"no classifier in {where} (nor in {where / 'eval'}): train one with "
                          f"`selfsup evaluate {where} --protocol linear ...` (or finetune)")
    if len(found) == 1:
        return found[0]
    linear = [p for p in found if p.name == "linear" + SUFFIX]
    if linear:
        return linear[0]
    raise ConfigError(f"{where} holds several classifiers ({', '.join(p.name[:-len(SUFFIX)] for p in found)}): "
                      f"pick one with --classifier NAME")


def class_scores(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Per-class top-1 (``{class name: accuracy}``, None for a class absent from the test set) and
    the confusion matrix ``confusion[true][predicted]`` (counts; omitted above
    ``CONFUSION_MAX_CLASSES`` classes)."""
    n = max(len(classes), int(labels.max()) + 1 if len(labels) else 0, int(pred.max()) + 1 if len(pred) else 0)
    keep = labels >= 0
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((labels[keep].long(), pred[keep].long()), torch.ones(int(keep.sum()), dtype=torch.long),
                  accumulate=True)
    names = list(classes) + [str(i) for i in range(len(classes), n)]
    support = cm.sum(1)
    per_class = {names[c]: (round(float(cm[c, c]) / int(support[c]), 4) if support[c] else None) for c in range(n)}
    out: dict = {"per_class_top1": per_class}
    if n <= CONFUSION_MAX_CLASSES:
        out["confusion"] = cm.tolist()
    return out


def predict_folder(classifier: str | Path, data: str, out: str | Path, split: str = "train",
                   device: str = "auto", top_k: int = 5, cache_dir: str | None = None,
                   progress: bool = True) -> dict:
    """Predict every image of ``data`` (its ``split``; a plain folder is split ``train``, the whole
    folder) with a classifier file and write ``out`` (CSV: file, predicted, confidence, the top-k
    classes with their probabilities, and the folder's own label when it has one). Returns a
    summary dict (n, path, and accuracy when the folder's labels match the classifier's classes)."""
    model, meta = load_classifier(classifier)
    classes = meta["classes"]
    spec = meta["spec"]
    dev = resolve_device(device)
    images = load_images(data, split=split, image_size=spec["image_size"], cache_dir=cache_dir, progress=progress)
    view = AugConfig(size=spec["image_size"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    logits = embed(model.to(dev), images.images, view, dev, meta.get("precision", "auto"),
                   input_mode=meta.get("input", "rgb"))
    prob = logits.float().softmax(1)
    k = max(1, min(top_k, len(classes)))
    top_p, top_i = prob.topk(k, dim=1)
    labeled = images.num_classes > 0 and (images.labels >= 0).any()
    own = [images.classes[y] if y >= 0 else "" for y in images.labels] if labeled else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "predicted", "confidence", f"top{k}"] + (["label"] if labeled else []))
        for i in range(len(images)):
            top = ";".join(f"{classes[int(c)]}:{float(p):.4f}" for p, c in zip(top_p[i], top_i[i]))
            row = [images.files[i], classes[int(top_i[i, 0])], f"{float(top_p[i, 0]):.4f}", top]
            w.writerow(row + ([own[i]] if labeled else []))
    summary = {"n": len(images), "csv": str(out), "classifier": str(classifier), "classes": len(classes)}
    if labeled:
        hit = [own[i] == classes[int(top_i[i, 0])] for i in range(len(images)) if own[i]]
        if set(own) - {""} <= set(classes):  # the folder's classes are the classifier's: an accuracy
            summary["top1"] = float(np.mean(hit)) if hit else float("nan")
    return summary

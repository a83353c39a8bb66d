"""Semi-supervised protocols from a pretrained backbone: Pseudo-Label and FixMatch.

Both fine-tune a copy of the backbone + a linear head (``finetune.train_classifier``, same optimiser,
schedule and weak view as ``finetune``) on a labeled fraction of the training set *plus the rest of
it as unlabeled images*. Each step draws ``batch_size`` labeled and ``mu * batch_size`` unlabeled
images (``mu`` = 7 by default, FixMatch's ratio, used for both); an epoch is a pass over the unlabeled
images.

* ``pseudolabel`` (Lee 2013, "Pseudo-Label: the simple and efficient semi-supervised learning method
  for deep neural networks", ICML WREPL): the unlabeled images' targets are the argmax of the current
  model's predictions (on the same view, recomputed every step, no gradient through the target);
  loss = CE(labeled) + alpha(t) CE(unlabeled, pseudo-labels), with the paper's ramp: alpha = 0 for
  t < T1, linear to alpha_f = 3 at T2, alpha_f after. The paper's T1 = 100 and T2 = 600 epochs are
  scaled to the run: T1 = 10%, T2 = 60% of the steps (``t1``, ``t2``). No dropout (the paper's
  networks had it).
* ``fixmatch`` (Sohn et al. 2020, arXiv 2001.07685): a weak view (crop + flip) of each unlabeled image
  gives a pseudo-label where the max class probability is >= ``threshold`` (0.95); the strong view
  (strong colour jitter, grayscale, blur, solarize, then one cutout square: :func:`strong_augment`,
  standing in for RandAugment + Cutout) is trained on it: loss = CE(labeled) + lambda_u (= 1) *
  mean over the ``mu B`` unlabeled images of mask * CE(strong, pseudo-label). Labeled, weak and
  strong views go through the model as one batch (one set of BatchNorm statistics), as in the
  official code. No EMA of the weights for testing (the paper evaluates an EMA model).

The unlabeled images reach the training functions as images only. :func:`fraction_protocol` is the
one place that holds the whole training set's labels: it splits it and, after training, uses the
unlabeled part's true labels for logging alone (``pseudo_label_stats``: the mask rate and the
pseudo-labels' accuracy).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.views import AugConfig, augment_input, cutout, sample_cutout_boxes
from .classifier import class_scores
from .features import Encoder
from .finetune import (Classifier, default_backbone_lr_ratio, finetune, new_classifier, predict_logits,
                       train_classifier, weak_view)

PROTOCOLS = ("finetune", "pseudolabel", "fixmatch")


# --------------------------------------------------------------------------------------------------
# Pseudo-Label


def ramp_weight(step: int, t1: int, t2: int, alpha_f: float) -> float:
    """Lee 2013's alpha(t): 0 before ``t1``, linear up to ``alpha_f`` at ``t2``, ``alpha_f`` after."""
    if step < t1:
        return 0.0
    if step >= t2:
        return alpha_f
    return alpha_f * (step - t1) / (t2 - t1)


def pseudolabel(encoder: Encoder, images: np.ndarray, labels: np.ndarray, unlabeled: np.ndarray,
                num_classes: int, *, alpha_f: float = 3.0, t1: float = 0.1, t2: float = 0.6, mu: int = 7,
                epochs: int | None = None, steps: int | None = None, batch_size: int = 64, lr: float = 0.03,
                backbone_lr_ratio: float | None = None, weight_decay: float = 5e-4,
                crop_scale: tuple[float, float] = (0.5, 1.0), device: torch.device | str = "auto",
                seed: int = 0) -> tuple[Classifier, dict]:
    """Pseudo-Label training on labeled ``images``/``labels`` and ``unlabeled`` images (no labels);
    ``t1``/``t2`` are fractions of the run's steps. History records ``pseudo`` and ``alpha``."""
    view, mode = weak_view(encoder, crop_scale), encoder.input_mode

    def step_loss(model, xl, yl, xu, generator, step, total):
        logits = model(torch.cat([augment_input(xl, view, generator, mode),
                                  augment_input(xu, view, generator, mode)])).float()
        logits_l, logits_u = logits[:len(xl)], logits[len(xl):]
        pseudo = logits_u.detach().argmax(1)
        alpha = ramp_weight(step, round(t1 * total), round(t2 * total), alpha_f)
        loss = F.cross_entropy(logits_l, yl) + alpha * F.cross_entropy(logits_u, pseudo)
        return loss, {"pseudo": pseudo, "alpha": torch.tensor(alpha)}

    ratio = default_backbone_lr_ratio(encoder) if backbone_lr_ratio is None else backbone_lr_ratio
    model = new_classifier(encoder, num_classes, seed)
    info = train_classifier(model, images, labels, step_loss, unlabeled=unlabeled, mu=mu, epochs=epochs, steps=steps,
                            batch_size=batch_size, lr=lr, backbone_lr=lr * ratio, weight_decay=weight_decay,
                            device=device, precision=encoder.precision, seed=seed, name="pseudolabel")
    info.update(alpha_f=alpha_f, t1=t1, t2=t2, mu=mu)
    return model, info


# --------------------------------------------------------------------------------------------------
# FixMatch


def strong_view(weak: AugConfig) -> AugConfig:
    """``weak``'s crop and flip plus strong colour jitter (0.8 strength), grayscale, blur, solarize."""
    return dataclasses.replace(weak, jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                               gray_p=0.2, blur_p=0.5, solarize_p=0.2)


def strong_augment(images: torch.Tensor, cfg: AugConfig, generator: torch.Generator, mode: str = "rgb",
                   cutout_side: tuple[float, float] = (0.25, 0.5)) -> torch.Tensor:
    """FixMatch's strong view: ``augment_input`` with ``cfg`` (see :func:`strong_view`), then one
    cutout square per image (side 25-50% of the image), filled with 0: the mean colour (mid-grey L)."""
    x = augment_input(images, cfg, generator, mode)
    boxes = sample_cutout_boxes(len(x), x.shape[-2], x.shape[-1], cutout_side, generator, x.device)
    return cutout(x, boxes, out=x)


def fixmatch_targets(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels, mask): the argmax of the weak view's softmax and whether its probability is
    at least ``threshold``. No gradient."""
    confidence, pseudo = torch.softmax(weak_logits.detach().float(), dim=1).max(dim=1)
    return pseudo, confidence >= threshold


def fixmatch_unlabeled_loss(strong_logits: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's l_u: cross-entropy of the strong view against the pseudo-label, masked, averaged
    over *all* unlabeled images (masked ones count as 0)."""
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * mask.float()).mean()


def fixmatch(encoder: Encoder, images: np.ndarray, labels: np.ndarray, unlabeled: np.ndarray, num_classes: int, *,
             threshold: float = 0.95, lambda_u: float = 1.0, mu: int = 7, epochs: int | None = None,
             steps: int | None = None, batch_size: int = 64, lr: float = 0.03, backbone_lr_ratio: float | None = None,
             weight_decay: float = 5e-4, crop_scale: tuple[float, float] = (0.5, 1.0),
             device: torch.device | str = "auto", seed: int = 0) -> tuple[Classifier, dict]:
    """FixMatch on labeled ``images``/``labels`` and ``unlabeled`` images (no labels). History records
    ``pseudo`` and ``mask`` for every unlabeled image of every step."""
    weak, mode = weak_view(encoder, crop_scale), encoder.input_mode
    strong = strong_view(weak)

    def step_loss(model, xl, yl, xu, generator, step, total):
        views = torch.cat([augment_input(xl, weak, generator, mode), augment_input(xu, weak, generator, mode),
                           strong_augment(xu, strong, generator, mode)])
        logits = model(views).float()
        n_l, n_u = len(xl), len(xu)
        logits_l, logits_w, logits_s = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
        pseudo, mask = fixmatch_targets(logits_w, threshold)
        loss = F.cross_entropy(logits_l, yl) + lambda_u * fixmatch_unlabeled_loss(logits_s, pseudo, mask)
        return loss, {"pseudo": pseudo, "mask": mask}

    ratio = default_backbone_lr_ratio(encoder) if backbone_lr_ratio is None else backbone_lr_ratio
    model = new_classifier(encoder, num_classes, seed)
    info = train_classifier(model, images, labels, step_loss, unlabeled=unlabeled, mu=mu, epochs=epochs, steps=steps,
                            batch_size=batch_size, lr=lr, backbone_lr=lr * ratio, weight_decay=weight_decay,
                            device=device, precision=encoder.precision, seed=seed, name="fixmatch")
    info.update(threshold=threshold, lambda_u=lambda_u, mu=mu)
    return model, info


# --------------------------------------------------------------------------------------------------
# the protocols


def pseudo_label_stats(history: dict, true_labels: np.ndarray, tail: float = 0.1) -> dict:
    """Logging only, after training: with the unlabeled images' true labels (-1: unknown, skipped),
    over the last ``tail`` of the steps: ``pseudo_label_acc``, the accuracy of the pseudo-labels that
    were used. With a ``mask`` in the history (FixMatch) also ``mask_rate`` (fraction of unlabeled
    images whose pseudo-label was used), ``pseudo_label_acc_all`` (accuracy of all pseudo-labels, used
    or not) and ``mask_rate_curve`` (the mask rate over ten equal parts of the run)."""
    pseudo, idx = history["pseudo"], history["unlabeled_idx"]
    mask = history.get("mask", torch.ones_like(pseudo, dtype=torch.bool))
    y = torch.as_tensor(np.asarray(true_labels), dtype=torch.long)[idx]
    last = slice(len(pseudo) - max(1, round(tail * len(pseudo))), None)
    known, correct = y[last] >= 0, pseudo[last] == y[last]
    used = mask[last] & known

    def ratio(num, den):
        return round(float(num.sum()) / int(den.sum()), 4) if int(den.sum()) else None

    stats = {"pseudo_label_acc": ratio(correct & used, used)}
    if "mask" in history:
        curve = [round(float(chunk.mean()), 4) for chunk in mask.float().mean(1).chunk(10)]
        stats.update(mask_rate=round(float(mask[last].float().mean()), 4),
                     pseudo_label_acc_all=ratio(correct & known, known), mask_rate_curve=curve)
    return stats


def fraction_protocol(protocol: str, encoder: Encoder, train_images: np.ndarray, train_labels: np.ndarray,
                      labeled_idx: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray, num_classes: int,
                      device: torch.device | str = "auto", seed: int = 0, classes: list[str] | None = None,
                      **options) -> tuple[dict, Classifier]:
    """Run ``finetune``, ``pseudolabel`` or ``fixmatch`` with the training images at ``labeled_idx`` as
    the labeled set (the rest is unlabeled for the semi-supervised ones: passed as images only) and
    measure top-1 on the test set. ``options`` go to the protocol's function (epochs, steps, batch_size, lr,
    mu, threshold, ...). Returns (result dict, trained classifier); with ``classes`` the result also
    has per-class top-1 and the confusion matrix (:func:`selfsup.evaluate.classifier.class_scores`)."""
    labeled_idx = np.asarray(labeled_idx, dtype=np.int64)
    unlabeled_idx = np.setdiff1d(np.arange(len(train_labels)), labeled_idx)
    images, labels = np.asarray(train_images[labeled_idx]), np.asarray(train_labels)[labeled_idx]
    if protocol == "finetune":
        model, info = finetune(encoder, images, labels, num_classes, device=device, seed=seed, **options)
    elif protocol in ("pseudolabel", "fixmatch"):
        if len(unlabeled_idx) == 0:
            raise ConfigError(f"{protocol} needs unlabeled images: use a fraction below 1")
        unlabeled = np.asarray(train_images[unlabeled_idx])  # images only: their labels stay here
        train = pseudolabel if protocol == "pseudolabel" else fixmatch
        model, info = train(encoder, images, labels, unlabeled, num_classes, device=device, seed=seed, **options)
    else:
        raise ConfigError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    history = info.pop("history")
    logits = predict_logits(model, encoder, test_images, device)
    y = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    result = {"top1": float((logits.argmax(1) == y).float().mean()), "n_labeled": len(labeled_idx),
              "n_unlabeled": len(unlabeled_idx) if protocol != "finetune" else 0,
              "final_loss": round(float(history["loss"][-max(1, len(history["loss"]) // 10):].mean()), 4), **info}
    if protocol != "finetune":
        result.update(pseudo_label_stats(history, np.asarray(train_labels)[unlabeled_idx]))
    if classes is not None:
        result.update(class_scores(logits.argmax(1), y, classes))
    return result, model

"""Semantic segmentation: how well a backbone's feature maps segment, in mIoU (the survey's dense
downstream task; Jing & Tian 2019, Sec. 8).

Head: the maps of every stage of the backbone (``forward_stages``; ViT patch tokens as maps) are
upsampled (bilinear) to a quarter of the input's resolution and concatenated; a BatchNorm and a
1x1 convolution map them to class logits per pixel, upsampled to the mask's size for the loss and
the prediction. That is a linear classifier per pixel on multi-scale features (the BN only
standardises them), the dense counterpart of the linear probe: what the features hold, not what a
decoder can learn on top (a U-Net-style decoder would mask a weak backbone). Loss: cross-entropy,
the ignore index left out.

* Frozen (default): the backbone's features of the training frames are computed once (eval mode;
  BatchNorm statistics re-estimated on the frames first, as the other frozen protocols do) and the
  head is trained on them with AdamW (no augmentation: the features are fixed).
* ``finetune=True``: backbone and head trained together with SGD (the backbone at 0.1x the head's lr
  for a pretrained run, 1x for ``random:``, as the fine-tuning protocol), every frame randomly
  flipped and crop-rescaled (50-100% of its area) with its mask (nearest neighbour) at each step.

Input size: the backbone runs at the data's resolution, rounded to a multiple of its total stride
(e.g. 240 x 180 becomes 240 x 184 for a stride-8 network), whatever size it was pretrained at; the
logits are resized back to the masks'. Scores on the test split from the confusion matrix over all
labelled pixels: IoU per class = TP / (TP + FP + FN), mIoU the mean over the classes present in the
test masks or predicted, pixel accuracy = correct / labelled.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.segmentation import SegmentationSet
from ..data.views import AugConfig
from ..checkpoint import atomic_torch_save
from ..data.cache import default_cache_dir
from ..runtime import autocast, resolve_device
from .features import Encoder, weights_digest

log = logging.getLogger("selfsup")
OUTPUT_STRIDE = 4  # the head's map: a quarter of the input's resolution


def backbone_stride(backbone: nn.Module, device: torch.device) -> int:
    """The total downsampling of the backbone's coarsest stage (8 for the convnet and a small-stem
    ResNet, 32 for an ImageNet-stem ResNet, the patch size for a ViT)."""
    probe = 64
    while True:
        try:
            with torch.no_grad():
                maps = backbone.forward_stages(torch.zeros(1, backbone_in_chans(backbone), probe, probe, device=device))
            return max(1, probe // min(m.shape[-1] for m in maps))
        except (RuntimeError, ValueError):
            if probe >= 512:
                raise
            probe *= 2


def backbone_in_chans(backbone: nn.Module) -> int:
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def network_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """(H', W'): the frame's size rounded to the nearest multiple of ``stride`` (at least one)."""
    def snap(v: int) -> int:
        return max(stride, int(math.floor(v / stride + 0.5)) * stride)  # half up: 180 / 8 = 22.5 -> 184

    return snap(height), snap(width)


def dense_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every stage's map upsampled to 1/OUTPUT_STRIDE of ``x``'s size, concatenated: ``(B, sum C, h, w)``."""
    h, w = x.shape[-2] // OUTPUT_STRIDE, x.shape[-1] // OUTPUT_STRIDE
    maps = backbone.forward_stages(x)
    return torch.cat([F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False) for m in maps], 1)


class SegmentationHead(nn.Module):
    """BatchNorm + 1x1 convolution on the concatenated stage maps: a linear classifier per pixel."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(feats.float()))


def _resize_norm(x: torch.Tensor, size: tuple[int, int], view: AugConfig, input_mode: str) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> the backbone's normalised input at ``size`` (H', W'), non-square allowed."""
    x = x.float() / 255
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if input_mode == "lab_l":
        from ..data.color import lightness

        return lightness(x).contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(view.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(view.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def confusion(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``cm[true][pred]`` pixel counts over the pixels whose mask is not ``ignore_index``."""
    keep = mask != ignore_index
    t, p = mask[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def scores(cm: torch.Tensor, classes: list[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a confusion matrix (see the module docstring)."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return {"miou": miou, "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1)),
            "per_class_iou": {c: (round(float(v), 4) if not math.isnan(float(v)) else None) for c, v in zip(classes, iou)}}


def _precise_bn(backbone: nn.Module, images: np.ndarray, view, size, device, input_mode, max_images=256) -> int:
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.train()
    n = min(len(images), max_images)
    with torch.no_grad():
        for i in range(0, n, 8):
            backbone.forward_stages(_resize_norm(torch.from_numpy(np.ascontiguousarray(images[i:i + 8])).permute(
                0, 3, 1, 2).to(device), size, view, input_mode))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    backbone.eval()
    return n


def _joint_augment(x: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip and crop-rescale (50-100% of the area, aspect kept) of frames ``x``
    (float ``(B, C, H, W)``) and masks ``(B, H, W)`` (nearest neighbour), back at the input size."""
    b, _, h, w = x.shape
    xs, ms = [], []
    for i in range(b):
        u = torch.rand(4, generator=g)
        s = math.sqrt(0.5 + 0.5 * float(u[0]))
        ch, cw = max(1, int(h * s)), max(1, int(w * s))
        top, left = int(float(u[1]) * (h - ch)), int(float(u[2]) * (w - cw))
        xi = x[i:i + 1, :, top:top + ch, left:left + cw]
        mi = mask[i:i + 1, None, top:top + ch, left:left + cw].float()
        if float(u[3]) < 0.5:
            xi, mi = xi.flip(-1), mi.flip(-1)
        xs.append(F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False))
        ms.append(F.interpolate(mi, size=(h, w), mode="nearest")[:, 0].long())
    return torch.cat(xs).contiguous(memory_format=torch.channels_last), torch.cat(ms)


SEGMENT_CACHE_KEEP = 4  # segmentation feature files kept (each up to SEGMENT_CACHE_MAX_BYTES)
SEGMENT_CACHE_MAX_BYTES = 4 << 30  # larger feature sets are recomputed every time, never written


def frozen_features(backbone: nn.Module, images: np.ndarray, view: AugConfig, size: tuple[int, int], device,
                    input_mode: str, precision: str, batch_size: int = 8, precise_bn_stats: bool = True,
                    cache_dir: str | None = None) -> tuple[torch.Tensor, int]:
    """The frozen protocol's inputs: precise BN on ``images`` (when asked), then :func:`dense_features`
    of every frame, fp16 on the CPU. Returns ``(features, frames used for precise BN)``; ``backbone``
    is left in eval mode with the re-estimated statistics.

    Remembered on disk like the classification protocols' features (``<cache>/features``, see
    :func:`selfsup.evaluate.features.cached_features`): the key hashes the backbone's weights and
    buffers before precise BN, the frames' pixels, the network size, the view and the precision, and
    the file holds the features and the re-estimated BatchNorm buffers, so a second evaluation of the
    same run on the same frames skips both passes. At most ``SEGMENT_CACHE_KEEP`` such files are kept
    (a CamVid train split is about 1 GB for the convnet); ``SELFSUP_FEATURE_CACHE=0`` turns it off."""
    use_cache = os.environ.get("SELFSUP_FEATURE_CACHE", "1") != "0"
    path = None
    if use_cache:
        h = weights_digest(backbone)
        h.update(np.ascontiguousarray(images).data)
        h.update(repr((tuple(size), tuple(view.mean), tuple(view.std), input_mode, precision, bool(precise_bn_stats),
                       images.shape, torch.__version__, "segment-v1")).encode())
        path = Path(cache_dir or default_cache_dir()) / "features" / f"seg-{h.hexdigest()[:32]}.pt"
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                feats, buffers = saved["features"], saved["buffers"]
                if feats.ndim == 4 and len(feats) == len(images):
                    own = dict(backbone.named_buffers())
                    for k, v in buffers.items():
                        own[k].copy_(v)
                    os.utime(path)
                    log.info("segment: features of %d frames from %s", len(images), path)
                    return feats, int(saved["bn_images"])
            except Exception as e:  # a damaged file: compute again and overwrite it
                log.warning("ignoring unreadable segmentation feature cache %s (%s)", path, e)
    bn_images = _precise_bn(backbone, images, view, size, device, input_mode) if precise_bn_stats else 0
    backbone.eval()
    with torch.no_grad(), autocast(device, precision):
        parts = [dense_features(backbone, _resize_norm(
            torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device),
            size, view, input_mode)).half().cpu() for i in range(0, len(images), batch_size)]
    feats = torch.cat(parts)  # fp16 on the CPU (outside autocast: its cat refuses fp16 there)
    del parts
    if path is not None and feats.numel() * feats.element_size() <= SEGMENT_CACHE_MAX_BYTES:
        try:
            buffers = {k: v.detach().cpu() for k, v in backbone.named_buffers()}
            atomic_torch_save({"features": feats, "buffers": buffers, "bn_images": bn_images}, path)
            old = sorted(path.parent.glob("seg-*.pt"), key=lambda p: p.stat().st_mtime)[:-SEGMENT_CACHE_KEEP]
            for p in old:
                p.unlink(missing_ok=True)
        except OSError as e:  # a read-only or full disk costs speed, never the result
            log.warning("could not write the segmentation feature cache %s (%s)", path, e)
    return feats, bn_images


def segment(encoder: Encoder, train: SegmentationSet, test: SegmentationSet, device: torch.device | str = "auto",
            finetune: bool = False, epochs: int | None = None, lr: float | None = None, batch_size: int = 8,
            seed: int = 0, precise_bn_stats: bool = True, cache_dir: str | None = None
            ) -> tuple[dict, nn.Module, nn.Module, tuple[int, int]]:
    """Train the head (and, with ``finetune``, the backbone) on ``train``, score ``test``. Returns
    ``(result, backbone, head, network size)``. The frozen features come from :func:`frozen_features`
    (remembered on disk)."""
    device = resolve_device(device) if isinstance(device, str) else device
    if train.num_classes < 2:
        raise ValueError(f"segmentation needs at least 2 classes in the training masks, found {train.num_classes}")
    k, ignore = train.num_classes, train.ignore_index
    backbone = copy.deepcopy(encoder.backbone).to(device).eval()
    view = AugConfig(size=encoder.spec["image_size"], mean=encoder.mean, std=encoder.std)
    stride = backbone_stride(backbone, device)
    size = network_size(train.images.shape[1], train.images.shape[2], stride)
    mode = encoder.input_mode
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    bn_images = 0  # fine-tuning trains the BatchNorm statistics with the rest
    with torch.no_grad():
        channels = dense_features(backbone, torch.zeros(1, backbone_in_chans(backbone), *size, device=device)).shape[1]
    head = SegmentationHead(channels, k).to(device)
    masks = torch.from_numpy(train.masks)
    epochs = epochs or (10 if finetune else 30)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    if not finetune:
        feats, bn_images = frozen_features(backbone, train.images, view, size, device, mode, encoder.precision,
                                           batch_size, precise_bn_stats, cache_dir)
        opt = torch.optim.AdamW(head.parameters(), lr=lr or 1e-3, weight_decay=1e-4)
    else:
        scale = 1.0 if encoder.name.startswith("random:") else 0.1
        base = lr or 0.01
        opt = torch.optim.SGD([{"params": list(backbone.parameters()), "lr": base * scale},
                               {"params": list(head.parameters()), "lr": base}], lr=base, momentum=0.9,
                              weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        backbone.train(finetune)
        head.train()
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            y = masks[idx].to(device).long()
            with autocast(device, encoder.precision):
                if finetune:
                    x = _resize_norm(torch.from_numpy(np.ascontiguousarray(train.images[idx.numpy()])).permute(
                        0, 3, 1, 2).to(device), size, view, mode)
                    x, y = _joint_augment(x, F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long(),
                                          g)
                    logits = head(dense_features(backbone, x))
                else:
                    logits = head(feats[idx].to(device).float())
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        log.info("segment: epoch %d/%d loss %.4f", epoch + 1, epochs, float(np.mean(losses[-steps_per_epoch:])))
    backbone.eval()
    head.eval()
    cm = torch.zeros(k, k, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(test), batch_size):
            pred = predict_masks(backbone, head, test.images[i:i + batch_size], view, size, device, mode,
                                 encoder.precision)
            cm += confusion(pred, torch.from_numpy(test.masks[i:i + batch_size]).long(), k, test.ignore_index)
    result = {**scores(cm, train.classes), "confusion": cm.tolist(), "epochs": epochs, "steps": total,
              "finetune": finetune, "network_size": [size[1], size[0]], "stride": stride, "channels": channels,
              "final_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4), "precise_bn": bn_images,
              "head": f"BN + 1x1 conv on every stage's map, upsampled to stride {OUTPUT_STRIDE}, concatenated"}
    result["top1"] = result["miou"]
    return result, backbone, head, size


@torch.no_grad()
def predict_masks(backbone: nn.Module, head: nn.Module, images: np.ndarray, view: AugConfig, size: tuple[int, int],
                  device, input_mode: str = "rgb", precision: str = "auto") -> torch.Tensor:
    """Class ids ``(B, H, W)`` (CPU) of uint8 frames ``(B, H, W, 3)`` at their own size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
    h, w = x.shape[-2:]
    with autocast(device, precision):
        logits = head(dense_features(backbone, _resize_norm(x, size, view, input_mode)))
    return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).argmax(1).cpu()


CAMVID_COLOURS = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]  # SegNet's palette


def colourize(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """Class ids ``(H, W)`` -> RGB: CamVid's colours (SegNet tutorial) for ids 0-10, a fixed random palette
    beyond, black for the ignore index."""
    rng = np.random.default_rng(0)
    palette = np.array(CAMVID_COLOURS + [tuple(rng.integers(0, 256, 3)) for _ in range(245)], dtype=np.uint8)
    out = palette[np.clip(mask, 0, 255)]
    out[mask == ignore_index] = 0
    return out


def segmentation_figure(backbone, head, test: SegmentationSet, view, size, device, input_mode, precision,
                        path: str | Path, n: int = 4) -> Path:
    """``path``: ``n`` test frames as image | ground truth | prediction."""
    from ..figures import image_grid

    idx = np.linspace(0, len(test) - 1, min(n, len(test))).astype(int)
    pred = predict_masks(backbone, head, test.images[idx], view, size, device, input_mode, precision).numpy()
    rows = [np.stack([test.images[i], colourize(test.masks[i], test.ignore_index),
                      colourize(p, test.ignore_index)]) for i, p in zip(idx, pred)]
    return image_grid(rows, path, row_titles=[Path(test.files[i]).stem[:14] for i in idx],
                      col_titles=["image", "ground truth", "prediction"], title="segmentation: test frames",
                      scale=2.0)

"""Segmentation data: a folder of ``images/`` and ``labels/`` with matching names.

Layout (CamVid as in the SegNet tutorial, Cityscapes-style exports, most tools' output)::

    ROOT/[SPLIT/]images/NAME.jpg      any PIL-readable image
    ROOT/[SPLIT/]labels/NAME.png      one class id per pixel: single-channel (L) or palette (P) PNG

Splits as for image folders: ``ROOT/SPLIT/`` when it exists, else the whole of ``ROOT`` is split
``train``. A mask matches the image of the same stem (``NAME``). Ids ``0 .. C-1`` are classes;
``ignore_index`` (default 255; CamVid's "unlabelled" is 11) is left out of the loss and the scores.
Class names come from ``ROOT/classes.txt`` (one per line, in id order) when present; a line named
``unlabelled``, ``unlabeled``, ``void`` or ``ignore`` there sets the ignore index. Otherwise the classes
are ``0 .. C-1`` with ``C`` one more than the largest id in the masks.

Every image is resized to one ``size`` (width, height; default: the first image's), bilinear, and its
mask with nearest neighbour. Bad pairs are skipped and listed with the reason (``skipped``), never a
crash: an image without a mask (or a mask without an image), an image or mask that cannot be decoded,
a mask whose size differs from its image's, a mask with ids at or above ``num_classes`` (other than
the ignore index), a mask of RGB colours instead of ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .sources import IMAGE_EXTENSIONS, SPLIT_FOLDER_NAMES, DataError, to_rgb

IGNORE_NAMES = ("unlabelled", "unlabeled", "void", "ignore")


@dataclass
class SegmentationSet:
    """Decoded image / mask pairs: ``images`` uint8 ``(N, H, W, 3)``, ``masks`` uint8 ``(N, H, W)``."""

    images: np.ndarray
    masks: np.ndarray
    files: list[str]
    classes: list[str]
    ignore_index: int
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_folder(root: str, split: str) -> str:
    folder = os.path.join(root, split)
    if os.path.isdir(os.path.join(folder, "images")):
        return folder
    if split == "train" and os.path.isdir(os.path.join(root, "images")):
        return root
    present = [d for d in SPLIT_FOLDER_NAMES if os.path.isdir(os.path.join(root, d, "images"))]
    raise DataError(f"no segmentation split '{split}' in {root} (expected {folder}/images and {folder}/labels); "
                    f"splits there: {', '.join(present) or 'none'}")


def read_classes(root: str) -> tuple[list[str] | None, int | None]:
    """Names from ``ROOT/classes.txt`` (or None) and the ignore index it names (or None)."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None, None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    ignore = next((i for i, n in enumerate(names) if n.lower() in IGNORE_NAMES), None)
    if ignore is not None and ignore == len(names) - 1:  # CamVid's layout: the ignored id comes last
        names = names[:-1]
    return names, ignore


def _decode_mask(path: str) -> np.ndarray:
    with Image.open(path) as m:
        m.load()
        if m.mode in ("L", "P", "I", "I;16", "1"):  # palette: the indices are the ids
            return np.asarray(m).astype(np.int64)
        raise ValueError(f"mask mode {m.mode}: expected one class id per pixel (single-channel or palette PNG), "
                         f"not colours")


def _decode_rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def load_segmentation(spec: str | Path, split: str = "train", size: tuple[int, int] | None = None,
                      ignore_index: int | None = None, num_classes: int | None = None,
                      classes: list[str] | None = None) -> SegmentationSet:
    """Decode the ``split`` of a segmentation folder (see the module docstring). ``size`` is
    ``(width, height)``; ``num_classes`` / ``classes`` fix the classes (e.g. the training split's, for
    the test split); ``ignore_index`` overrides the default (classes.txt's, else 255)."""
    root = os.path.abspath(os.path.expanduser(str(spec)))
    if not os.path.isdir(root):
        raise DataError(f"segmentation data: {root} is not a folder")
    folder = _split_folder(root, split)
    names_file, ignore_file = read_classes(root)
    ignore = ignore_index if ignore_index is not None else (ignore_file if ignore_file is not None else 255)
    if not 0 <= ignore <= 255:
        raise DataError(f"--ignore-index must be in 0..255, got {ignore}")
    img_dir, lab_dir = os.path.join(folder, "images"), os.path.join(folder, "labels")
    if not os.path.isdir(lab_dir):
        raise DataError(f"{folder} has images/ but no labels/ folder")
    ext = tuple(IMAGE_EXTENSIONS)
    imgs = {os.path.splitext(n)[0]: n for n in sorted(os.listdir(img_dir))
            if not n.startswith(".") and n.lower().endswith(ext)}
    labs = {os.path.splitext(n)[0]: n for n in sorted(os.listdir(lab_dir))
            if not n.startswith(".") and n.lower().endswith(ext)}
    skipped = [(os.path.join(lab_dir, labs[s]), "a mask without its image") for s in sorted(set(labs) - set(imgs))]
    pairs = []
    for stem in sorted(imgs):
        if stem not in labs:
            skipped.append((os.path.join(img_dir, imgs[stem]), "no mask of the same name in labels/"))
            continue
        pairs.append((stem, os.path.join(img_dir, imgs[stem]), os.path.join(lab_dir, labs[stem])))
    known = num_classes if num_classes is not None else (len(classes) if classes else None)
    decoded, files = [], []
    for stem, ip, lp in pairs:
        try:
            image, mask = _decode_rgb(ip), _decode_mask(lp)
        except Exception as e:  # noqa: BLE001 - a bad file is listed, not fatal
            skipped.append((ip, f"cannot be decoded: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
            continue
        if mask.shape != image.shape[:2]:
            skipped.append((lp, f"mask {mask.shape[1]}x{mask.shape[0]} differs from its image "
                                f"{image.shape[1]}x{image.shape[0]}"))
            continue
        if known is not None:
            bad = (mask >= known) & (mask != ignore)
            if bad.any():
                skipped.append((lp, f"ids {sorted(set(np.unique(mask[bad]).tolist()))[:5]} outside 0..{known - 1} "
                                    f"(ignore index {ignore})"))
                continue
        if mask.max(initial=0) > 255:
            skipped.append((lp, "ids above 255"))
            continue
        decoded.append((image, mask.astype(np.uint8)))
        files.append(os.path.relpath(ip, folder))
    if not decoded:
        raise DataError(f"no usable image/mask pairs in {folder} ({len(skipped)} skipped"
                        f"{': ' + skipped[0][1] if skipped else ''})")
    w, h = size or (decoded[0][0].shape[1], decoded[0][0].shape[0])
    images = np.empty((len(decoded), h, w, 3), dtype=np.uint8)
    masks = np.empty((len(decoded), h, w), dtype=np.uint8)
    for i, (image, mask) in enumerate(decoded):
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        images[i], masks[i] = image, mask
    if classes is None:
        if known is None:
            ids = np.unique(masks).astype(np.int64)
            known = int(ids[ids != ignore].max(initial=-1)) + 1
        classes = (names_file[:known] if names_file and len(names_file) >= known
                   else [str(i) for i in range(known)])
    return SegmentationSet(images, masks, files, list(classes), ignore, f"segmentation:{folder}", skipped)

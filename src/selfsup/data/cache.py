"""Decode cache: every dataset split is decoded once into a uint8 file and memory-mapped afterwards.

:func:`load_images` opens a source (:func:`selfsup.data.sources.open_source`), and looks
in the cache folder (``cache_dir`` argument, else ``$SELFSUP_CACHE``, else
``~/.cache/selfsup/cache``) for two files named after the cache key:

* ``<key>.u8``: the images, raw uint8, shape ``(N, H, W, 3)`` (NHWC, C-contiguous): ``H = W = S``
  for a square collection, else the whole frame at the collection's aspect with shorter side ``S``
  (:mod:`selfsup.data.size`);
* ``<key>.json``: ``format``, ``n``, ``image_size``, ``frame`` (``[H, W]``), ``labels``, ``classes``,
  ``files``, ``skipped`` (``[path, reason]`` pairs), ``source`` and ``created``.

The key is ``<identity>-<content>``: ``identity`` hashes :data:`FORMAT_VERSION`, the
source kind, its absolute path, the split, the image size and, for ``full_frame=False``, that the
frames are squares; ``content`` hashes those
and the source fingerprint (file names, sizes and modification times). Adding, removing
or modifying a file therefore changes the key and the split is decoded again; after a
rebuild the older entries with the same identity are deleted.

A build streams the decoded images straight into a memmap of the final size (memory does
not grow with the dataset); images that fail to decode are left out, the file is
truncated to the images kept, and the failures are listed in ``skipped``. Files are
written under temporary names in the cache folder and renamed into place, the ``.u8``
first and the ``.json`` last: an entry exists only once its ``.json`` does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import numbers
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .size import frame_aspect, frame_shape
from .sources import DataError, Source, open_source

logger = logging.getLogger("selfsup.data")

FORMAT_VERSION = 2  # 2: the entry's frame is chosen when it is built (data/size.py) and kept in its json


@dataclass
class CachedImages:
    """A decoded dataset split.

    ``images`` is uint8 ``(N, S, S, 3)`` (a read-only ``np.memmap`` on the cache file, or an
    in-memory array after :meth:`subset`); ``frames`` the whole frames ``(N, H, W, 3)`` that
    ``images`` is the centre square of, for a collection that is not square (else ``None``: the
    frames are the images; see :mod:`selfsup.data.size`), ``labels`` int64 ``(N,)`` (-1 where unlabeled),
    ``classes`` the class names (index = label, ``[]`` if unlabeled), ``files`` one
    identifier per image, ``skipped`` the ``(path, reason)`` of inputs that could not be
    decoded and ``source`` a description of where the images came from.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    files: list[str]
    skipped: list[tuple[str, str]]
    source: str
    frames: np.ndarray | None = None

    @property
    def full_frames(self) -> np.ndarray:
        """The whole frames: ``frames``, or ``images`` when they are square."""
        return self.images if self.frames is None else self.frames

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: np.ndarray) -> "CachedImages":
        """The images at ``idx`` (integer indices or a boolean mask); ``images`` becomes an in-memory array."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if self.frames is not None:
            frames = np.asarray(self.frames[idx])
            return dataclasses.replace(self, images=centre_square(frames, self.images.shape[1]), frames=frames,
                                       labels=self.labels[idx], files=[self.files[i] for i in idx])
        return dataclasses.replace(self, images=np.asarray(self.images[idx]), labels=self.labels[idx],
                                   files=[self.files[i] for i in idx])


def centre_square(frames: np.ndarray, side: int) -> np.ndarray:
    """The centre ``side x side`` of ``(N, H, W, 3)`` frames, as a view (no copy)."""
    h, w = frames.shape[1:3]
    top, left = (h - side) // 2, (w - side) // 2
    return frames[:, top:top + side, left:left + side]


def default_cache_dir() -> str:
    """``$SELFSUP_CACHE`` if set, else ``~/.cache/selfsup/cache``."""
    return os.environ.get("SELFSUP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "selfsup", "cache")


def cache_key(source: Source, image_size: int, full_frame: bool = True) -> str:
    """File stem of the cache entry for ``source`` decoded at ``image_size``, in whole frames or, without
    ``full_frame``, squares (see the module docstring). The frame itself follows from the files, which
    ``content`` hashes, so it is chosen once, when the entry is built, and read from its json."""
    parts = [FORMAT_VERSION, source.kind, source.path, source.split, image_size]
    if not full_frame:
        parts.append("square")
    identity = json.dumps(parts)
    content = hashlib.sha256(f"{identity}\0{source.fingerprint()}".encode("utf-8", "surrogateescape"))
    return f"{hashlib.sha256(identity.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}-{content.hexdigest()[:32]}"


def _read_entry(base: str, image_size: int) -> CachedImages | None:
    """Open the cache entry at ``base`` (path without extension), or None if it is missing or inconsistent."""
    try:
        with open(base + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        n, size = meta["n"], meta["image_size"]
        h, w = meta["frame"]
        valid = (meta["format"] == FORMAT_VERSION and size == image_size and min(h, w) == size
                 and len(meta["labels"]) == n and len(meta["files"]) == n and n > 0
                 and os.path.getsize(base + ".u8") == n * h * w * 3)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not valid:
        return None
    frames = np.memmap(base + ".u8", dtype=np.uint8, mode="r", shape=(n, h, w, 3))
    square = (h, w) == (size, size)
    return CachedImages(images=frames if square else centre_square(frames, size),
                        labels=np.asarray(meta["labels"], dtype=np.int64), classes=list(meta["classes"]),
                        files=list(meta["files"]), skipped=[(p, r) for p, r in meta["skipped"]], source=meta["source"],
                        frames=None if square else frames)


CACHE_SPARE_BYTES = 64 * 2**20  # free space left over after a decode cache is written


def _build_entry(source: Source, image_size: int, frame: tuple[int, int], base: str, progress: bool) -> None:
    """Decode ``source`` into ``frame``-sized (``(H, W)``) images in the cache entry at ``base``, atomically."""
    fh, fw = frame
    total = len(source)
    if total == 0:
        raise DataError(f"{source.describe()} holds no images")
    tmp = f"{os.path.dirname(base)}{os.sep}.{os.path.basename(base)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp_u8, tmp_json = tmp + ".u8.tmp", tmp + ".json.tmp"
    need = total * fh * fw * 3
    free = shutil.disk_usage(os.path.dirname(base)).free
    if need + CACHE_SPARE_BYTES > free:  # the memmap is sparse: a full disk would kill the process mid-write
        raise DataError(f"the decode cache of {source.describe()} needs {need / 1e6:,.0f} MB ({total} images at "
                        f"{fw} x {fh} px) in {os.path.dirname(base)}, which has {free / 1e6:,.0f} MB free; set "
                        f"SELFSUP_CACHE (or data.cache_dir) to a disk with room")
    logger.info("decoding %d images of %s at %d x %d px into the cache %s (%s MB, %s MB free)", total,
                source.describe(), fw, fh, os.path.dirname(base), f"{need / 1e6:,.0f}", f"{free / 1e6:,.0f}")
    try:
        images = np.memmap(tmp_u8, dtype=np.uint8, mode="w+", shape=(total, fh, fw, 3))
        labels, files, skipped = [], [], []
        items = tqdm(source.iter_images(image_size if fh == fw == image_size else (fh, fw)), total=total, desc=f"decoding {total} images into cache",
                     unit="img", disable=None if progress else True)  # None: only on a terminal
        for item in items:
            if item.error is not None:
                skipped.append((item.file, item.error))
                continue
            images[len(labels)] = item.image
            labels.append(item.label)
            files.append(item.file)
        images.flush()
        del images
        if not labels:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
            raise DataError(f"none of the {total} images of {source.describe()} could be decoded ({reasons})")
        if len(labels) < total:
            os.truncate(tmp_u8, len(labels) * fh * fw * 3)
        meta = {"format": FORMAT_VERSION, "n": len(labels), "image_size": image_size, "frame": [fh, fw], "labels": labels,
                "classes": source.classes, "files": files, "skipped": skipped, "source": source.describe(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(tmp_json, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(tmp_u8, base + ".u8")
        os.replace(tmp_json, base + ".json")  # commit marker: written last
    except OSError as e:  # e.g. the disk filled up meanwhile: earlier cache entries are untouched
        raise DataError(f"could not write the decode cache {base}.u8 ({type(e).__name__}: {e}); earlier cache "
                        f"entries are untouched; free some space or set SELFSUP_CACHE to another disk") from None
    finally:
        for path in (tmp_u8, tmp_json):
            if os.path.exists(path):
                os.remove(path)


def _remove_stale(cache_dir: str, key: str) -> None:
    """Delete older entries of the same source/split/size (same identity, different content)."""
    identity = key.split("-", 1)[0] + "-"
    stale = [n for n in os.listdir(cache_dir) if n.startswith(identity) and not n.startswith(key)]
    for name in sorted(stale, key=lambda n: not n.endswith(".json")):  # un-commit (.json) before deleting data
        try:
            os.remove(os.path.join(cache_dir, name))
        except OSError as exc:  # e.g. still open by another process on Windows
            logger.debug("could not remove stale cache file %s: %s", name, exc)


def load_images(spec: str, split: str = "train", image_size: int = 32, cache_dir: str | None = None,
                download: bool = False, progress: bool = True, full_frame: bool = True) -> CachedImages:
    """Load a dataset split as uint8 ``(N, image_size, image_size, 3)`` images, decoding it once into the cache.

    With ``full_frame`` (the default) a collection that is not square keeps its whole frames too
    (``frames``; ``images`` is their centre square): see :mod:`selfsup.data.size`.

    ``spec`` is a path or a dataset name (see :mod:`selfsup.data.sources`). Raises
    :class:`DataError` before any decoding for a missing path, a folder without images,
    an unknown dataset name or an unavailable split.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    source = open_source(spec, split, download=download)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    key = cache_key(source, image_size, full_frame)
    base = os.path.join(cache_dir, key)
    data = _read_entry(base, image_size)  # a hit reads no image file, its headers included
    if data is None:
        frame = frame_shape(image_size, frame_aspect(source) if full_frame else 1.0)
        _build_entry(source, image_size, frame, base, progress)
        _remove_stale(cache_dir, key)
        data = _read_entry(base, image_size)
        if data is None:
            raise DataError(f"the cache entry {base}.json written for {source.describe()} cannot be read back")
        logger.info("decoded %d images of %s into %s.u8", len(data), data.source, base)
    if data.skipped:
        logger.warning("skipped %d of %d files that could not be decoded (listed in %s.json)",
                       len(data.skipped), len(data) + len(data.skipped), base)
    return data

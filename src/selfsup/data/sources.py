"""Image sources: find out what a data path (or dataset name) holds and decode its images.

:func:`open_source` looks at a path, or a dataset name, and returns a :class:`Source`.
A source lists its images cheaply (no pixel is read), fingerprints its files for the
decode cache (names, sizes, modification times; contents are never read for that) and,
on demand, yields every image as a uint8 RGB ``(S, S, 3)`` array with its label.

Supported inputs, checked in this order for a folder ``PATH``:

* **CIFAR-10** (python format): ``cifar-10-batches-py`` with ``data_batch_1`` ..
  ``data_batch_5``, ``test_batch`` and ``batches.meta``. Each batch is a pickled dict
  whose ``data`` is ``(N, 3072)`` uint8, one row per image: the 32x32 red plane, then
  green, then blue, each row-major; ``labels`` is a list of ints and ``label_names``
  (in ``batches.meta``) names the classes. Splits: ``train``, ``test``.
* **CIFAR-100** (python format): ``cifar-100-python`` with ``train``, ``test`` and
  ``meta``; the same layout, using ``fine_labels`` and ``fine_label_names``.
* **STL-10** (binary format): ``stl10_binary`` with ``{train,test,unlabeled}_X.bin``
  (uint8 images, 3x96x96 each, every channel stored column-major), ``{train,test}_y.bin``
  (one uint8 label per image, 1..10, shifted here to 0..9) and ``class_names.txt``.
  Splits: ``train``, ``test``, ``unlabeled`` (labels -1).
* **IDX** (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``,
  each possibly gzipped (``.gz``), directly in ``PATH`` or in ``PATH/raw`` (the layout
  torchvision downloads). The header is a big-endian magic number (two zero bytes, a
  type code, the number of dimensions) followed by one big-endian uint32 per dimension.
  Grayscale images are replicated to three channels; classes are ``"0"`` .. ``"9"``.
  Splits: ``train`` (``train-*``), ``test`` (``t10k-*``).
* **Image folder** (anything else), searched recursively. The first-level sub-folder
  gives the label, as torchvision's ``ImageFolder`` does (classes sorted by name); a flat
  folder of images is unlabeled (labels -1, no classes), and images lying directly in a
  labeled folder get label -1 as well. If ``PATH/<split>`` is a folder it is used
  (``PATH/test`` for split ``test``); a folder without split sub-folders (``train``,
  ``val``, ``valid``, ``validation``, ``test``, ``unlabeled``) is taken whole as split
  ``train``. Files are read in sorted order. Only files with a PIL-readable extension
  (see :data:`IMAGE_EXTENSIONS`, any case) are images; other files, and hidden files and
  folders (name starting with ``.``), are ignored. An image file that cannot be decoded
  (corrupt, truncated, empty, not an image at all) is reported with the reason instead
  of stopping the run.

The CIFAR, STL-10 and IDX folders are also found one level down: ``PATH`` may be the
folder that holds ``cifar-10-batches-py``, ``cifar-100-python`` or ``stl10_binary``.

Dataset names (:data:`DATASET_NAMES`, case-insensitive, ``-`` may stand for ``_``):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to
  0..255), split with a fixed-seed stratified 75/25 split into ``train`` (1347) and
  ``test`` (450). Works offline.
* ``cifar10``, ``cifar100``, ``stl10``, ``mnist``, ``fashion_mnist``: read from
  ``$SELFSUP_DATA`` (default ``~/.cache/selfsup/datasets``) in torchvision's layout; when
  missing and ``download=True`` they are fetched there with ``torchvision.datasets``.

A bare name that is a dataset name is the dataset, even if a folder of that name exists
in the working directory (write ``./cifar10`` for the folder).

A split ``"a+b"`` concatenates the splits ``a`` and ``b`` (e.g. STL-10's
``"train+unlabeled"``); their class lists must agree.

Colour conversion (image files): the output is always uint8 RGB. Grayscale, palette,
CMYK, YCbCr and other modes are converted with PIL; images with an alpha channel (RGBA,
LA, PA, or a palette / grayscale / RGB image with a transparent colour) are composited
onto a white background. 16-bit grayscale (PIL modes ``I;16*``) is scaled with
``value / 257``; 32-bit integer images (mode ``I``) are kept as they are when their
maximum is at most 255, divided by 257 when it is at most 65535 and scaled to their
maximum otherwise; float images (mode ``F``) are taken as 0..1 when their maximum is at
most 1 and as 0..255 otherwise. EXIF orientation is applied.

Resize policy (all sources): an image whose size differs from ``image_size`` is scaled so
that its shorter side is ``image_size`` and center-cropped to a square, in one
antialiased bilinear PIL resize of the centered square box. JPEG files are decoded at a
reduced DCT scale (PIL ``draft``) when that still leaves both sides >= ``image_size``.
Images already ``image_size x image_size`` are copied unchanged.
"""
from __future__ import annotations

import abc
import functools
import gzip
import hashlib
import importlib
import logging
import os
import pickle
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger("selfsup.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATASET_NAMES = ("cifar10", "cifar100", "stl10", "mnist", "fashion_mnist", "digits")
SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test", "unlabeled")
SIZE_SAMPLE = 256  # images whose sides the automatic image size is read from


class DataError(ValueError):
    """A data path, dataset name or split that cannot be used; the message says what was expected."""


class Item(NamedTuple):
    """One input of a source: a decoded image with its label, or the reason it could not be decoded."""

    file: str
    label: int
    image: np.ndarray | None  # uint8 (S, S, 3), None when the file could not be decoded
    error: str | None  # why the file could not be decoded, None when it was


# --------------------------------------------------------------------------- images

def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to a uint8 RGB ``(H, W, 3)`` array (see module doc)."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img, dtype=np.float64)
        peak = float(values.max(initial=0.0))
        if mode.startswith("I;16"):
            values = values / 257.0
        elif mode == "F":
            values = values * 255.0 if peak <= 1.0 else values
        elif peak > 65535:
            values = values * (255.0 / peak)
        elif peak > 255:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:]
        rgb = (rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def fit_frame(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Scale an ``(H, W, 3)`` uint8 image to cover ``size`` (``(height, width)``; an int: a square) keeping
    its aspect, and centre-crop it to exactly that: the largest centred box of ``size``'s aspect,
    resized."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    height, width = image.shape[:2]
    if (height, width) == (out_h, out_w):
        return image
    scale = min(width / out_w, height / out_h)  # of the source box that becomes the output
    bw, bh = out_w * scale, out_h * scale
    left, top = (width - bw) / 2, (height - bh) / 2
    box = (left, top, left + bw, top + bh)
    resized = Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.uint8)


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Scale an ``(H, W, 3)`` uint8 image so its shorter side is ``size`` and center-crop it to ``size x size``."""
    return fit_frame(image, size)


def decode_image(path: str, size: int | tuple[int, int]) -> np.ndarray:
    """Decode an image file into a uint8 RGB ``(size, size, 3)`` array (``size`` = ``(height, width)``:
    that frame; :func:`fit_frame`); raises if it cannot be decoded."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as img:
        img.draft(None, (out_w, out_h))  # JPEG only: decode at a reduced scale when large enough
        img.load()
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation tag says the pixels are rotated/flipped
            img = ImageOps.exif_transpose(img)
        return fit_frame(to_rgb(img), size)


# --------------------------------------------------------------------------- sources

def _stat_fingerprint(entries: list[tuple[str, int, int]]) -> str:
    """Hash of (name, size, mtime_ns) triples."""
    digest = hashlib.sha256()
    for name, size, mtime_ns in entries:
        digest.update(f"{name}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _file_stats(paths: list[str]) -> list[tuple[str, int, int]]:
    stats = []
    for path in paths:
        st = os.stat(path)
        stats.append((path, st.st_size, st.st_mtime_ns))
    return stats


class Source(abc.ABC):
    """A split of a dataset whose images can be listed cheaply and decoded on demand.

    Attributes: ``kind`` (format name, e.g. ``"imagefolder"``, ``"cifar10"``), ``path``
    (absolute folder the split is read from, or a pseudo path for built-in data),
    ``split`` and ``classes`` (class names, index = label; ``[]`` when unlabeled).
    """

    kind: str

    def __init__(self, path: str, split: str, classes: list[str]):
        self.path = path
        self.split = split
        self.classes = classes

    def describe(self) -> str:
        """Human-readable description, e.g. ``"cifar10:/data/cifar-10-batches-py[train]"``."""
        return f"{self.kind}:{self.path}[{self.split}]"

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Cheap hash that changes when the underlying files change (names, sizes, mtimes)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of inputs (images, including ones that may fail to decode)."""

    @abc.abstractmethod
    def iter_images(self, image_size: int | tuple[int, int]) -> Iterator[Item]:
        """Yield one :class:`Item` per input, in a deterministic order, resized to ``image_size`` (a
        side, or a ``(height, width)`` frame; :func:`fit_frame`)."""

    @abc.abstractmethod
    def image_sides(self, sample: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
        """``(width, height)`` of up to ``sample`` of the inputs, evenly spaced, without decoding their
        pixels (what :func:`selfsup.data.auto_image_size` reads)."""


def _evenly(n: int, k: int) -> list[int]:
    return sorted({i * n // k for i in range(k)}) if n > k else list(range(n))


class ImageFolderSource(Source):
    """A folder of image files; see the module docstring for labels and ordering."""

    kind = "imagefolder"

    def __init__(self, path: str, split: str, entries: list[tuple[str, int, int]], classes: list[str]):
        super().__init__(path, split, classes)
        self.entries = entries  # (path relative to self.path, size, mtime_ns), sorted
        index = {name: i for i, name in enumerate(classes)}
        self.labels = [index[rel.split(os.sep, 1)[0]] if os.sep in rel else -1 for rel, _, _ in entries]

    def describe(self) -> str:
        return f"{self.kind}:{self.path}"

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def image_sides(self, sample: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
        sides = []
        for i in _evenly(len(self.entries), sample):
            try:
                with Image.open(os.path.join(self.path, self.entries[i][0])) as img:  # the header only
                    sides.append(tuple(int(s) for s in img.size))
            except Exception:  # noqa: BLE001 - an unreadable file is skipped at decode time, and here
                continue
        return sides

    def iter_images(self, image_size: int) -> Iterator[Item]:
        """In file order; decoded by ``decode_workers()`` processes when there are enough files (the
        order, and so the cache, is the same either way)."""
        jobs = [(os.path.join(self.path, rel), label, image_size) for (rel, _, _), label in zip(self.entries, self.labels)]
        workers = decode_workers(len(jobs))
        if workers <= 1:
            yield from map(_decode_item, jobs)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        done = 0
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for item in pool.map(_decode_item, jobs, chunksize=64):
                    yield item
                    done += 1
        except BrokenProcessPool as e:  # e.g. a script without `if __name__ == "__main__":` (each spawned
            # worker re-runs it and dies starting its own pool): a multiprocessing.Pool would respawn them forever
            logger.warning("the decode workers died (%s); decoding the remaining %d images in this process. A "
                           "script that calls selfsup should do so under `if __name__ == \"__main__\":`, since "
                           "spawned workers import it", e, len(jobs) - done)
            yield from map(_decode_item, jobs[done:])


PARALLEL_DECODE_MIN_FILES = 2000  # fewer files decode faster in this process than a pool starts


def decode_workers(n_files: int) -> int:
    """Processes decoding an image folder: ``$SELFSUP_DECODE_WORKERS`` if set, else one per CPU core
    (at most 8) for ``PARALLEL_DECODE_MIN_FILES`` files or more, else 1 (this process)."""
    env = os.environ.get("SELFSUP_DECODE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise DataError(f"SELFSUP_DECODE_WORKERS must be an integer, got {env!r}") from None
    if n_files < PARALLEL_DECODE_MIN_FILES:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _decode_item(job: tuple[str, int, int]) -> Item:
    path, label, image_size = job
    try:
        return Item(path, label, decode_image(path, image_size), None)
    except Exception as exc:  # any decoder failure means "skip this file", never a crash
        return Item(path, label, None, f"{type(exc).__name__}: {exc}")


class ArraySource(Source):
    """A source whose split is stored as arrays (CIFAR, STL-10, IDX, digits).

    Subclasses implement :meth:`_load`, which returns an NHWC uint8 array-like (possibly a
    lazy memmap view), int labels and one identifier per image. It runs only when the
    images are actually needed (not on a decode-cache hit).
    """

    def __init__(self, path: str, split: str, classes: list[str], data_files: list[str]):
        super().__init__(path, split, classes)
        self.data_files = data_files

    def fingerprint(self) -> str:
        return _stat_fingerprint(_file_stats(self.data_files))

    @abc.abstractmethod
    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Return (images NHWC uint8, labels int, identifiers)."""

    @functools.cached_property
    def _data(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels, ids = self._load()
        if not (len(images) == len(labels) == len(ids)):
            raise DataError(f"{self.describe()}: {len(images)} images but {len(labels)} labels")
        return images, labels, ids

    def __len__(self) -> int:
        return len(self._data[1])

    native_side: int | None = None  # the side of the dataset's square images, when known without loading it

    def image_sides(self, sample: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
        if self.native_side:
            return [(self.native_side, self.native_side)]
        images = self._data[0]
        return [(int(images.shape[2]), int(images.shape[1]))] * min(len(images), sample)

    def iter_images(self, image_size: int, chunk: int = 1024) -> Iterator[Item]:
        images, labels, ids = self._data
        for start in range(0, len(labels), chunk):
            block = np.ascontiguousarray(images[start:start + chunk])
            for offset, image in enumerate(block):
                i = start + offset
                yield Item(ids[i], int(labels[i]), fit_frame(image, image_size), None)


def _ids(name: str, count: int) -> list[str]:
    return [f"{name}#{i}" for i in range(count)]


def _require_split(split: str, available: tuple[str, ...], where: str) -> None:
    if split not in available:
        raise DataError(f"split '{split}' is not available for {where}; available splits: {', '.join(available)}")


def _require_files(paths: list[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{what}: missing file(s) {', '.join(missing)}")


# -- CIFAR

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR batches are pickles; refuse anything else)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
    """Load a CIFAR pickle (Python 2 or 3) into a dict with str keys."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR batch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch file (expected a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class CifarSource(ArraySource):
    """CIFAR-10 / CIFAR-100 in the python (pickled batches) format."""

    native_side = 32
    LAYOUT = {  # kind: (split files, meta file, label key, class-name key)
        "cifar10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "batches.meta", "labels", "label_names"),
        "cifar100": ({"train": ["train"], "test": ["test"]}, "meta", "fine_labels", "fine_label_names"),
    }

    def __init__(self, kind: str, folder: str, split: str):
        self.kind = kind
        splits, meta, self._label_key, names_key = self.LAYOUT[kind]
        _require_split(split, tuple(splits), f"{kind} in {folder}")
        batches = [os.path.join(folder, name) for name in splits[split]]
        meta_path = os.path.join(folder, meta)
        _require_files([meta_path, *batches], f"{kind} folder {folder}")
        meta_dict = _load_pickle(meta_path)
        if names_key not in meta_dict:
            raise DataError(f"{meta_path} has no '{names_key}' entry")
        super().__init__(folder, split, _names(meta_dict[names_key]), [meta_path, *batches])
        self._batches = batches

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels, ids = [], [], []
        for path in self._batches:
            batch = _load_pickle(path)
            if "data" not in batch or self._label_key not in batch:
                raise DataError(f"{path} lacks 'data' or '{self._label_key}'")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[self._label_key], dtype=np.int64))
            ids += _ids(os.path.basename(path), len(data))
        return np.concatenate(images), np.concatenate(labels), ids


# -- STL-10

class StlSource(ArraySource):
    """STL-10 binary format (96x96 images, channels stored column-major)."""

    kind = "stl10"
    native_side = 96
    SPLITS = ("train", "test", "unlabeled")
    IMAGE_BYTES = 3 * 96 * 96

    def __init__(self, folder: str, split: str):
        _require_split(split, self.SPLITS, f"stl10 in {folder}")
        self._x = os.path.join(folder, f"{split}_X.bin")
        self._y = None if split == "unlabeled" else os.path.join(folder, f"{split}_y.bin")
        files = [self._x] + ([self._y] if self._y else [])
        _require_files(files, f"stl10 folder {folder}")
        size = os.path.getsize(self._x)
        if size == 0 or size % self.IMAGE_BYTES:
            raise DataError(f"{self._x}: size {size} is not a positive multiple of 3*96*96 bytes")
        names_path = os.path.join(folder, "class_names.txt")
        if os.path.isfile(names_path):
            with open(names_path, encoding="utf-8") as f:
                classes = [line.strip() for line in f if line.strip()]
            files.append(names_path)
        else:
            classes = [str(i) for i in range(10)]
        super().__init__(folder, split, classes, files)

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        raw = np.memmap(self._x, dtype=np.uint8, mode="r")
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # (N, C, col, row) -> (N, row, col, C)
        if self._y is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        else:
            labels = np.fromfile(self._y, dtype=np.uint8).astype(np.int64) - 1
        return images, labels, _ids(os.path.basename(self._x), len(images))


# -- IDX (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx_header(path: str) -> tuple[str, tuple[int, ...], int]:
    """Parse an IDX header: returns (numpy big-endian dtype, shape, header length in bytes)."""
    try:
        with _idx_open(path) as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES or magic[3] == 0:
                raise DataError(f"{path} is not an IDX file (bad magic number {magic.hex()})")
            dims = f.read(4 * magic[3])
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(dims) != 4 * magic[3]:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return _IDX_TYPES[magic[2]], shape, 4 + len(dims)


def read_idx(path: str) -> np.ndarray:
    """Read a whole IDX file (optionally gzipped) into an array of its declared shape."""
    dtype, shape, offset = read_idx_header(path)
    with _idx_open(path) as f:
        f.seek(offset)
        data = f.read()
    count = int(np.prod(shape))
    if len(data) < count * np.dtype(dtype).itemsize:
        raise DataError(f"{path}: truncated IDX data (expected {count} values of shape {shape})")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _idx_file(folder: str, stem: str) -> str:
    plain = os.path.join(folder, stem)
    return plain if os.path.isfile(plain) else plain + ".gz"


class IdxSource(ArraySource):
    """MNIST-style IDX files: uint8 (N, H, W) images and (N,) labels."""

    kind = "idx"

    def __init__(self, folder: str, split: str):
        _require_split(split, tuple(_IDX_PREFIX), f"IDX data in {folder}")
        prefix = _IDX_PREFIX[split]
        self._images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        self._labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        _require_files([self._images, self._labels], f"IDX folder {folder}")
        dtype, shape, _ = read_idx_header(self._images)
        if dtype != ">u1" or len(shape) != 3:
            raise DataError(f"{self._images}: expected uint8 images of shape (N, H, W), got {dtype} {shape}")
        _, label_shape, _ = read_idx_header(self._labels)
        if len(label_shape) != 1 or label_shape[0] != shape[0]:
            raise DataError(f"{self._labels}: expected {shape[0]} labels, header says shape {label_shape}")
        super().__init__(folder, split, [str(i) for i in range(10)], [self._images, self._labels])
        self.native_side = int(shape[1]) if shape[1] == shape[2] else None

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        gray = read_idx(self._images)
        labels = read_idx(self._labels).astype(np.int64)
        images = np.repeat(gray[:, :, :, None], 3, axis=3)
        name = os.path.basename(self._images).removesuffix(".gz")
        return images, labels, _ids(name, len(gray))


# -- scikit-learn digits

class DigitsSource(ArraySource):
    """scikit-learn's bundled 8x8 digits with a fixed stratified 75/25 train/test split."""

    kind = "digits"
    native_side = 8
    SPLITS = ("train", "test")

    def __init__(self, split: str):
        _require_split(split, self.SPLITS, "the built-in 'digits' dataset")
        super().__init__("sklearn.datasets.load_digits", split, [str(i) for i in range(10)], [])

    def describe(self) -> str:
        return f"digits[{self.split}]"

    def fingerprint(self) -> str:
        import sklearn

        return f"sklearn-{sklearn.__version__}"

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        target = digits.target.astype(np.int64)
        train, test = train_test_split(np.arange(len(target)), test_size=0.25, random_state=0, stratify=target)
        index = np.sort(train if self.split == "train" else test)
        gray = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        return np.repeat(gray[:, :, :, None], 3, axis=3), target[index], [f"digits#{i}" for i in index]


# -- concatenation of splits

class ConcatSource(Source):
    """Several splits of one dataset read one after the other (split ``"a+b"``)."""

    def __init__(self, parts: list[Source]):
        named = [p.classes for p in parts if p.classes]
        if any(c != named[0] for c in named):
            raise DataError(f"cannot concatenate {' + '.join(p.describe() for p in parts)}: their classes differ")
        paths = {p.path for p in parts}
        path = paths.pop() if len(paths) == 1 else os.path.commonpath([p.path for p in parts])
        super().__init__(path, "+".join(p.split for p in parts), named[0] if named else [])
        self.kind = parts[0].kind
        self.parts = parts

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(f"{p.path}\0{p.split}\0{p.fingerprint()}" for p in self.parts).encode()).hexdigest()

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def image_sides(self, sample: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
        return [s for p in self.parts for s in p.image_sides(max(1, sample // len(self.parts)))]

    def iter_images(self, image_size: int) -> Iterator[Item]:
        for part in self.parts:
            yield from part.iter_images(image_size)


# --------------------------------------------------------------------------- detection

def _scan_images(root: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """List image files under ``root`` recursively: ((relpath, size, mtime_ns) sorted, examples of other files)."""
    entries, others, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                if len(others) < 3:
                    others.append(os.path.relpath(path, root))
                continue
            try:
                st = os.stat(path)
            except OSError:  # dangling symlink: let the decoder report it
                st = os.lstat(path)
            entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    entries.sort(key=lambda e: e[0].split(os.sep))
    return entries, others


def _open_image_folder(root: str, split: str) -> ImageFolderSource:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        present = [d for d in SPLIT_FOLDER_NAMES if os.path.isdir(os.path.join(root, d))]
        if present or split != "train":
            available = ", ".join(present) if present else "train (the whole folder; it has no split sub-folders)"
            raise DataError(f"split '{split}' is not available in image folder {root}; available splits: {available}")
        folder = root
    entries, others = _scan_images(folder)
    if not entries:
        found = f"; other files found: {', '.join(others)}" if others else ""
        raise DataError(f"no image files found under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}){found}")
    classes = sorted({rel.split(os.sep, 1)[0] for rel, _, _ in entries if os.sep in rel})
    loose = sum(1 for rel, _, _ in entries if os.sep not in rel)
    if classes and loose:
        logger.warning("%d image(s) directly in %s are outside the class folders; they get label -1", loose, folder)
    return ImageFolderSource(folder, split, entries, classes)


def _has_idx(folder: str) -> bool:
    return os.path.isdir(folder) and any(n.endswith(("-idx3-ubyte", "-idx3-ubyte.gz")) for n in os.listdir(folder))


def _detect(folder: str) -> tuple[str, str] | None:
    """Which array format ``folder`` holds, itself: (kind, folder), or None."""
    isfile = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if isfile("batches.meta"):
        return "cifar10", folder
    if isfile("meta") and (isfile("train") or isfile("test")):
        return "cifar100", folder
    if any(isfile(f"{s}_X.bin") for s in StlSource.SPLITS):
        return "stl10", folder
    if _has_idx(folder):
        return "idx", folder
    return None


_CONTAINERS = ("cifar-10-batches-py", "cifar-100-python", "stl10_binary", "raw")


def _detect_below(root: str) -> tuple[str, str] | None:
    """Detect an array format in ``root`` or in one of its well-known sub-folders."""
    found = _detect(root)
    if found:
        return found
    below = [f for f in (_detect(os.path.join(root, c)) for c in _CONTAINERS if os.path.isdir(os.path.join(root, c))) if f]
    if len(below) > 1:
        raise DataError(f"{root} holds several datasets ({', '.join(f[1] for f in below)}); pass one of these folders")
    return below[0] if below else None


def _open_folder(root: str, split: str) -> Source:
    found = _detect_below(root)
    if found is None:
        return _open_image_folder(root, split)
    kind, folder = found
    if kind in CifarSource.LAYOUT:
        return CifarSource(kind, folder, split)
    if kind == "stl10":
        return StlSource(folder, split)
    return IdxSource(folder, split)


# --------------------------------------------------------------------------- named datasets

_DOWNLOADS = {  # name: (folder under the data root, torchvision class, constructor keywords)
    "cifar10": ("cifar-10-batches-py", "CIFAR10", {"train": True}),
    "cifar100": ("cifar-100-python", "CIFAR100", {"train": True}),
    "stl10": ("stl10_binary", "STL10", {"split": "train"}),
    "mnist": (os.path.join("MNIST", "raw"), "MNIST", {"train": True}),
    "fashion_mnist": (os.path.join("FashionMNIST", "raw"), "FashionMNIST", {"train": True}),
}


def data_root() -> str:
    """Folder holding named datasets: ``$SELFSUP_DATA`` or ``~/.cache/selfsup/datasets``."""
    return os.path.abspath(os.environ.get("SELFSUP_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "selfsup", "datasets"))


def _dataset_name(spec: str) -> str | None:
    name = spec.strip().lower().replace("-", "_")
    aliases = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100", "stl_10": "stl10"}
    name = aliases.get(name, name)
    return name if name in DATASET_NAMES else None


def _named_folder(name: str, download: bool) -> str:
    """Folder of a named dataset under :func:`data_root`, downloading it with torchvision if asked."""
    root = data_root()
    sub, cls, kwargs = _DOWNLOADS[name]
    folder = os.path.join(root, sub)
    if _detect(folder):
        return folder
    manual = (f"download it with download=True (uses torchvision.datasets.{cls}), set SELFSUP_DATA to a folder "
              f"that already holds it, or pass the path of a local copy instead of the name (--data PATH)")
    if not download:
        raise DataError(f"dataset '{name}' was not found in {root} (expected {folder}); {manual}")
    logger.info("downloading %s into %s with torchvision", name, root)
    try:
        datasets = importlib.import_module("torchvision.datasets")
        getattr(datasets, cls)(root, download=True, **kwargs)
    except Exception as exc:
        raise DataError(f"downloading '{name}' into {root} failed ({type(exc).__name__}: {exc}); "
                        f"download it by hand into {folder}, or pass the path of a local copy (--data PATH)") from exc
    if not _detect(folder):
        raise DataError(f"downloaded '{name}' but {folder} does not hold the expected files")
    return folder


# --------------------------------------------------------------------------- entry point

TEST_SPLIT_NAMES = ("test", "val", "valid", "validation")  # what evaluation tests on, in this order


def default_test_split(spec: str) -> str:
    """The split evaluation tests on when none is named: ``test``, except for an image folder without
    ``test/``: the first of ``val/``, ``valid/``, ``validation/`` it has, or, when it has no split
    sub-folders at all (a plain class-folder tree), the whole folder (split ``train``, so the test
    images must then come from another folder than the training ones). Datasets and array folders
    (CIFAR, STL-10, IDX, digits) have a ``test`` split."""
    if _dataset_name(spec):
        return "test"
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isdir(path) or _detect_below(path) is not None:
        return "test"  # open_source says what is wrong with the path, or it is an array dataset
    present = [d for d in SPLIT_FOLDER_NAMES if os.path.isdir(os.path.join(path, d))]
    for name in TEST_SPLIT_NAMES:
        if name in present:
            return name
    if present:
        raise DataError(f"{path} has no test split (test/, val/, valid/ or validation/); it has "
                        f"{', '.join(present)}: name one with --test-split, or hold out part of the training "
                        f"images with --test-fraction")
    return "train"


def open_source(spec: str, split: str = "train", download: bool = False) -> Source:
    """Open a dataset split from a path or a dataset name (see the module docstring).

    Raises :class:`DataError` for a missing path, a folder without images, an unknown
    dataset name or an unavailable split; no image is decoded here.
    """
    if not isinstance(split, str) or not split or any(not part for part in split.split("+")):
        raise DataError(f"invalid split {split!r}: expected a name such as 'train' or 'train+unlabeled'")
    if "+" in split:
        return ConcatSource([open_source(spec, part, download) for part in split.split("+")])
    name = _dataset_name(spec)
    if name == "digits":
        return DigitsSource(split)
    if name:
        return _open_folder(_named_folder(name, download), split)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        if os.sep not in spec and "/" not in spec:
            raise DataError(f"'{spec}' is neither an existing path nor a known dataset name "
                            f"(known names: {', '.join(DATASET_NAMES)})")
        raise DataError(f"data path does not exist: {path}")
    if not os.path.isdir(path):
        raise DataError(f"{path} is a file; expected a folder of images or a dataset folder "
                        f"(CIFAR python batches, STL-10 binary, MNIST IDX files)")
    return _open_folder(path, split)

"""The training resolution that fits the data, when ``--image-size`` does not say (``data.image_size=0``).

The rule, from the median shorter side ``s`` of (up to 256, evenly spaced) images, read from their
headers without decoding:

* **tiny images stay tiny**: ``s <= 64`` trains at ``s`` rounded up to a multiple of 8, at least 16
  (CIFAR's 32 px at 32, MNIST's 28 at 32, the 8 px digits at 16);
* **larger images and photos** train at ``min(s, cap)`` rounded down to a multiple of 16, where the
  cap is what the device can afford: **224 px on a GPU** (ImageNet's size), **96 px elsewhere** (a
  CPU: a ResNet-18 step costs about the pixel count, 5.4x more at 224 than at 96; STL-10 is 96).

Every image is then decoded once at that size into the cache. The choice and its reason are logged,
and written to ``config.yaml``, so that a resumed run keeps it.

**The whole frame.** The cache keeps each image's frame, not only its centre square: for a collection
whose median aspect (width / height) is not square (beyond 5%), every image is decoded to a
``side x round(side * aspect)`` frame (landscape; ``round(side / aspect) x side`` portrait) at the
collection's median aspect, clamped to 1:2..2:1 (:func:`frame_shape`). Evaluation and the pretext
tasks that need a square see its centre square (``CachedImages.images``, a view); the random-resized
crops of the joint-embedding methods sample the whole frame (``CachedImages.frames``), as torchvision's
``RandomResizedCrop`` does on ImageNet's full images. Images of another aspect than the collection's
are centre-cropped to it.
"""

from __future__ import annotations

from .sources import DataError, Source

TINY_MAX = 64  # up to this shorter side, images train at their own size
CAP = {"cuda": 224}  # the largest automatic size per device type
CPU_CAP = 96  # on a CPU (and any other device)


def auto_image_size(source: Source, device_type: str = "cpu") -> tuple[int, str]:
    """``(side, reason)``: the training side for ``source`` by the module's rule, and one sentence
    saying why. Raises :class:`DataError` when no image's size can be read."""
    sides = source.image_sides()
    if not sides:
        raise DataError(f"{source.describe()}: no image's size could be read to choose an image size; "
                        f"pass --image-size N")
    shorter = sorted(min(w, h) for w, h in sides)
    s = shorter[len(shorter) // 2]
    seen = f"the median shorter side of {len(sides)} of its images is {s} px"
    if s <= TINY_MAX:
        side = max(16, -(-s // 8) * 8)
        return side, f"{seen}: small images train at their own size (a multiple of 8, at least 16)"
    cap = CAP.get(device_type, CPU_CAP)
    side = max(TINY_MAX, min(s, cap) // 16 * 16)
    capped = f", capped at {cap} px on {'a GPU' if device_type == 'cuda' else 'a CPU'}" if s > cap else ""
    return side, f"{seen}: larger images train at their side rounded down to a multiple of 16{capped}"


SQUARE_TOLERANCE = 0.05  # median aspects within 5% of 1 keep square frames
ASPECT_RANGE = (0.5, 2.0)  # the frame's aspect is clamped to this


def frame_aspect(source: Source) -> float:
    """The aspect (width / height) of the frames ``source`` is decoded to: its images' median, to 2
    decimals, clamped to :data:`ASPECT_RANGE`; 1.0 when within :data:`SQUARE_TOLERANCE` of square or
    when no image's size can be read."""
    sides = source.image_sides()
    if not sides:
        return 1.0
    aspects = sorted(w / h for w, h in sides if w > 0 and h > 0)
    if not aspects:
        return 1.0
    a = aspects[len(aspects) // 2]
    if abs(a - 1.0) <= SQUARE_TOLERANCE:
        return 1.0
    return round(min(max(a, ASPECT_RANGE[0]), ASPECT_RANGE[1]), 2)


def frame_shape(side: int, aspect: float) -> tuple[int, int]:
    """``(height, width)`` of a frame whose shorter side is ``side`` at ``aspect`` (width / height)."""
    if aspect >= 1.0:
        return side, max(side, int(round(side * aspect)))
    return max(side, int(round(side / aspect))), side

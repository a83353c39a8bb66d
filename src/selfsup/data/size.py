"""The training resolution that fits the data, when ``--image-size`` does not say (``data.image_size=0``).

The rule, from the median shorter side ``s`` of (up to 256, evenly spaced) images, read from their
headers without decoding:

* **tiny images stay tiny**: ``s <= 64`` trains at ``s`` rounded up to a multiple of 8, at least 16
  (CIFAR's 32 px at 32, MNIST's 28 at 32, the 8 px digits at 16);
* **larger images and photos** train at ``min(s, cap)`` rounded down to a multiple of 16, where the
  cap is what the device can afford: **224 px on a GPU** (ImageNet's size), **96 px elsewhere** (a
  CPU: a ResNet-18 step costs about the pixel count, 5.4x more at 224 than at 96; STL-10 is 96).

Every image is then decoded once at that size (shorter side resized, centre crop) into the cache.
The choice and its reason are logged, and written to ``config.yaml``, so that a resumed run keeps it.
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
    where = "a GPU" if device_type == "cuda" else f"a {device_type.upper()}" if device_type != "cpu" else "a CPU"
    capped = f", capped at {cap} px on {where}" if s > cap else ""
    return side, f"{seen}: larger images train at their side rounded down to a multiple of 16{capped}"

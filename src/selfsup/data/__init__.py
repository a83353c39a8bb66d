"""Datasets: detect a data path's format, decode it once into a memory-mapped uint8 cache.

Use :func:`load_images` (``spec`` is a path or one of :data:`DATASET_NAMES`); see
:mod:`selfsup.data.sources` for the supported formats and the colour/resize policy and
:mod:`selfsup.data.cache` for the cache layout.
"""
from .cache import CachedImages, default_cache_dir, load_images
from .size import auto_image_size
from .sources import DATASET_NAMES, DataError, Source, default_test_split, open_source

__all__ = ["CachedImages", "DATASET_NAMES", "DataError", "Source", "auto_image_size", "default_cache_dir",
           "default_test_split", "load_images", "open_source"]

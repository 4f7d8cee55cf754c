"""Pixel depth: every image defectscan reads (files, Zarr arrays, 12-bit camera words) becomes 8-bit here.

16-bit data is brought to 8 bits by its own range: x / 257 for full 16-bit words, x / (2^bits - 1) x 255
for a recorded bit depth (9..16, e.g. a 12-bit camera's data in 16-bit words).
"""

from __future__ import annotations

import numpy as np


def as_uint8(image: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """8-bit pixels from uint8 or uint16 input; `bit_depth` (9..16) for data of fewer bits in 16-bit words (12-bit cameras)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.dtype(">u2"):  # a big-endian store's pixels (Zarr v2 allows them)
        image = image.astype(np.uint16)
    if image.dtype == np.uint16:
        top = 2**bit_depth - 1 if bit_depth else 65535
        # Bits above the depth are noise in a 12-bit word: clipped, so they cannot wrap around.
        return np.round(np.minimum(image, top) * (255.0 / top)).astype(np.uint8)
    raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")

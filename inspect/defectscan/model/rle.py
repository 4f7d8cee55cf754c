"""Run-length encoding of defect masks, as stored in `defects.rle`.

Format: the defect's mask cropped to its bounding box (bbox_y1 - bbox_y0 rows, bbox_x1 - bbox_x0
columns) is flattened row by row; the text lists each run of defect pixels as "start length"
pairs, space separated, with 0-based starts in that flattened crop. Example: a 2x3 box whose
mask is [[1, 1, 0], [0, 1, 1]] encodes as "0 2 4 2".
"""

from __future__ import annotations

import numpy as np

from defectscan.errors import DataError


def encode(mask: np.ndarray) -> str:
    flat = np.asarray(mask, dtype=bool).ravel()
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{start} {end - start}" for start, end in zip(starts, ends, strict=True))


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The boolean mask of `shape` (the bounding box's height, width) that `rle` encodes."""
    size = shape[0] * shape[1]
    try:
        numbers = np.array(rle.split(), dtype=np.int64)
    except ValueError:
        raise DataError(f"RLE {rle[:40]!r}: expected space-separated integers") from None
    if numbers.size % 2 or (numbers < 0).any():
        raise DataError(f"RLE {rle[:40]!r}: expected pairs of non-negative 'start length' numbers")
    starts, lengths = numbers[::2], numbers[1::2]
    if (starts + lengths > size).any():
        raise DataError(f"RLE {rle[:40]!r}: runs go past the {shape[0]}x{shape[1]} bounding box")
    flat = np.zeros(size, dtype=bool)
    for start, length in zip(starts, lengths, strict=True):
        flat[start : start + length] = True
    return flat.reshape(shape)

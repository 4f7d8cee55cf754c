"""Training samples from a Zarr image set with a `labels` array (the shared image-set contract).

A stack `images` (N, H, W) gives N samples; a strip (H, W) is cut into non-overlapping tiles of
`tile` x `tile` (the remainder at the right and bottom edges is left out). `labels` has the same
shape, uint8, 0 = no defect and k = the k-th name of the group attribute `classes`.
Only the samples being read are loaded, so a set larger than memory trains fine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscan.data.dataset import LabelledImages
from defectscan.errors import DataError
from defectscan.model.preprocess import as_uint8


def read_zarr(store: str | Path, tile: int = 512) -> LabelledImages:
    import zarr

    try:
        group = zarr.open_group(str(store), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise DataError(f"{store}: not a Zarr group: {exc}") from None
    names = set(group.array_keys())
    for needed in ("images", "labels"):
        if needed not in names:
            raise DataError(f"{store}: Zarr group has no array '{needed}'; training needs both 'images' and 'labels'")
    images, labels = group["images"], group["labels"]
    if images.shape != labels.shape:
        raise DataError(f"{store}: 'labels' has shape {labels.shape}, expected the shape of 'images' {images.shape}")
    if images.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{store}: 'images' has dtype {images.dtype}, expected uint8 or uint16")
    if labels.dtype != np.uint8:
        raise DataError(f"{store}: 'labels' has dtype {labels.dtype}, expected uint8")
    classes = group.attrs.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{store}: group attribute 'classes' must be a non-empty list of class names, got {classes!r}")

    if images.ndim == 3:
        count, height, width = images.shape
        windows = [(i, slice(None), slice(None)) for i in range(count)]
        keys = [f"{i}" for i in range(count)]
        shape = (height, width)
    elif images.ndim == 2:
        height, width = images.shape
        if height < tile or width < tile:
            raise DataError(f"{store}: strip {height}x{width} is smaller than one {tile}x{tile} tile")
        windows = [
            (None, slice(y, y + tile), slice(x, x + tile))
            for y in range(0, height - tile + 1, tile)
            for x in range(0, width - tile + 1, tile)
        ]
        keys = [f"y{w[1].start}x{w[2].start}" for w in windows]
        shape = (tile, tile)
    else:
        raise DataError(f"{store}: 'images' has {images.ndim} dimensions, expected (N, H, W) or (H, W)")

    def read(array, window):
        index, rows, cols = window
        return np.asarray(array[index, rows, cols] if index is not None else array[rows, cols])

    def load(position: int) -> tuple[np.ndarray, np.ndarray]:
        window = windows[position]
        label = read(labels, window)
        if label.max(initial=0) > len(classes):
            raise DataError(f"{store}: labels of sample {keys[position]} hold class {int(label.max())}, but only {len(classes)} classes are named")
        return as_uint8(read(images, window)), label

    # Which samples hold a defect: read per sample, label chunks are small and compress well.
    defective = [bool(read(labels, w).any()) for w in windows]
    return LabelledImages(name=str(store), keys=keys, classes=list(classes), shape=shape, loader=load, defective=defective)

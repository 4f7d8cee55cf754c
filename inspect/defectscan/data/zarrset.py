"""Training samples from a Zarr image set with a `labels` array (the shared image-set contract).

A stack `images` (N, H, W) gives N samples; a strip (H, W) is cut into non-overlapping tiles of
`tile` x `tile` (the remainder at the right and bottom edges is left out). `labels` has the same
shape, uint8, 0 = no defect and k = the k-th name of the group attribute `classes`.
Only the samples being read are loaded, so a set larger than memory trains fine. Images padded
at ingest keep their zero padding (labelled 0: no defect).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscan.data.dataset import LabelledImages
from defectscan.data.pixels import as_uint8
from defectscan.errors import DataError


def read_zarr(store: str | Path, tile: int = 512, bit_depth: int | None = None, fill_missing_chunks: bool = False) -> LabelledImages:
    """Samples of the image set at `store` (a path or fsspec URL), opened through data/imageset.py; 16-bit pixels
    scaled to 8 bits as inspection scales them (`bit_depth`: the bits they hold, as registered)."""
    from defectscan.data.imageset import CLASSES_ATTR, IMAGES, LABELS, describe, missing_chunks, open_group, open_images, read_keys, resolve_uri

    uri = resolve_uri(store)
    group = open_group(uri)
    describe(group, uri, IMAGES)  # refuses a store still being written, as registration does
    images = open_images(group, uri, IMAGES)
    if LABELS not in group:
        raise DataError(f"{uri}: Zarr group has no array '{LABELS}'; training needs both '{IMAGES}' and '{LABELS}'")
    labels = group[LABELS]
    if images.shape != labels.shape:
        raise DataError(f"{uri}: '{LABELS}' has shape {labels.shape}, expected the shape of '{IMAGES}' {images.shape}")
    if images.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{uri}: '{IMAGES}' has dtype {images.dtype}, expected uint8 or uint16")
    if labels.dtype != np.uint8:
        raise DataError(f"{uri}: '{LABELS}' has dtype {labels.dtype}, expected uint8")
    classes = group.attrs.get(CLASSES_ATTR)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{uri}: group attribute '{CLASSES_ATTR}' must be a non-empty list of class names, got {classes!r}")
    missing = missing_chunks(images) if not fill_missing_chunks else None
    if missing:
        # Zarr would read them as black images with their labels: training on pictures that are not there.
        raise DataError(f"{uri}: '{IMAGES}': {missing.describe()} (a writer that leaves out chunks equal to the fill value: "
                        "data.fill_missing_chunks: true)")
    store = uri

    if images.ndim == 3:
        count, height, width = images.shape
        windows = [(i, slice(None), slice(None)) for i in range(count)]
        try:
            keys = read_keys(group, count)
        except DataError as exc:
            raise DataError(f"{store}: {exc}") from None
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
        return as_uint8(read(images, window), bit_depth), read(labels, window)

    # Which samples hold a defect, and that their classes are named: read per sample, label chunks are small and
    # compress well. Checked here, not in `load`: there it surfaced mid-training as a TensorFlow traceback.
    highest = [int(read(labels, w).max(initial=0)) for w in windows]
    wrong = [(key, top) for key, top in zip(keys, highest, strict=True) if top > len(classes)]
    if wrong:
        listed = ", ".join(f"{key} (class {top})" for key, top in wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise DataError(f"{store}: labels of sample(s) {listed} name a class beyond the {len(classes)} in attribute 'classes' ({', '.join(classes)})")
    defective = [top > 0 for top in highest]
    # The bit depth is in the name: a training cache file is named after it (model/feed.py), and the pixels differ.
    name = str(store) if bit_depth is None else f"{store} ({bit_depth}-bit)"
    return LabelledImages(name=name, keys=keys, classes=list(classes), shape=shape, loader=load, defective=defective)

"""Pixels behind the query results: an image from its Zarr image set, its stored score map, defect masks.

The score map is the pipeline's uint8 array (probability x 255), (N, C, H, W) for a stack and
(C, H, W) for a strip, indexed by the image's position (pipeline/outputs.py). Defect masks are
decoded from their run-length text (model/rle.py) into boolean arrays the size of their box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectscan.db.queries import ImageSource
from defectscan.errors import DataError
from defectscan.model import rle


@dataclass(frozen=True)
class DefectMask:
    """One defect's mask inside its half-open bounding box (y0, x0, y1, x1), in image pixels."""

    id: int
    class_index: int
    class_name: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    max_score: float


def _open_array(uri: str, path: str, what: str):
    import zarr

    try:
        return zarr.open_array(uri, path=path, mode="r")
    except Exception as exc:  # zarr raises several types for a missing or foreign store
        raise DataError(f"{uri}: cannot open the {what} array '{path}': {type(exc).__name__}: {exc}") from None


def _window(window: tuple[int, int, int, int] | None, source: ImageSource) -> tuple[slice, slice]:
    y0, x0, y1, x1 = window or (0, 0, source.height, source.width)
    return slice(y0, y1), slice(x0, x1)


class PixelsGone(DataError):
    """An image's chunk is not stored (deleted since registration): the image is not there, the store is."""


def load_image(source: ImageSource, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The image's pixels (2-D, padding removed), or the half-open `window` (y0, x0, y1, x1) of them."""
    array = _open_array(source.uri, source.array_path, "image")
    rows, cols = _window(window, source)
    try:
        pixels = np.asarray(array[source.position, rows, cols] if source.kind == "stack" else array[rows, cols])
    except Exception as exc:
        raise DataError(f"{source.uri}: cannot read image {source.position} of '{source.array_path}': {type(exc).__name__}: {exc}") from None
    if not source.fill_missing:
        # Zarr reads a chunk that is not stored as the fill value: a black picture drawn (or exported to train on)
        # as if it were the image, where inspection records the image as an error.
        from defectscan.data.imageset import vanished_chunks

        block = pixels[None] if source.kind == "stack" else pixels
        origin = (source.position, rows.start, cols.start) if source.kind == "stack" else (rows.start, cols.start)
        try:
            gone = vanished_chunks(array, block, origin)
        except Exception as exc:  # the store's own failure while looking
            raise DataError(f"{source.uri}: cannot check the chunks of image {source.position}: {type(exc).__name__}: {exc}") from None
        if gone:
            raise PixelsGone(f"{source.uri}: image {source.position} of '{source.array_path}' is not stored: {gone.describe()}")
    return pixels


def load_scores(source: ImageSource, window: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
    """The stored (C, H, W) uint8 score map of the inspection, or None when it has none (an error row)."""
    if not source.mask_uri or not source.mask_array:
        return None
    array = _open_array(source.mask_uri, source.mask_array, "score")
    rows, cols = _window(window, source)
    try:
        scores = array[source.position, :, rows, cols] if source.kind == "stack" else array[:, rows, cols]
    except Exception as exc:
        raise DataError(f"{source.mask_uri}: cannot read the scores of image {source.position} from '{source.mask_array}': {exc}") from None
    return np.asarray(scores)


def defect_masks(defects: list[dict]) -> list[DefectMask]:
    """Decode the `rle` of defect records (as `get_image`/`get_defect` return them) into masks."""
    masks = []
    for d in defects:
        y0, x0, y1, x1 = d["bbox"] if "bbox" in d else (d["bbox_y0"], d["bbox_x0"], d["bbox_y1"], d["bbox_x1"])
        try:
            mask = rle.decode(d["rle"], (y1 - y0, x1 - x0))
        except DataError as exc:
            raise DataError(f"defect {d['id']}: {exc}") from None
        masks.append(DefectMask(d["id"], d["class_index"], d["class"], (y0, x0, y1, x1), mask, d["max_score"]))
    return masks


def draw(source: ImageSource, defects: list[dict], window: tuple[int, int, int, int] | None = None, *, labels: bool = True):
    """The stored image (the part in `window`, when given) tinted by its score map, with the defects' contours and labels."""
    from defectscan.report.overlay import render

    origin = window[:2] if window else (0, 0)
    return render(load_image(source, window), defect_masks(defects), load_scores(source, window), origin=origin, labels=labels)

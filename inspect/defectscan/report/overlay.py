"""Pictures of defects: an image with its score map tinted in, defect contours and labels drawn on top.

Library functions shared by `defectscan images show --overlay`, `defects show --crop` and the
reports. Contours are the outer pixels of each defect's stored mask, drawn last in their class
colour (`class_color`), so every pixel of a contour has exactly that colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectscan.errors import DataError

# Pure, saturated colours that the red score tint and the gray image never produce.
PALETTE = ((0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 128, 255), (255, 128, 0))
TINT = np.array((255, 0, 0), dtype=np.float32)
# Scores below this (of 255) are not tinted: the map is near zero almost everywhere.
TINT_FROM = 32
CROP_MARGIN = 16


def class_color(class_index: int) -> tuple[int, int, int]:
    return PALETTE[class_index % len(PALETTE)]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A 2-D uint8/uint16 image as (H, W, 3) uint8; 16-bit images are scaled by their own maximum."""
    pixels = np.asarray(image)
    if pixels.ndim != 2:
        raise DataError(f"expected a 2-D gray image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        top = float(pixels.max()) or 1.0
        pixels = np.clip(np.rint(pixels.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(pixels[:, :, None], 3, axis=2)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the box's edge counts as outside)."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = padded[1:-1, 1:-1]
    interior = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner & ~interior


def render(
    image: np.ndarray,
    defects: Sequence,
    scores: np.ndarray | None = None,
    *,
    origin: tuple[int, int] = (0, 0),
    labels: bool = True,
):
    """The overlay as a PIL RGB image.

    `image` is the picture (or a window of it whose top-left pixel is `origin` in image
    coordinates); `defects` have `bbox` (y0, x0, y1, x1, image coordinates), `mask`, `class_index`,
    `class_name`, `id`, `max_score` (report/pixels.DefectMask); `scores` is the (C, H, W) uint8
    map over the same window, tinted red by its maximum over classes.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    rgb = to_rgb(image).astype(np.float32)
    height, width = rgb.shape[:2]
    if scores is not None:
        if scores.shape[-2:] != (height, width):
            raise DataError(f"score map of shape {scores.shape} does not cover the {height}x{width} image")
        peak = scores.max(axis=0).astype(np.float32)
        alpha = np.where(peak >= TINT_FROM, peak / 255.0 * 0.6, 0.0)[:, :, None]
        rgb = rgb * (1 - alpha) + TINT * alpha
    picture = PILImage.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")

    oy, ox = origin
    if labels:
        draw = ImageDraw.Draw(picture)
        for d in defects:
            y0, x0, y1, _ = d.bbox
            text = f"#{d.id} {d.class_name} {d.max_score:.2f}"
            top = y0 - oy - 11 if y0 - oy >= 11 else y1 - oy + 1
            draw.text((max(0, x0 - ox), top), text, fill=class_color(d.class_index))

    # Contours last, so no label or tint covers them.
    pixels = np.asarray(picture).copy()
    for d in defects:
        y0, x0, _, _ = d.bbox
        ys, xs = np.nonzero(outline(d.mask))
        ys, xs = ys + y0 - oy, xs + x0 - ox
        inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        pixels[ys[inside], xs[inside]] = class_color(d.class_index)
    return PILImage.fromarray(pixels, "RGB")


def crop_window(bbox: tuple[int, int, int, int], shape: tuple[int, int], margin: int = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The box grown by `margin` pixels on each side, clipped to the image `shape` (height, width)."""
    y0, x0, y1, x1 = bbox
    return max(0, y0 - margin), max(0, x0 - margin), min(shape[0], y1 + margin), min(shape[1], x1 + margin)


def save_png(picture, path: str | Path) -> Path:
    path = Path(path)
    try:
        picture.save(path, format="PNG")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot write the PNG: {exc}") from None
    return path

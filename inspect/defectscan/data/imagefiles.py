"""Decode image files (PNG, TIFF, BMP, JPEG) into 2-D grayscale arrays.

Rule for colour: RGB(A) images become gray with ITU-R BT.601 luma, Y = 0.299 R + 0.587 G + 0.114 B
(what Pillow's "L" conversion does), alpha dropped. 8-bit images stay uint8, 16-bit stay uint16.
A TIFF's photometric interpretation is applied (min-is-white inverted, a palette's colours looked
up); CMYK is refused. Masks and labels (read_mask) keep a palette image's indices, which label
tools write as class numbers, and count only the pixels not transparent.
Pillow's decompression-bomb limit is lifted: these are a plant's own files, and a line-scan strip
is often larger than its 179-megapixel default.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from defectscan.errors import DataError, first_line

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")

_LUMA = np.array([0.299, 0.587, 0.114])


def open_pillow(path: str | Path):
    """PIL.Image.open without the decompression-bomb limit (see the module's docstring)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image.open(path)


def read_image(path: str | Path) -> np.ndarray:
    """Return the image at `path` as a (H, W) uint8 or uint16 array, or raise DataError naming it."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        array = _read_tiff(path, palette="colours")
    else:
        array = _read_pillow(path)
    return _to_gray(path, array)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask or label image as a (H, W) array: a palette image's indices (label tools write class numbers
    so), else its gray values; pixels a file marks transparent are 0 (editors keep a colour, often white,
    under them, which read alone marked the whole image)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        array = _read_tiff(path, palette="indices")
        if array.ndim == 3 and array.shape[-1] in (2, 4):  # gray or colour with alpha: only what is drawn counts
            gray = _to_gray(path, array[..., :-1] if array.shape[-1] == 4 else array[..., 0])
            return np.where(array[..., -1] > 0, gray, 0).astype(gray.dtype)
        return _to_gray(path, array)
    with _pillow(path) as image:
        gray = _to_gray(path, _pillow_array(path, image, palette="indices"))
        if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
            return gray
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return np.where(alpha > 0, gray, 0).astype(gray.dtype)


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    if size == 0:
        raise DataError(f"{path}: empty file")


def read_labelled(image_path: Path, label_path: Path | None, problems, what: str = "label") -> tuple[np.ndarray, np.ndarray | None] | None:
    """An image and its label (or mask) of the same size; a bad file is recorded in `problems` (a ProblemLog) and None returned."""
    try:
        image = read_image(image_path)
        label = read_mask(label_path) if label_path is not None else None
    except DataError as exc:
        bad, _, reason = str(exc).partition(": ")
        if bad not in (str(image_path), str(label_path)):
            bad, reason = str(label_path or image_path), str(exc)
        problems.add(bad, f"unreadable: {reason}")
        return None
    if label is not None and label.shape != image.shape:
        problems.add(label_path, f"wrong size: {what} {label.shape[0]}x{label.shape[1]} for image {image.shape[0]}x{image.shape[1]}")
        return None
    return image, label


def wide_colour_png(path: Path) -> bool:
    """A 16-bit RGB(A) or gray+alpha PNG: Pillow decodes those to 8 bits, so they are refused rather than cut."""
    with open(path, "rb") as handle:
        header = handle.read(26)
    # The signature, then IHDR: bit depth at byte 24, colour type (2 RGB, 4 gray + alpha, 6 RGBA) at byte 25.
    return header[:8] == b"\x89PNG\r\n\x1a\n" and len(header) == 26 and header[24] == 16 and header[25] in (2, 4, 6)


WIDE_COLOUR_PNG = ("16-bit colour or gray+alpha PNG: not read (it would lose its low 8 bits); save it as 16-bit grayscale PNG "
                   "(no alpha) or as TIFF")


def _read_pillow(path: Path, palette: str = "colours") -> np.ndarray:
    with _pillow(path) as image:
        return _pillow_array(path, image, palette)


@contextmanager
def _pillow(path: Path):
    """The file opened and decoded by Pillow; any failure inside, the decoder's or a caller's, is this file's, named."""
    from PIL import UnidentifiedImageError

    if wide_colour_png(path):
        raise DataError(f"{path}: {WIDE_COLOUR_PNG}")
    try:
        with open_pillow(path) as image:
            image.load()
            yield image
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (format not recognised)") from None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (zlib, struct, memory) is this file's problem
        raise DataError(f"{path}: corrupt or truncated image: {first_line(exc)}") from None


def _pillow_array(path: Path, image, palette: str) -> np.ndarray:
    """The pixels of an opened image: 16-bit kept, a palette's colours (or, for a mask, its indices), colour as RGB(A)."""
    if image.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.uint16)
    if image.mode == "I":
        return _int32_to_uint16(path, np.asarray(image))
    if image.mode == "P" and palette == "indices":
        indices = np.asarray(image)
        colours = np.asarray(image.getpalette() or [], dtype=np.int32).reshape(-1, 3)
        if not _gray_entries(colours, indices):
            return indices
        # A black-and-white mask saved as a palette image (quantize, pngquant) may list white first:
        # its gray values, not its indices, say which pixels are marked.
        return np.asarray(image.convert("L"))
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "LA", "1"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    return np.asarray(image)


def _read_tiff(path: Path, palette: str) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            page = series.pages[0]
            photometric = int(page.photometric)
            if photometric not in _PHOTOMETRIC_READ:
                raise DataError(f"{path}: {page.photometric.name} TIFF is not supported; expected grayscale, RGB or palette")
            array = series.asarray()
            colormap = page.colormap
            bits = int(page.bitspersample)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (zlib, codecs, memory) is this file's problem
        raise DataError(f"{path}: corrupt or not a TIFF image: {first_line(exc)}") from None
    # Colour stored plane by plane ("separate"): samples first, turned to samples last as for interleaved.
    if array.ndim == 3 and series.axes.startswith("S"):
        array = np.moveaxis(array, 0, -1)
    if photometric == _MINISWHITE:
        # Inverted within the sample's own range: a 1-bit file (bool) too, and 12-bit data in 16-bit words.
        if array.dtype == np.bool_:
            return ~array
        return (2**bits - 1 - array).astype(array.dtype) if array.dtype.kind == "u" else array
    if photometric == _PALETTE and colormap is not None and (palette == "colours" or _gray_entries(colormap.T, array)):
        # TIFF colour maps hold 16-bit values; an 8-bit palette image becomes 8-bit RGB as Pillow gives it.
        rgb = np.moveaxis(colormap[:, array], 0, -1)
        if array.dtype != np.uint8:
            return rgb.astype(np.uint16)
        return (rgb >> 8 if colormap.max() > 255 else rgb).astype(np.uint8)
    return array


def _gray_entries(colours: np.ndarray, indices: np.ndarray) -> bool:
    """Whether every palette entry (rows of R, G, B) the image uses is a gray."""
    used = np.unique(indices)
    used = used[used < len(colours)]
    entries = colours[used]
    return bool(len(entries)) and bool((entries == entries[:, :1]).all())


# TIFF photometric interpretations read: min-is-white, min-is-black, RGB, palette, YCbCr (decoded to RGB).
_MINISWHITE, _PALETTE = 0, 3
_PHOTOMETRIC_READ = (0, 1, 2, 3, 6)


def _int32_to_uint16(path: Path, array: np.ndarray) -> np.ndarray:
    if array.min() < 0 or array.max() > np.iinfo(np.uint16).max:
        raise DataError(f"{path}: 32-bit pixel values outside 0..65535 are not supported")
    return array.astype(np.uint16)


def _to_gray(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        gray = np.rint(array[..., :3].astype(np.float64) @ _LUMA)
        array = gray.astype(array.dtype)
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D grayscale or RGB image, got an array of shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: pixel type {array.dtype} is not supported; expected 8- or 16-bit images")
    return np.ascontiguousarray(array)

"""What the model expects as input: the one definition of pixel scaling and size padding.

The network sees one channel scaled as x / 127.5 - 1 from 8-bit pixels (the reference recipe);
16-bit images are first brought to 8 bits by data/pixels.py, so one model serves all. Height and
width are padded up to a multiple of 16 (mirrored, edge pixel repeated: numpy's "symmetric",
TensorFlow's SYMMETRIC), and outputs are cropped back.
"""

from __future__ import annotations

import numpy as np

from defectscan.data.pixels import as_uint8

SCALE = 127.5
OFFSET = -1.0
SIZE_MULTIPLE = 16
INPUT_SPEC = {
    "channels": 1,
    "dtype": "uint8",
    "accepts": ["uint8", "uint16"],
    "scaling": "x / 127.5 - 1 (uint16: x / 257 first, or x / (2^bits - 1) x 255 for a recorded bit depth)",
    "multiple_of": SIZE_MULTIPLE,
    "layout": "NHWC",
}


def to_model_input(images: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1) uint8/uint16 -> (N, H, W, 1) float32 in -1..1."""
    images = as_uint8(np.asarray(images), bit_depth)
    if images.ndim == 3:
        images = images[..., None]
    return images.astype(np.float32) / SCALE + OFFSET


def scale_tensor(images):
    """The same scaling on a TensorFlow uint8 tensor (used by tf.data and the SavedModel)."""
    import tensorflow as tf

    return tf.cast(images, tf.float32) / SCALE + OFFSET


def padded_size(size: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -(-size // multiple) * multiple


def pad_to_multiple(images: np.ndarray, multiple: int = SIZE_MULTIPLE) -> tuple[np.ndarray, tuple[int, int]]:
    """Mirror-pad (N, H, W, C) to multiples of `multiple`; returns the array and the original (H, W)."""
    height, width = images.shape[1:3]
    pad_h, pad_w = padded_size(height, multiple) - height, padded_size(width, multiple) - width
    if pad_h or pad_w:
        images = np.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    return images, (height, width)


def predict_probabilities(model, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Probabilities (N, H, W, classes) float32 for raw images of any size (padded, then cropped back)."""
    import tensorflow as tf

    x, (height, width) = pad_to_multiple(to_model_input(images))
    forward = tf.function(lambda batch: model(batch, training=False))
    out = [forward(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out)[:, :height, :width, :]

"""What the model expects as input: the one definition of pixel scaling and size padding.

The network sees one channel scaled as x / 127.5 - 1 from 8-bit pixels (the reference recipe);
16-bit images are first brought to 8 bits by data/pixels.py, so one model serves all. Height and
width are padded up to the model's input multiple (16 for the UNets here; mirrored, edge pixel
repeated: numpy's "symmetric", TensorFlow's SYMMETRIC), and outputs are cropped back. What one model
version accepts is its `InputContract`, saved with it in the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from defectscan.data.pixels import as_uint8

SCALE = 127.5
OFFSET = -1.0
# The UNets built here pool four times; a model's own contract says its multiple.
SIZE_MULTIPLE = 16
# Every 8-bit pixel's model input, computed once: numpy, a tf.data pipeline and a worker's compiled
# program look values up in this one table, so they agree to the bit (a compiler may rewrite x / 127.5 as
# a multiplication by its reciprocal, one ulp off, enough to move a score across a uint8 step).
SCALED = np.arange(256, dtype=np.float32) / np.float32(SCALE) + np.float32(OFFSET)


@dataclass(frozen=True)
class InputContract:
    """What one model version accepts, saved with it (the registry's `input_spec`) and read by everything
    that pads, tiles or checks a halo: workers, tile planning, evaluation, export.

    `multiple_of`: height and width are padded to multiples of it (2 ** poolings);
    `receptive_radius`: pixels on each side of an output pixel that can change it, so the least halo
    a tile needs for tiled output to equal whole-image output (None: not recorded, not checked).
    """

    multiple_of: int = SIZE_MULTIPLE
    receptive_radius: int | None = None
    channels: int = 1
    dtype: str = "uint8"
    accepts: tuple[str, ...] = ("uint8", "uint16")
    scaling: str = "x / 127.5 - 1 (uint16: x / 257 first, or x / (2^bits - 1) x 255 for a recorded bit depth)"
    layout: str = "NHWC"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accepts": list(self.accepts)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> InputContract:
        """A registry row's `input_spec`; keys it lacks (older rows) take the defaults."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in (spec or {}).items() if k in known}
        if "accepts" in given:
            given["accepts"] = tuple(given["accepts"])
        return cls(**given)

    def pad(self, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return pad_to_multiple(images, self.multiple_of)

    def padded(self, size: int) -> int:
        return padded_size(size, self.multiple_of)

    def tiling_problem(self, tile_size: int, halo: int) -> str | None:
        """Why tiles of `tile_size` with `halo` would not reproduce whole-image output, or None."""
        if tile_size % self.multiple_of or halo % self.multiple_of:
            return f"tile_size ({tile_size}) and halo ({halo}) must be multiples of {self.multiple_of}, the model's input multiple"
        if self.receptive_radius is not None and halo < self.receptive_radius:
            least = padded_size(self.receptive_radius, self.multiple_of)
            return f"halo ({halo}) is less than the model's receptive radius ({self.receptive_radius} pixels): tile borders would show; use {least} or more"
        return None


def contract_of(model) -> InputContract:
    """The contract of a loaded Keras model (a UNet of this package knows its own; others get the defaults)."""
    own = getattr(model, "input_contract", None)
    return own if isinstance(own, InputContract) else InputContract()


def to_model_pixels(images: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1) uint8/uint16 -> (N, H, W, 1) uint8: what is scaled, here or inside a compiled program."""
    images = as_uint8(np.asarray(images), bit_depth)
    return images[..., None] if images.ndim == 3 else images


def to_model_input(images: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1) uint8/uint16 -> (N, H, W, 1) float32 in -1..1."""
    return SCALED[to_model_pixels(images, bit_depth)]


def scale_ops(images):
    """The same scaling with keras.ops on a uint8 tensor of the running backend (inside a worker's compiled
    program: the float32 input is made where the model runs, a quarter of the bytes travel there)."""
    import keras

    return keras.ops.take(keras.ops.convert_to_tensor(SCALED), keras.ops.cast(images, "int32"))


def scale_tensor(images):
    """The same scaling on a TensorFlow uint8 tensor (used by tf.data and the SavedModel)."""
    import tensorflow as tf

    return tf.gather(tf.constant(SCALED), tf.cast(images, tf.int32))


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

    x, (height, width) = contract_of(model).pad(to_model_input(images))
    forward = tf.function(lambda batch: model(batch, training=False))
    out = [forward(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out)[:, :height, :width, :]

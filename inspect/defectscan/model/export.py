"""Model files: checksums, safe loading, and the SavedModel for serving.

A `.keras` file is what defectscan registers and runs (loaded with safe_mode=True, so a file
cannot execute code). The SavedModel is for other serving stacks: its `serve` signature takes
raw uint8 images (batch, H, W, 1) of any size, scales them like training did, pads H and W up
to the model's input multiple and crops the probabilities back to (batch, H, W, classes).
`serve_uint16` takes 16-bit camera images and the bits they hold (16, or 12 for a 12-bit camera)
and brings them to 8 bits as inspection does (data/pixels.as_uint8). Called from Python, `serve`
turns a uint16 array into uint8 by wrapping its values around, without a word.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from defectscan.errors import ModelError

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: is a folder; expected a .keras model file") from None
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ModelError(f"{path}: model file does not match its registered checksum: sha256 recorded {expected}, file has {actual}")


def load_model(path: str | Path, expected_sha256: str | None = None):
    """Load a `.keras` model with safe_mode; with `expected_sha256` the file is checked first."""
    import keras

    from defectscan.model import unet, views  # noqa: F401  (registers the custom layers and the view average)

    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"{path}: expected a .keras model file")
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    elif not path.is_file():
        raise ModelError(f"{path}: model file does not exist")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # noqa: BLE001  (Keras raises ValueError, TypeError, zipfile and OS errors alike)
        raise ModelError(f"{path}: cannot load the model: {exc}") from None


def export_saved_model(model, out_dir: str | Path) -> Path:
    """Write a SavedModel with a `serve` (and `serving_default`) signature on uint8 images."""
    import keras
    import tensorflow as tf

    from defectscan.model.preprocess import contract_of, scale_tensor

    if isinstance(model, (str, Path)):
        model = load_model(model)
    multiple = contract_of(model).multiple_of

    def serve(images):
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        pad_h = (multiple - height % multiple) % multiple
        pad_w = (multiple - width % multiple) % multiple
        x = tf.pad(scale_tensor(images), [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], mode="SYMMETRIC")
        probabilities = model(x, training=False)
        return probabilities[:, :height, :width, :]

    def serve_uint16(images, bit_depth):
        # as_uint8: bits above the depth clipped (noise in a 12-bit word), then 0..2**depth-1 to 0..255, rounded
        top = tf.cast(tf.bitwise.left_shift(1, bit_depth) - 1, tf.float32)
        scaled = tf.round(tf.minimum(tf.cast(images, tf.float32), top) * (255.0 / top))
        return serve(tf.cast(scaled, tf.uint8))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec((None, None, None, 1), tf.uint8, name="images")])
    archive.add_endpoint("serve_uint16", serve_uint16, input_signature=[
        tf.TensorSpec((None, None, None, 1), tf.uint16, name="images"), tf.TensorSpec((), tf.int32, name="bit_depth")])
    out_dir = Path(out_dir)
    archive.write_out(str(out_dir), verbose=False)
    return out_dir


def load_saved_model(path: str | Path):
    """The exported SavedModel; call `.serve(uint8 images)`."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the SavedModel: {exc}") from None

"""Small real models and image sets for the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL_FILTERS = (4, 4, 8, 8, 16)


def save_small_unet(path: Path, num_classes: int = 1, seed: int = 0) -> Path:
    """A real TinyUNet with narrow layers (same depth, same receptive field), saved as .keras."""
    from defectscan.model.unet import build_model

    model = build_model(num_classes=num_classes, filters=SMALL_FILTERS, seed=seed)
    model.build((None, None, None, 1))
    model.save(path)
    return path


def textured(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 20, size=shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def save_threshold_model(path: Path) -> Path:
    """A real Keras model whose output is known: probability ~1 where pixels are above ~230, ~0 elsewhere."""
    import keras

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="threshold")
    model = keras.Model(inputs, conv(inputs))
    # x = pixel / 127.5 - 1: pixel 230 -> 0.804, and 40 * 0.804 - 32 = 0.16 -> p = 0.54
    conv.set_weights([np.full((1, 1, 1, 1), 40.0, np.float32), np.full((1,), -32.0, np.float32)])
    model.save(path)
    return path


def write_stack(path: Path, images: np.ndarray, **attrs) -> Path:
    """A Zarr v3 image set in the documented layout: one chunk per image, no sharding."""
    import zarr

    group = zarr.open_group(path, mode="w")
    array = group.create_array("images", shape=images.shape, chunks=(1, *images.shape[1:]), dtype=images.dtype)
    array[...] = images
    group.attrs.update({"lot": "L1", "line": "A", "product": "P", "camera": "C1", **attrs})
    return path


def write_strip(path: Path, image: np.ndarray, chunk: int = 128, **attrs) -> Path:
    import zarr

    group = zarr.open_group(path, mode="w")
    array = group.create_array("images", shape=image.shape, chunks=(chunk, chunk), dtype=image.dtype)
    array[...] = image
    group.attrs.update({"lot": "L1", "line": "A", "product": "P", "camera": "C1", **attrs})
    return path


def register(factory, path: Path):
    from defectscan.data.register import register_store

    with factory() as session:
        return register_store(session, str(path)).image_set


def add_model(factory, path: Path, name: str = "threshold", version: str = "1", classes=("defect",), threshold: float = 0.5):
    from defectscan.db.schema import Model
    from defectscan.model.export import file_sha256

    with factory.begin() as session:
        model = Model(name=name, version=version, uri=str(path), sha256=file_sha256(str(path)), architecture="test",
                      input_spec={"channels": 1}, classes=list(classes), threshold=threshold)
        session.add(model)
    return model


def square_images(n: int, size: int = 64, defects: dict[int, tuple[int, int, int]] | None = None, seed: int = 0) -> np.ndarray:
    """`n` textured images; defects maps position -> (y, x, side) of a bright square."""
    images = np.clip(textured((n, size, size), seed=seed), 0, 200).astype(np.uint8)
    for position, (y, x, side) in (defects or {}).items():
        images[position, y : y + side, x : x + side] = 250
    return images


def corrupt_chunk(store: Path, position: int, array: str = "images") -> bytes:
    """Overwrite the stored chunk of image `position` (a v3 stack chunked one image per chunk) with bytes
    no codec decodes, as a failing disk or an interrupted copy leaves it; returns the good bytes, to restore."""
    chunk = Path(store) / array / "c" / str(position) / "0" / "0"
    assert chunk.is_file(), f"{chunk}: no such chunk (is the store chunked one image per chunk?)"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not zstd at all")
    return good


def restore_chunk(store: Path, position: int, good: bytes, array: str = "images") -> None:
    (Path(store) / array / "c" / str(position) / "0" / "0").write_bytes(good)

"""Stores written by another Zarr implementation (tensorstore, Google's C++ one), as a plant's acquisition
system would: no group metadata above the array, a store that is one array, Zarr v2 with either key
separator, v3 with several images per chunk, a partial last chunk, sharding, uint16. Each is registered
and inspected end to end, its verdicts equal to those of the same pixels in a store defectscan wrote."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from defectscan.config import load_settings
from defectscan.data.register import register_store, validate_image_set
from defectscan.db.schema import Image, Inspection
from defectscan.pipeline.run import inspect_image_sets

from pipeline_helpers import add_model, save_threshold_model, square_images, write_stack

ts = pytest.importorskip("tensorstore", reason="tensorstore is a test dependency (the [dev] extra)")

N = 10
DEFECTS = {1: (5, 5, 6), 9: (20, 20, 8)}


def _images(dtype: str = "uint8") -> np.ndarray:
    images = square_images(N, size=48, defects=DEFECTS)
    return images.astype(np.uint16) * 257 if dtype == "uint16" else images


def _v3(path, images, chunk: int, sharded: bool = False) -> None:
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}]
    codecs = inner
    chunk_shape = [chunk, *images.shape[1:]]
    if sharded:
        codecs = [{"name": "sharding_indexed", "configuration": {"chunk_shape": [1, *images.shape[1:]], "codecs": inner,
                   "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "create": True, "delete_existing": True,
            "metadata": {"shape": list(images.shape), "data_type": str(images.dtype), "codecs": codecs,
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}}}}
    ts.open(spec).result()[...] = images


def _v2(path, images, chunk: int, separator: str) -> None:
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}, "create": True, "delete_existing": True,
            "metadata": {"shape": list(images.shape), "dtype": np.dtype(images.dtype).str, "chunks": [chunk, *images.shape[1:]],
                         "dimension_separator": separator, "compressor": {"id": "zlib", "level": 1}}}
    ts.open(spec).result()[...] = images


WRITERS = {
    # name: (write the store under a folder, location to register, --array)
    "v3 array below a folder without group metadata, 4 images per chunk": (lambda root, im: _v3(root / "acq.zarr" / "images", im, 4), "acq.zarr", "images"),
    "v3 store that is one array": (lambda root, im: _v3(root / "cam0.zarr", im, 3), "cam0.zarr", "images"),
    "v3 sharded, uint16": (lambda root, im: _v3(root / "s.zarr" / "cam" / "images", _as16(im), 4, sharded=True), "s.zarr", "cam/images"),
    "v2 with / keys": (lambda root, im: _v2(root / "v2.zarr" / "images", im, 3, "/"), "v2.zarr", "images"),
    "v2 with . keys": (lambda root, im: _v2(root / "v2dot.zarr" / "images", im, 1, "."), "v2dot.zarr", "images"),
    # ">u2" was refused as "dtype >u2; expected uint8 or uint16"
    "v2 big-endian uint16": (lambda root, im: _v2(root / "be.zarr" / "images", _as16(im).astype(">u2"), 2, "/"), "be.zarr", "images"),
}


def _as16(images: np.ndarray) -> np.ndarray:
    return images.astype(np.uint16) * 257


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cluster):
    """Verdicts of the same pixels in a store defectscan wrote itself."""
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, session_factory

    from pipeline_helpers import register

    folder = tmp_path_factory.mktemp("reference")
    engine = make_engine(f"sqlite:///{folder / 'db.sqlite'}")
    upgrade(engine)
    factory = session_factory(engine)
    image_set = register(factory, write_stack(folder / "own.zarr", _images()))
    model = add_model(factory, save_threshold_model(folder / "threshold.keras"))
    inspect_image_sets(factory, cluster, model, [image_set], _settings(), max_in_flight=2)
    verdicts = _verdicts(factory)
    engine.dispose()
    return verdicts


def _settings():
    return load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "2", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection


def _verdicts(factory) -> list[tuple[int, str, int]]:
    with factory() as session:
        return [tuple(r) for r in session.execute(
            select(Image.position, Inspection.verdict, Inspection.n_defects).join(Inspection, Inspection.image_id == Image.id).order_by(Image.position)
        )]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_store_written_by_tensorstore_is_registered_and_inspected(writer, factory, cluster, tmp_path, reference):
    write, location, array = WRITERS[writer]
    write(tmp_path, _images())
    with factory() as session:
        registration = register_store(session, str(tmp_path / location), array, lot="A1", line="3")
        image_set = registration.image_set
        assert (image_set.n_images, image_set.lot, image_set.kind) == (N, "A1", "stack")
        assert validate_image_set(session, image_set.id, deep=True).ok
    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    summary = inspect_image_sets(factory, cluster, model, [image_set], _settings(), max_in_flight=2)
    assert summary.status == "succeeded", summary.errors
    assert _verdicts(factory) == reference
    assert {position for position, verdict, _ in reference if verdict == "fail"} == set(DEFECTS)


def test_what_cannot_be_adopted_gets_one_line(factory, tmp_path):
    from defectscan.errors import DataError

    _v3(tmp_path / "float.zarr" / "images", _images().astype(np.float32), 4)
    with factory() as session, pytest.raises(DataError, match="float.zarr: array 'images' has dtype float32; expected uint8 or uint16"):
        register_store(session, str(tmp_path / "float.zarr"), "images")
    _v3(tmp_path / "cam1.zarr", _images(), 4)
    with factory() as session, pytest.raises(DataError, match="cam1.zarr: the store is one array; it has no array 'cam0/images' below it"):
        register_store(session, str(tmp_path / "cam1.zarr"), "cam0/images")


def test_twelve_bit_data_in_sixteen_bit_words_is_scaled_by_its_bit_depth(factory, cluster, tmp_path, reference):
    twelve_bit = _images().astype(np.uint16) * 16  # 0..4080: what a 12-bit camera stores in 16-bit words
    _v3(tmp_path / "cam12.zarr" / "images", twelve_bit, 4)
    _v3(tmp_path / "cam12-as-16.zarr" / "images", twelve_bit, 4)
    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    with factory() as session:
        twelve = register_store(session, str(tmp_path / "cam12.zarr"), "images", bit_depth=12).image_set
        sixteen = register_store(session, str(tmp_path / "cam12-as-16.zarr"), "images").image_set
    inspect_image_sets(factory, cluster, model, [twelve, sixteen], _settings(), max_in_flight=2)
    with factory() as session:
        verdicts = {
            image_set.id: [tuple(r) for r in session.execute(
                select(Image.position, Inspection.verdict, Inspection.n_defects).join(Inspection, Inspection.image_id == Image.id)
                .where(Image.image_set_id == image_set.id).order_by(Image.position))]
            for image_set in (twelve, sixteen)
        }
    assert verdicts[twelve.id] == reference
    assert all(verdict == "pass" for _, verdict, _ in verdicts[sixteen.id])  # read as 16-bit, every image is near black


def test_a_bit_depth_that_does_not_fit_is_refused(factory, tmp_path):
    from defectscan.errors import DataError

    _v3(tmp_path / "cam8.zarr" / "images", _images(), 4)
    with factory() as session, pytest.raises(DataError, match="cam8.zarr: bit depth 12 does not fit uint8 images"):
        register_store(session, str(tmp_path / "cam8.zarr"), "images", bit_depth=12)

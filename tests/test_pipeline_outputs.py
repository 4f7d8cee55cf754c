"""Where score maps go (pipeline/outputs.py): one array per image set and model version, never shared."""

from __future__ import annotations

import pytest
import zarr

from defectscan.errors import DataError
from defectscan.pipeline.outputs import prepare_output, scores_uri


def _prepare(uri: str, *, kind="stack", shape=(4, 32, 32), tile_size=32, output_dir=None):
    return prepare_output(uri, kind, shape, 1, "m", "1", images_per_file=2, images_per_shard=2, tile_size=tile_size,
                          output_dir=output_dir, attributes={"source": {"uri": uri, "array": "images"}})


def test_next_to_the_image_set_by_default():
    assert scores_uri("/data/line3/L042.zarr", None) == "/data/line3/L042.masks.zarr"
    assert scores_uri("s3://bucket/line3/L042.zarr/", None) == "s3://bucket/line3/L042.masks.zarr"


def test_two_lines_sets_of_one_name_under_output_dir_get_arrays_of_their_own(tmp_path):
    line3, line4 = str(tmp_path / "line3" / "2026-03-01.zarr"), str(tmp_path / "line4" / "2026-03-01.zarr")
    out = tmp_path / "masks"
    first, second = _prepare(line3, output_dir=out), _prepare(line4, output_dir=out)
    assert first.uri != second.uri and {first.uri, second.uri} <= {str(p) for p in out.iterdir()}
    assert all(uri.rsplit("/", 1)[-1].startswith("2026-03-01-") for uri in (first.uri, second.uri))
    zarr.open_array(first.uri, path=first.path, mode="r+")[...] = 111
    zarr.open_array(second.uri, path=second.path, mode="r+")[...] = 222
    assert (zarr.open_array(first.uri, path=first.path, mode="r")[...] == 111).all()
    assert _prepare(line3, output_dir=out) == first  # a rerun finds its own again


def test_an_array_holding_another_sets_scores_is_refused(tmp_path):
    ref = _prepare(str(tmp_path / "L1.zarr"))
    zarr.open_array(ref.uri, path=ref.path, mode="r+").attrs["source"] = {"uri": "/elsewhere/L1.zarr", "array": "images"}
    with pytest.raises(DataError, match=r"L1.masks.zarr: score array 'm/1' holds the scores of /elsewhere/L1.zarr, not of .*L1.zarr"):
        _prepare(str(tmp_path / "L1.zarr"))


def test_a_strip_array_is_reopened_only_for_tiles_that_write_whole_chunks(tmp_path):
    uri = str(tmp_path / "S1.zarr")
    _prepare(uri, kind="strip", shape=(300, 500), tile_size=128)
    assert _prepare(uri, kind="strip", shape=(300, 500), tile_size=256)  # each tile covers whole 128-pixel chunks
    with pytest.raises(DataError, match=r"stored in 128x128 tiles; inspection.tile_size 64 is not a multiple of 128: use tile_size 128"):
        _prepare(uri, kind="strip", shape=(300, 500), tile_size=64)
    with pytest.raises(DataError, match="tile_size 192 is not a multiple of 128"):
        _prepare(uri, kind="strip", shape=(300, 500), tile_size=192)

"""The image-set layout: describe/validate real Zarr stores, the checksum, chunk presence."""

from __future__ import annotations

import datetime as dt
import shutil

import numpy as np
import pytest
import zarr

from defectscan.data import imageset as layout
from defectscan.errors import DataError
from defectscan.times import iso_utc


def make_store(path, shape=(6, 32, 32), dtype="uint8", chunks=None, shards=None, zarr_format=3, name="images", attrs=None):
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    chunks = chunks or ((1, *shape[1:]) if len(shape) == 3 else shape)
    kwargs = {"shards": shards} if shards else {}
    array = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0, config={"write_empty_chunks": True}, **kwargs)
    array[...] = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 200 + 1
    group.attrs.update(attrs or {"lot": "L1"})
    return group


def describe(path, array_path="images"):
    uri = layout.resolve_uri(path)
    return layout.describe(layout.open_group(uri), uri, array_path)


def test_describe_stack_and_strip(tmp_path):
    make_store(tmp_path / "s.zarr", shape=(6, 32, 48), dtype="uint16", zarr_format=2)
    info = describe(tmp_path / "s.zarr")
    assert (info.kind, info.shape, info.dtype, info.chunks, info.zarr_format) == ("stack", (6, 32, 48), "uint16", (1, 32, 48), 2)
    assert info.n_images == 6 and info.provenance()["lot"] == "L1"

    make_store(tmp_path / "t.zarr", shape=(100, 80), chunks=(64, 64))
    strip = describe(tmp_path / "t.zarr")
    assert (strip.kind, strip.n_images, strip.image_shape) == ("strip", 1, (100, 80))


@pytest.mark.parametrize(
    ("shape", "dtype", "chunks", "expected"),
    [
        ((2, 3, 32, 32), "uint8", (1, 1, 32, 32), "rank 4"),
        ((32,), "uint8", (32,), "rank 1"),
        ((4, 32, 32), "float32", None, "dtype float32; expected uint8 or uint16"),
        ((4, 32, 32), "int16", None, "dtype int16"),
        ((4, 8, 32), "uint8", None, "8x32 pixels; the model needs at least 16x16"),
        ((4, 32, 32), "uint8", (1, 16, 32), "split each 32x32 image"),
        ((0, 32, 32), "uint8", (1, 32, 32), "holds no images"),
    ],
)
def test_describe_refuses_wrong_arrays(tmp_path, shape, dtype, chunks, expected):
    make_store(tmp_path / "bad.zarr", shape=shape, dtype=dtype, chunks=chunks)
    with pytest.raises(DataError, match=expected) as caught:
        describe(tmp_path / "bad.zarr")
    assert "bad.zarr: array 'images'" in str(caught.value)


def test_open_refuses_missing_paths_and_non_zarr(tmp_path):
    with pytest.raises(DataError, match="nowhere.zarr: does not exist"):
        layout.open_group(layout.resolve_uri(tmp_path / "nowhere.zarr"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "readme.txt").write_text("not zarr")
    with pytest.raises(DataError, match="plain: not a Zarr store"):
        layout.open_group(layout.resolve_uri(tmp_path / "plain"))
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.zarr"):
        layout.open_group(layout.resolve_uri(tmp_path / "broken.zarr"))
    make_store(tmp_path / "s.zarr")
    # Read, a store that is one array is adopted as it is (issue: other writers); writing into one is refused.
    root_array = layout.open_group(layout.resolve_uri(tmp_path / "s.zarr" / "images"))
    assert root_array.root_is_array and layout.root_array_path(root_array, "images") == ""
    with pytest.raises(DataError, match="is a Zarr array, not a group"):
        layout.open_group(layout.resolve_uri(tmp_path / "s.zarr" / "images"), mode="a")
    with pytest.raises(DataError, match=r"no array 'cam0' in the store \(arrays at its root: images\)"):
        describe(tmp_path / "s.zarr", "cam0")


def test_labels_must_match_images(tmp_path):
    group = make_store(tmp_path / "s.zarr")
    group.create_array("labels", shape=(6, 32, 32), dtype="uint16", chunks=(1, 32, 32))
    with pytest.raises(DataError, match="array 'labels' has shape .* and dtype uint16"):
        describe(tmp_path / "s.zarr")


def test_incomplete_store_is_refused(tmp_path):
    make_store(tmp_path / "s.zarr", attrs={layout.META_ATTR: {"format": layout.FORMAT_NAME, "complete": False}})
    with pytest.raises(DataError, match="marked incomplete"):
        describe(tmp_path / "s.zarr")


def test_checksum_is_stable_and_names_changes(tmp_path):
    group = make_store(tmp_path / "s.zarr")
    before = describe(tmp_path / "s.zarr")
    assert describe(tmp_path / "s.zarr").checksum == before.checksum

    group.attrs["lot"] = "L2"
    group["images"].resize((7, 32, 32))
    after = describe(tmp_path / "s.zarr")
    assert after.checksum != before.checksum
    changes = layout.layout_changes(before.layout(), after.layout())
    assert "shape [6, 32, 32] -> [7, 32, 32]" in changes
    assert "group_attrs['lot'] \"L1\" -> \"L2\"" in changes


def test_missing_chunks_unsharded_v2(tmp_path):
    make_store(tmp_path / "s.zarr", zarr_format=2)
    assert not layout.missing_chunks(zarr.open_array(str(tmp_path / "s.zarr" / "images"), mode="r"))
    (tmp_path / "s.zarr" / "images" / "4.0.0").unlink()
    missing = layout.missing_chunks(zarr.open_array(str(tmp_path / "s.zarr" / "images"), mode="r"))
    assert missing.chunks == [(4, 0, 0)] and missing.images == [4]
    assert "1 chunk(s) missing: (4, 0, 0)" == missing.describe()


def test_missing_chunks_inside_and_of_shards(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    # Zarr leaves an all-fill chunk unwritten by default: the shard index then marks it empty.
    array = group.create_array("images", shape=(10, 16, 16), dtype="uint8", chunks=(1, 16, 16), shards=(4, 16, 16), fill_value=0)
    data = np.full((10, 16, 16), 7, dtype=np.uint8)
    data[5] = 0
    array[:] = data
    assert layout.missing_chunks(array).images == [5]

    shutil.rmtree(tmp_path / "s.zarr" / "images" / "c" / "2")
    missing = layout.missing_chunks(zarr.open_array(str(tmp_path / "s.zarr" / "images"), mode="r"))
    assert missing.images == [5, 8, 9]
    assert missing.chunks == [(5, 0, 0), (8, 0, 0), (9, 0, 0)]


def test_vanished_chunks_are_the_blank_ones_not_stored_inside_and_of_shards(tmp_path):
    """What inspection asks of a block it read: only chunks that read as fill value are looked up, one by one."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    array = group.create_array("images", shape=(10, 16, 16), dtype="uint8", chunks=(1, 8, 16), shards=(4, 16, 16), fill_value=0,
                               config={"write_empty_chunks": True})
    data = np.full((10, 16, 16), 7, dtype=np.uint8)
    data[2] = 0  # stored, yet all fill value: not vanished
    array[:] = data
    assert not layout.vanished_chunks(array, array[0:10], (0, 0, 0))

    shutil.rmtree(tmp_path / "s.zarr" / "images" / "c" / "2")  # the shard of images 8 and 9
    array = zarr.open_array(str(tmp_path / "s.zarr" / "images"), mode="r")
    gone = layout.vanished_chunks(array, array[6:10], (6, 0, 0))
    assert gone.images == [8, 9] and gone.chunks == [(8, 0, 0), (8, 1, 0), (9, 0, 0), (9, 1, 0)]
    # A window that starts inside a chunk: only its chunks are looked at.
    assert layout.vanished_chunks(array, array[9, 4:16][None], (9, 4, 0)).chunks == [(9, 0, 0), (9, 1, 0)]
    assert layout.missing_chunks(array, [(1, 0, 0), (9, 1, 0)]).chunks == [(9, 1, 0)]


def test_missing_chunks_inside_shards_whose_index_is_at_the_start(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    array = group.create_array("images", shape=(8, 16, 16), dtype="uint8", chunks=(1, 16, 16),
                               shards={"shape": (4, 16, 16), "index_location": "start"}, fill_value=0)
    data = np.full((8, 16, 16), 7, dtype=np.uint8)
    data[2] = 0  # left out by the writer: the index marks it empty
    array[:] = data
    assert layout.missing_chunks(zarr.open_array(str(tmp_path / "s.zarr" / "images"), mode="r")).images == [2]


def test_missing_tiles_of_a_strip(tmp_path):
    make_store(tmp_path / "t.zarr", shape=(64, 64), chunks=(32, 32))
    (tmp_path / "t.zarr" / "images" / "c" / "1" / "0").unlink()
    missing = layout.missing_chunks(zarr.open_array(str(tmp_path / "t.zarr" / "images"), mode="r"))
    assert missing.chunks == [(1, 0)] and missing.images == []


def test_chunking_rules():
    chunks, shards = layout.stack_chunking(1000, 512, 512, "uint8")
    assert chunks == (1, 512, 512)
    assert shards[0] * 512 * 512 <= layout.SHARD_TARGET_BYTES and shards[1:] == (512, 512)
    # Images as big as a shard are chunks on their own: no sharding.
    assert layout.stack_chunking(10, 4096, 4096, "uint16") == ((1, 4096, 4096), None)
    # Never a shard longer than the stack.
    assert layout.stack_chunking(3, 64, 64, "uint8")[1] == (3, 64, 64)
    assert layout.strip_chunking(5000, 700) == (layout.STRIP_TILE, 700)


def test_times_round_trip_and_parse():
    when = dt.datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=dt.timezone.utc)
    assert layout.from_micros(layout.to_micros(when)) == when
    assert iso_utc(when) == "2026-03-01T08:00:00.123456Z"
    assert layout.parse_time("2026-03-01T09:00:00+01:00") == dt.datetime(2026, 3, 1, 8, tzinfo=dt.timezone.utc)
    assert layout.parse_time("2026-03-01T08:00:00") == dt.datetime(2026, 3, 1, 8, tzinfo=dt.timezone.utc)
    with pytest.raises(DataError, match="'yesterday' is not an ISO 8601 time"):
        layout.parse_time("yesterday")


def test_resolve_uri(tmp_path):
    assert layout.resolve_uri(f"file://{tmp_path}/a.zarr") == str(tmp_path / "a.zarr")
    assert layout.resolve_uri("s3://bucket/a.zarr/") == "s3://bucket/a.zarr"


def test_write_image_set_follows_the_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, size=(5, 32, 48), dtype=np.uint8)
    labels = (images > 200).astype(np.uint8)
    when = dt.datetime(2026, 3, 1, 8, tzinfo=dt.timezone.utc)
    uri = layout.write_image_set(tmp_path / "s.zarr", images, labels, classes=["scratch"], keys=list("abcde"), acquired_at=when, lot="L9", camera="top")
    group = layout.open_group(uri)
    info = layout.describe(group, uri)
    assert (info.kind, info.shape, info.chunks, info.has_labels, info.classes) == ("stack", (5, 32, 48), (1, 32, 48), True, ["scratch"])
    assert info.provenance() == {"lot": "L9", "line": None, "product": None, "camera": "top", "acquired_at": "2026-03-01T08:00:00Z"}
    assert info.meta["complete"] is True and info.meta["version"] == layout.FORMAT_VERSION
    np.testing.assert_array_equal(group["images"][:], images)
    np.testing.assert_array_equal(group["labels"][:], labels)
    assert layout.read_keys(group, 5) == list("abcde")
    assert layout.read_times(group, 5, default=None) == [when] * 5
    assert layout.read_sizes(group, info.shape) == [(32, 48)] * 5
    assert not layout.missing_chunks(group["images"])

    strip = layout.write_image_set(tmp_path / "t.zarr", np.ones((40, 30), dtype=np.uint16))
    assert layout.describe(layout.open_group(strip), strip).kind == "strip"


def test_write_image_set_refuses_bad_input(tmp_path):
    with pytest.raises(DataError, match="already exists"):
        (tmp_path / "s.zarr").mkdir()
        layout.write_image_set(tmp_path / "s.zarr", np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(DataError, match="expected \\(N, H, W\\) or \\(H, W\\) with H, W >= 16"):
        layout.write_image_set(tmp_path / "a.zarr", np.zeros((1, 8, 16), np.uint8))
    with pytest.raises(DataError, match="image dtype float32 is not supported"):
        layout.write_image_set(tmp_path / "b.zarr", np.zeros((1, 16, 16), np.float32))
    with pytest.raises(DataError, match="labels need class names"):
        layout.write_image_set(tmp_path / "c.zarr", np.zeros((1, 16, 16), np.uint8), np.zeros((1, 16, 16), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_store_is_described_from_its_arrays_not_stale_consolidated_metadata(tmp_path, zarr_format):
    """A writer that grows an array without consolidating again: registration would record the old shape."""
    path = str(tmp_path / "c.zarr")
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    array = group.create_array("images", shape=(4, 32, 32), chunks=(1, 32, 32), dtype="uint8", fill_value=0)
    array[:] = 5
    zarr.consolidate_metadata(path)
    array.resize((6, 32, 32))
    array[:] = 5
    assert describe(path).shape == (6, 32, 32)

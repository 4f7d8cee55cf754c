"""Registering image sets in SQLite and PostgreSQL, from the CLI and the library: ingest, adopt, validate."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pytest
import zarr
from PIL import Image
from sqlalchemy import func, select

from defectscan.exitcodes import EXIT_PARTIAL
from defectscan.data.register import register_store, validate_image_set
from defectscan.db.schema import Image as ImageRow
from defectscan.db.schema import ImageSet
from defectscan.db.session import make_engine
from defectscan.errors import DataError

from pipeline_helpers import corrupt_chunk


def counts(url) -> tuple[int, int]:
    engine = make_engine(url)
    with engine.connect() as connection:
        sets = connection.scalar(select(func.count()).select_from(ImageSet))
        images = connection.scalar(select(func.count()).select_from(ImageRow))
    engine.dispose()
    return sets, images


def acquisition_store(path, n=5, size=32, zarr_format=2, array="cam0/images", dtype="uint8", **attrs):
    """A store as an acquisition system might write it: v2, nested array path, its own attributes."""
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    root.attrs.update({"lot": "A7", "line": "2", "acquired_at": "2026-03-01T06:00:00Z", **attrs})
    rng = np.random.default_rng(0)
    array = root.create_array(array, shape=(n, size, size), dtype=dtype, chunks=(1, size, size), fill_value=0)
    array[:] = rng.integers(1, 200, size=(n, size, size)).astype(dtype)
    return root


def test_ingest_1000_pngs_from_the_cli(tmp_path, migrated_url, cli):
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    base = rng.integers(0, 255, size=(64, 64), dtype=np.uint8)
    for i in range(1000):
        Image.fromarray(np.roll(base, i, axis=1)).save(tmp_path / "in" / f"{i:04d}.png", compress_level=1)
    (tmp_path / "in" / "broken.png").write_text("not a png")
    out = tmp_path / "L1.zarr"

    result = cli("--database-url", migrated_url, "ingest", str(tmp_path / "in"), "--lot", "L1", "--line", "3", "--out", str(out))
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert "skipped " + str(tmp_path / "in" / "broken.png") + ": not an image file" in result.output
    assert "1000 images (1000x64x64 uint8)" in result.output
    assert counts(migrated_url) == (1, 1000)
    stack = zarr.open_group(str(out), mode="r")["images"]
    np.testing.assert_array_equal(stack[999], np.roll(base, 999, axis=1))

    again = cli("--database-url", migrated_url, "ingest", str(tmp_path / "in"), "--lot", "L1", "--line", "3", "--out", str(out))
    assert again.exit_code == EXIT_PARTIAL and "already holds these 1000 images; image set 1" in again.output
    assert counts(migrated_url) == (1, 1000)

    listed = json.loads(cli("--database-url", migrated_url, "imagesets", "list", "--format", "json").output)
    assert [(s["id"], s["images"], s["lot"], s["line"], s["shape"]) for s in listed] == [(1, 1000, "L1", "3", [1000, 64, 64])]
    shown = cli("--database-url", migrated_url, "imagesets", "show", str(out), "--keys", "2")
    assert shown.exit_code == 0 and "0000.png" in shown.output and "0001.png" in shown.output and "0002.png" not in shown.output
    assert "camera:        -\n" in shown.output and "None" not in shown.output  # an attribute not given
    valid = cli("--database-url", migrated_url, "imagesets", "validate", "1")
    assert valid.exit_code == 0 and "OK: 1000 images, checksum matches, every chunk stored" in valid.output


def test_register_an_external_v2_store_from_the_cli(tmp_path, migrated_url, cli):
    acquisition_store(tmp_path / "acq.zarr")
    result = cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images", "--camera", "top")
    assert result.exit_code == 0, result.output
    assert "registered image set 1" in result.output and "stack 5x32x32 uint8, 5 images" in result.output
    shown = json.loads(cli("--database-url", migrated_url, "imagesets", "show", "1", "--json").output)
    assert (shown["lot"], shown["line"], shown["camera"], shown["array"]) == ("A7", "2", "top", "cam0/images")
    assert shown["acquired_at"] == "2026-03-01T06:00:00Z"
    # Without a keys array, each image's key is its position.
    assert [i["key"] for i in shown["first_images"]] == ["0", "1", "2", "3", "4"]
    assert shown["first_images"][0]["acquired_at"] == "2026-03-01T06:00:00Z"  # as every other time: Z, not +00:00

    again = cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images")
    assert again.exit_code == 0 and "already registered, unchanged: image set 1" in again.output
    assert counts(migrated_url) == (1, 5)
    other = cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images", "--camera", "side")
    assert other.exit_code == 1 and "already registered as image set 1 with camera 'top' (given 'side')" in other.output
    # Nothing was copied: the record points at the store where it is.
    assert shown["uri"] == str(tmp_path / "acq.zarr")


def test_changed_store_is_refused_and_validate_says_what_changed(tmp_path, migrated_url, cli):
    root = acquisition_store(tmp_path / "acq.zarr")
    assert cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images").exit_code == 0
    root["cam0/images"].resize((6, 32, 32))
    root.attrs["lot"] = "B1"

    refused = cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images")
    assert refused.exit_code == 1
    assert "changed since it was registered as image set 1" in refused.output
    assert "shape [5, 32, 32] -> [6, 32, 32]" in refused.output and "group_attrs['lot'] \"A7\" -> \"B1\"" in refused.output
    valid = cli("--database-url", migrated_url, "imagesets", "validate", str(tmp_path / "acq.zarr"))
    assert valid.exit_code == 1 and "shape [5, 32, 32] -> [6, 32, 32]" in valid.output
    assert counts(migrated_url) == (1, 5)


def test_missing_chunks_are_skipped_at_register_and_found_by_validate(tmp_path, migrated_url, cli):
    acquisition_store(tmp_path / "acq.zarr", n=6)
    (tmp_path / "acq.zarr" / "cam0" / "images" / "3.0.0").unlink()
    result = cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images")
    assert result.exit_code == EXIT_PARTIAL
    assert "image 3, key 3]: chunk not stored" in result.output
    assert counts(migrated_url) == (1, 5)
    again = cli("--database-url", migrated_url, "imagesets", "register", str(tmp_path / "acq.zarr"), "--array", "cam0/images")
    assert again.exit_code == EXIT_PARTIAL and "image 3, key 3]: chunk not stored" in again.output  # still left out, still said

    # A chunk lost after registration.
    (tmp_path / "acq.zarr" / "cam0" / "images" / "5.0.0").unlink()
    valid = cli("--database-url", migrated_url, "imagesets", "validate", "1")
    assert valid.exit_code == 1
    assert "2 chunk(s) missing: (3, 0, 0), (5, 0, 0)" in valid.output and "positions 3, 5" in valid.output


def test_images_written_after_registration_are_added_with_the_given_time_and_for_sets_registered_before_it_was_recorded(tmp_path, factory):
    """A set registered --acquired-at 2026-03-01 over a store whose camera clock says 1970: the image added later took
    1970 (another since: window, another day in the rollup). A set registered before `missing_images` was recorded
    was never looked at again."""
    import datetime as dt
    import shutil

    from defectscan.data.register import MISSING_IMAGES, register_store

    given = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    for name, legacy in (("given.zarr", False), ("legacy.zarr", True)):
        root = acquisition_store(tmp_path / name, n=4)
        root.create_array("acquired_at", shape=(4,), dtype="int64")[:] = np.arange(4) * 1_000_000  # a camera clock at 1970
        chunk = tmp_path / name / "cam0" / "images" / "3.0.0"
        shutil.move(chunk, tmp_path / "aside")
        with factory() as session:
            image_set = register_store(session, str(tmp_path / name), "cam0/images", acquired_at=None if legacy else given).image_set
            if legacy:  # as registered before the positions were recorded: only the skipped list says which
                image_set.attrs = {k: v for k, v in image_set.attrs.items() if k != MISSING_IMAGES}
                session.commit()
        shutil.move(tmp_path / "aside", chunk)
        with factory() as session:
            again = register_store(session, str(tmp_path / name), "cam0/images")  # as a job's discovery registers it
            assert (again.arrived, again.problems.problems) == (1, [])
            times = dict(session.execute(select(ImageRow.position, ImageRow.acquired_at).where(ImageRow.image_set_id == image_set.id)).all())
        assert sorted(times) == [0, 1, 2, 3]
        if not legacy:
            assert set(times.values()) == {given}


def test_bad_stores_fail_with_one_clear_line(tmp_path, migrated_url, cli):
    (tmp_path / "plain").mkdir()
    acquisition_store(tmp_path / "float.zarr", dtype="float32")
    root = zarr.open_group(str(tmp_path / "rank.zarr"), mode="w")
    root.create_array("images", shape=(2, 2, 32, 32), dtype="uint8", chunks=(1, 1, 32, 32))
    cases = {
        str(tmp_path / "nowhere.zarr"): "nowhere.zarr: does not exist",
        str(tmp_path / "plain"): "plain: not a Zarr store",
        str(tmp_path / "float.zarr"): "has dtype float32; expected uint8 or uint16",
        str(tmp_path / "rank.zarr"): "has rank 4",
    }
    for url, message in cases.items():
        array = "cam0/images" if "float" in url else "images"
        result = cli("--database-url", migrated_url, "imagesets", "register", url, "--array", array)
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.startswith("Error: ")
    assert counts(migrated_url) == (0, 0)


def test_register_strip_and_refuse_missing_tiles(tmp_path, session):
    root = zarr.open_group(str(tmp_path / "strip.zarr"), mode="w")
    strip = root.create_array("images", shape=(96, 64), dtype="uint16", chunks=(32, 32), fill_value=0)
    strip[:] = 7
    registration = register_store(session, str(tmp_path / "strip.zarr"), lot="S1")
    image_set = registration.image_set
    assert (image_set.kind, image_set.n_images, image_set.shape, image_set.lot) == ("strip", 1, [96, 64], "S1")
    assert [(i.position, i.key, i.height, i.width) for i in image_set.images] == [(0, "0", 96, 64)]

    (tmp_path / "strip.zarr" / "images" / "c" / "2" / "1").unlink()
    with pytest.raises(DataError, match=r"strip 'images' is incomplete: 1 chunk\(s\) missing: \(2, 1\)"):
        register_store(session, _copy(tmp_path / "strip.zarr", tmp_path / "copy.zarr"))


def _copy(source, target) -> str:
    shutil.copytree(source, target)
    return str(target)


def test_register_an_fsspec_url_and_validate_it(session):
    url = "memory://acquisition/line1.zarr"
    root = zarr.open_group(url, mode="w", zarr_format=3)
    root.attrs.update({"lot": "M1"})
    stack = root.create_array("images", shape=(4, 16, 16), dtype="uint8", chunks=(1, 16, 16), fill_value=0)
    stack[:] = 9
    keys = root.create_array("keys", shape=(4,), dtype=str, chunks=(4,))
    keys[:] = np.array(["s1", "s2", "s3", "s4"], dtype=object)
    times = root.create_array("acquired_at", shape=(4,), dtype="int64", chunks=(4,))
    times[:] = np.array([0, 1, 2, 3]) * 1_000_000

    registration = register_store(session, url)
    image_set = registration.image_set
    assert image_set.uri == url and image_set.lot == "M1"
    assert [(i.key, i.acquired_at) for i in image_set.images] == [
        (f"s{k + 1}", dt.datetime(1970, 1, 1, 0, 0, k, tzinfo=dt.timezone.utc)) for k in range(4)
    ]
    report = validate_image_set(session, image_set.id)
    assert report.ok and report.info.zarr_format == 3


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "values", "units", "expected"),
    [
        ("acquired_at", (4,), "int64", [1772352000] * 4, "seconds since 1970-01-01", "array 'acquired_at' holds int64 in 'seconds since 1970-01-01'; expected int64 microseconds"),
        ("acquired_at", (4,), "float64", [1.7e9] * 4, None, "array 'acquired_at' holds float64; expected int64 microseconds"),
        ("acquired_at", (3,), "int64", [0] * 3, None, r"array 'acquired_at' has shape \(3,\); expected \(4,\), one entry per image"),
        ("keys", (2,), str, ["a", "b"], None, r"array 'keys' has shape \(2,\); expected \(4,\), one entry per image"),
        ("image_shapes", (4, 2), "int32", [[16, 16], [0, 0], [16, 16], [16, 16]], None, "array 'image_shapes' gives image 1 a size of 0x0; expected 1..16 x 1..16"),
    ],
    ids=["seconds", "float", "short-times", "short-keys", "zero-size"],
)
def test_per_image_arrays_that_do_not_fit_are_refused_not_misread(session, name, shape, dtype, values, units, expected):
    """Epoch seconds were read as microseconds (January 1970); a short keys array silently became positions."""
    url = f"memory://acquisition/{name}-{len(values)}-{np.dtype(dtype).kind}-{units is not None}.zarr"
    root = zarr.open_group(url, mode="w", zarr_format=3)
    root.create_array("images", shape=(4, 16, 16), dtype="uint8", chunks=(1, 16, 16), fill_value=0)[:] = 9
    array = root.create_array(name, shape=shape, dtype=dtype, chunks=shape)
    array[:] = np.array(values, dtype=object if dtype is str else dtype)
    if units:
        array.attrs["units"] = units
    with pytest.raises(DataError, match=f"^{url}: {expected}"):
        register_store(session, url)
    assert session.scalar(select(func.count()).select_from(ImageSet)) == 0


def test_capture_times_as_datetime64_are_read(session):
    url = "memory://acquisition/datetime64.zarr"
    root = zarr.open_group(url, mode="w", zarr_format=2)
    root.create_array("images", shape=(2, 16, 16), dtype="uint8", chunks=(1, 16, 16), fill_value=0)[:] = 9
    root.create_array("acquired_at", shape=(2,), dtype="datetime64[ns]", chunks=(2,))[:] = np.array(["2026-03-01T06:00:01", "NaT"], dtype="datetime64[ns]")
    image_set = register_store(session, url).image_set
    assert [i.acquired_at for i in image_set.images] == [dt.datetime(2026, 3, 1, 6, 0, 1, tzinfo=dt.timezone.utc), None]


def test_validate_an_unregistered_store_and_unknown_ids(tmp_path, migrated_url, cli):
    acquisition_store(tmp_path / "acq.zarr", zarr_format=3, array="images")
    result = cli("--database-url", migrated_url, "imagesets", "validate", str(tmp_path / "acq.zarr"))
    assert result.exit_code == 0 and "(not registered): OK: 5 images, every chunk stored" in result.output
    unknown = cli("--database-url", migrated_url, "imagesets", "show", "42")
    assert unknown.exit_code == 1 and "no image set '42' is registered" in unknown.output
    huge = cli("--database-url", migrated_url, "imagesets", "show", "99999999999999999999")  # was an OverflowError
    assert huge.exit_code == 1 and "no image set '99999999999999999999' is registered" in huge.output
    assert cli("--database-url", migrated_url, "imagesets", "list", "--format", "table").output.strip() == "no image sets registered"


def test_validate_deep_decodes_every_chunk_and_names_a_garbage_one(tmp_path, migrated_url, cli):
    acquisition_store(tmp_path / "acq.zarr", zarr_format=3, array="images")
    corrupt_chunk(tmp_path / "acq.zarr", 2)
    quick = cli("--database-url", migrated_url, "imagesets", "validate", str(tmp_path / "acq.zarr"))
    assert quick.exit_code == 0 and "every chunk stored (presence only; --deep decodes them)" in quick.output
    deep = cli("--database-url", migrated_url, "imagesets", "validate", str(tmp_path / "acq.zarr"), "--deep")
    assert deep.exit_code == 1, deep.output
    assert "1 chunk(s) cannot be read: (2, 0, 0): " in deep.output
    assert "image positions in unreadable chunks: 2" in deep.output
    acquisition_store(tmp_path / "acq.zarr", zarr_format=3, array="images")  # restored
    again = cli("--database-url", migrated_url, "imagesets", "validate", str(tmp_path / "acq.zarr"), "--deep")
    assert again.exit_code == 0 and "every chunk stored and decoded" in again.output


def test_ingest_then_list_filters_and_table(tmp_path, migrated_url, cli):
    for lot in ("L1", "L2"):
        folder = tmp_path / lot
        folder.mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16), i * 40 + 1, dtype=np.uint8)).save(folder / f"{i}.png")
        result = cli("--database-url", migrated_url, "ingest", str(folder), "--lot", lot, "--acquired-at", f"2026-03-0{lot[1]}T08:00:00Z", "--out", str(tmp_path / f"{lot}.zarr"))
        assert result.exit_code == 0, result.output
    table = cli("--database-url", migrated_url, "imagesets", "list", "--lot", "L2", "--format", "csv").output.splitlines()
    assert table[0].split(",")[:6] == ["id", "kind", "images", "shape", "dtype", "lot"]
    assert len(table) == 2 and table[1].split(",")[:6] == ["2", "stack", "2", "2x16x16", "uint8", "L2"]
    newest_first = json.loads(cli("--database-url", migrated_url, "imagesets", "list", "--format", "json").output)
    assert [s["lot"] for s in newest_first] == ["L2", "L1"]
    assert newest_first[0]["acquired_at"] == "2026-03-02T08:00:00Z" and newest_first[0]["shape"] == [2, 16, 16]
    assert json.loads(cli("--database-url", migrated_url, "imagesets", "list", "--json").output) == newest_first  # the older flag


def test_validate_an_unregistered_store_with_another_array_path(tmp_path, sqlite_url, cli):
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    acquisition_store(tmp_path / "acq.zarr")
    result = cli("--database-url", sqlite_url, "imagesets", "validate", str(tmp_path / "acq.zarr"), "--array", "cam0/images")
    assert result.exit_code == 0 and "OK: 5 images" in result.output
    missing = cli("--database-url", sqlite_url, "imagesets", "validate", str(tmp_path / "acq.zarr"))
    assert missing.exit_code == 1 and "no array 'images' in the store (arrays at its root: none)" in missing.output


def test_v2_keys_stored_as_fixed_width_bytes(tmp_path, session):
    root = acquisition_store(tmp_path / "acq.zarr", n=3, array="images")
    keys = root.create_array("keys", shape=(3,), dtype="S8", chunks=(3,))
    keys[:] = np.array([b"SN-001", b"SN-002", b"SN-003"])
    image_set = register_store(session, str(tmp_path / "acq.zarr")).image_set
    assert [i.key for i in image_set.images] == ["SN-001", "SN-002", "SN-003"]


@pytest.mark.large
def test_ingest_1000_full_size_pngs_then_validate(tmp_path, sqlite_url, cli):
    from scipy import ndimage

    rng = np.random.default_rng(3)
    surface = ndimage.gaussian_filter(rng.standard_normal((1024, 1024)), 4)
    surface = np.clip(128 + 40 * surface / surface.std(), 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    for i in range(1000):
        y, x = rng.integers(0, 512, size=2)
        Image.fromarray(surface[y : y + 512, x : x + 512]).save(tmp_path / "in" / f"{i:04d}.png", compress_level=1)
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    result = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "in"), "--lot", "big", "--out", str(tmp_path / "big.zarr"))
    assert result.exit_code == 0, result.output
    assert "1000 images (1000x512x512 uint8)" in result.output
    images = zarr.open_group(str(tmp_path / "big.zarr"), mode="r")["images"]
    assert images.shards[0] == 64 and len(list((tmp_path / "big.zarr" / "images" / "c").iterdir())) == 16
    assert counts(sqlite_url) == (1, 1000)
    valid = cli("--database-url", sqlite_url, "imagesets", "validate", "1")
    assert valid.exit_code == 0, valid.output


def test_a_malformed_store_time_names_the_store(tmp_path, session):
    acquisition_store(tmp_path / "acq.zarr", array="images", acquired_at="last tuesday")
    with pytest.raises(DataError, match=r"acq.zarr: group attribute acquired_at 'last tuesday' is not an ISO 8601 time.*--acquired-at"):
        register_store(session, str(tmp_path / "acq.zarr"))
    when = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    assert register_store(session, str(tmp_path / "acq.zarr"), acquired_at=when).image_set.acquired_at == when


def test_a_strip_is_one_image_in_what_the_commands_print(tmp_path, migrated_url, cli):
    from pipeline_helpers import square_images, write_strip

    path = write_strip(tmp_path / "S.zarr", square_images(1, size=256, seed=1)[0])
    registered = cli("--database-url", migrated_url, "imagesets", "register", str(path))
    assert registered.exit_code == 0 and "strip 256x256 uint8, 1 image" in registered.output and "1 images" not in registered.output
    valid = cli("--database-url", migrated_url, "imagesets", "validate", "1")
    assert valid.exit_code == 0 and "OK: 1 image, checksum matches" in valid.output

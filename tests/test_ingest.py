"""Ingest from image files into real Zarr stores: bad inputs, padding, DAGM labels, idempotence, safety."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from defectscan.data import imageset as layout
from defectscan.data.ingest import IngestOptions, ingest_files
from defectscan.errors import DataError


def texture(seed: int, shape=(32, 32), dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    return rng.integers(0, top, size=shape, dtype=np.int64).astype(dtype)


def write_png(path, array) -> np.ndarray:
    Image.fromarray(array).save(path)
    return array


def good_images(folder, n=4, shape=(32, 32)) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_png(folder / f"good{i:02d}.png", texture(i, shape)) for i in range(n)]


def stored(out) -> zarr.Group:
    return zarr.open_group(str(out), mode="r")


def test_bad_files_are_named_and_good_files_go_in(tmp_path):
    images = good_images(tmp_path / "in")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    (tmp_path / "in" / "notes.png").write_text("this is text, not a PNG")
    whole = (tmp_path / "in" / "good00.png").read_bytes()
    (tmp_path / "in" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    write_png(tmp_path / "in" / "tiny.png", texture(9, (12, 40)))
    write_png(tmp_path / "in" / "wide.png", texture(8, (32, 48)))
    write_png(tmp_path / "in" / "deep.png", texture(7, (32, 32), np.uint16))
    (tmp_path / "in" / "notes.txt").write_text("a file given by name that is not an image")

    result = ingest_files([tmp_path / "in", tmp_path / "missing.png", tmp_path / "in" / "notes.txt"], tmp_path / "s.zarr", IngestOptions(lot="L1"))

    reasons = {os.path.basename(p.path): p.reason for p in result.problems}
    assert reasons == {
        "missing.png": "does not exist",
        "notes.txt": "not an image file name (expected one of .png, .tif, .tiff, .bmp, .jpg, .jpeg)",
        "empty.png": "empty file",
        "notes.png": "not an image file (format not recognised)",
        "truncated.png": reasons["truncated.png"],
        "tiny.png": "too small: 12x40 pixels; the model needs at least 16x16",
        "wide.png": "different size: 32x48, the stack's is 32x32 (use --pad to pad to the largest)",
        "deep.png": "different bit depth: 16-bit image in a stack of 8-bit images",
    }
    assert reasons["truncated.png"].startswith("corrupt or truncated image")
    group = stored(result.uri)
    assert result.n_images == 4 and result.keys == [f"good{i:02d}.png" for i in range(4)]
    np.testing.assert_array_equal(group["images"][:], np.stack(images))
    assert list(group["keys"][:]) == result.keys
    # The skipped files are recorded in the store, for a later re-ingest to report them again.
    assert len(group.attrs["defectscan"]["skipped"]) == len(reasons)
    assert group.attrs["defectscan"]["complete"] is True and group.attrs["lot"] == "L1"


def test_strict_stops_at_the_first_bad_file(tmp_path):
    good_images(tmp_path / "in")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: empty file"):
        ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(), strict=True)
    assert not (tmp_path / "s.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_nothing_usable_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    write_png(tmp_path / "b.png", texture(1, (8, 8)))
    with pytest.raises(DataError, match=r"no usable images \(2 skipped.*a.png: empty file.*b.png: too small"):
        ingest_files([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "s.zarr", IngestOptions())
    assert not (tmp_path / "s.zarr").exists()


def test_rgb_becomes_gray_by_the_documented_rule(tmp_path):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[:16, :, 1] = 255
    write_png(tmp_path / "rgb.png", rgb)
    result = ingest_files([tmp_path / "rgb.png"], tmp_path / "s.zarr", IngestOptions())
    image = stored(result.uri)["images"][0]
    # ITU-R BT.601 luma: 0.299 R + 0.587 G + 0.114 B, rounded.
    assert image[20, 0] == round(0.299 * 255) and image[0, 0] == round((0.299 + 0.587) * 255)


def _png_rgb16(path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG, which Pillow cannot write: signature, IHDR, one IDAT of unfiltered rows, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, channels = rgb.shape
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(height))
    colour_type = {2: 4, 3: 2}[channels]  # gray + alpha, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_colour_that_would_lose_bits_is_refused_and_planar_tiff_colour_is_read(tmp_path):
    import tifffile

    from defectscan.data.imagefiles import read_image

    rgb16 = np.full((32, 32, 3), 60000, np.uint16)
    _png_rgb16(tmp_path / "wide.png", rgb16)
    write_png(tmp_path / "gray.png", texture(1))
    _png_rgb16(tmp_path / "alpha.png", np.full((32, 32, 2), 60000, np.uint16))
    with pytest.raises(DataError, match="wide.png: 16-bit colour or gray\\+alpha PNG: not read"):
        read_image(tmp_path / "wide.png")
    result = ingest_files([tmp_path / "wide.png", tmp_path / "alpha.png", tmp_path / "gray.png"], tmp_path / "s.zarr", IngestOptions())
    reason = "16-bit colour or gray+alpha PNG: not read (it would lose its low 8 bits); save it as 16-bit grayscale PNG (no alpha) or as TIFF"
    assert result.n_images == 1 and sorted((os.path.basename(p.path), p.reason) for p in result.problems) == [
        ("alpha.png", reason), ("wide.png", reason)]

    rgb = np.stack([texture(s) for s in (2, 3, 4)], axis=-1)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "contig.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), read_image(tmp_path / "contig.tif"))
    both = ingest_files([tmp_path / "planar.tif", tmp_path / "contig.tif"], tmp_path / "t.zarr", IngestOptions())
    assert both.n_images == 2 and not both.problems


def test_16_bit_images_make_a_16_bit_stack(tmp_path):
    deep = [write_png(tmp_path / f"d{i}.png", texture(i, (20, 24), np.uint16)) for i in range(3)]
    result = ingest_files([tmp_path], tmp_path / "s.zarr", IngestOptions())
    images = stored(result.uri)["images"]
    assert images.dtype == np.uint16 and images.shape == (3, 20, 24)
    np.testing.assert_array_equal(images[:], np.stack(deep))


def test_pad_puts_different_sizes_in_one_stack(tmp_path):
    small = write_png(tmp_path / "a.png", texture(1, (20, 32)))
    large = write_png(tmp_path / "b.png", texture(2, (32, 24)))
    result = ingest_files([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "s.zarr", IngestOptions(pad=True))
    assert not result.problems
    group = stored(result.uri)
    images = group["images"][:]
    assert images.shape == (2, 32, 32)
    np.testing.assert_array_equal(images[0, :20, :32], small)
    np.testing.assert_array_equal(images[1, :32, :24], large)
    assert not images[0, 20:].any() and not images[1, :, 24:].any()
    np.testing.assert_array_equal(group["image_shapes"][:], [[20, 32], [32, 24]])


def test_strip_is_one_tiled_image(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "STRIP_TILE", 32)
    strip = write_png(tmp_path / "strip.png", texture(3, (100, 70)))
    result = ingest_files([tmp_path / "strip.png"], tmp_path / "s.zarr", IngestOptions(kind="strip"))
    images = stored(result.uri)["images"]
    assert images.shape == (100, 70) and images.chunks == (32, 32)
    np.testing.assert_array_equal(images[:], strip)
    write_png(tmp_path / "other.png", texture(4, (100, 70)))
    with pytest.raises(DataError, match="a strip image set holds exactly one image; got 2 files"):
        ingest_files([tmp_path / "strip.png", tmp_path / "other.png"], tmp_path / "t.zarr", IngestOptions(kind="strip"))


def test_sharded_stack_spans_several_shards(tmp_path, monkeypatch):
    # Shards of 3 images: the writer must flush full shards and a partial last one.
    monkeypatch.setattr(layout, "SHARD_TARGET_BYTES", 3 * 32 * 32)
    images = good_images(tmp_path / "in", n=8)
    result = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(workers=2))
    array = stored(result.uri)["images"]
    assert array.shards == (3, 32, 32) and array.shape == (8, 32, 32)
    np.testing.assert_array_equal(array[:], np.stack(images))
    assert not layout.missing_chunks(array)


def test_an_all_black_image_is_stored_and_registered_like_any_other(tmp_path, monkeypatch, factory):
    """Zarr kept write_empty_chunks for the creating handle only: the writer's all-black chunks were left out, and
    the image then went unregistered as 'chunk not stored' (a camera's black frame is an image to judge)."""
    from defectscan.data.register import register_store

    (tmp_path / "in").mkdir()
    write_png(tmp_path / "in" / "a.png", texture(1))
    write_png(tmp_path / "in" / "b.png", np.zeros((32, 32), np.uint8))
    write_png(tmp_path / "in" / "c.png", texture(2))
    stack = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions())
    assert not layout.missing_chunks(stored(stack.uri)["images"])
    monkeypatch.setattr(layout, "STRIP_TILE", 32)
    black = np.zeros((64, 64), np.uint8)
    black[40:, 40:] = 7  # one tile of four not black
    write_png(tmp_path / "strip.png", black)
    strip = ingest_files([tmp_path / "strip.png"], tmp_path / "t.zarr", IngestOptions(kind="strip"))
    with factory() as session:
        registration = register_store(session, stack.uri)
        assert (registration.image_set.n_images, registration.problems.problems) == (3, [])
        assert register_store(session, strip.uri).image_set.n_images == 1  # refused before: 'the strip is incomplete'


def test_dagm_folder_brings_labels_and_classes(tmp_path):
    for class_name, seed in (("Class1", 10), ("Class2", 20)):
        folder = tmp_path / "DAGM" / class_name / "Train"
        (folder / "Label").mkdir(parents=True)
        for i in range(3):
            write_png(folder / f"{i + 1:04d}.PNG", texture(seed + i))
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[4:10, 5:12] = 255
        write_png(folder / "Label" / "0002_label.PNG", mask)
        (folder / "Label" / "Labels.txt").write_text("3\n1\t0\t0001.PNG\t0\t0\n2\t1\t0002.PNG\t0\t0002_label.PNG\n3\t0\t0003.PNG\t0\t0\n")

    result = ingest_files([tmp_path / "DAGM"], tmp_path / "s.zarr", IngestOptions())
    group = stored(result.uri)
    assert group.attrs["classes"] == ["Class1", "Class2"]
    assert result.keys[:2] == ["Class1/Train/0001.PNG", "Class1/Train/0002.PNG"]
    labels = group["labels"][:]
    assert labels.shape == (6, 32, 32) and labels.dtype == np.uint8
    assert labels[1, 4:10, 5:12].min() == 1 and labels[1].sum() == 6 * 7
    assert labels[4, 4:10, 5:12].min() == 2 and labels[4].sum() == 2 * 6 * 7
    assert not labels[[0, 2, 3, 5]].any()
    info = layout.describe(group, result.uri)
    assert info.has_labels and info.classes == ["Class1", "Class2"]

    # A folder given twice, or under its parent too, goes in once.
    train = tmp_path / "DAGM" / "Class1" / "Train"
    twice = ingest_files([train, train, tmp_path / "DAGM" / "Class1"], tmp_path / "twice.zarr", IngestOptions())
    assert twice.keys == ["0001.PNG", "0002.PNG", "0003.PNG"]


def test_dagm_classes_are_numbered_as_the_dataset_reader_numbers_them_and_unlisted_images_are_reported(tmp_path):
    """Class10 after Class2, as read_dagm orders them: a label index must mean the same class in both readers."""
    from defectscan.data.dagm import read_dagm

    for n, class_name in enumerate(("Class1", "Class10", "Class2")):
        for split in ("Train", "Test"):
            folder = tmp_path / "DAGM" / class_name / split
            (folder / "Label").mkdir(parents=True)
            write_png(folder / "0001.PNG", texture(10 * n))
            (folder / "Label" / "Labels.txt").write_text("1\n1\t0\t0001.PNG\t0\t0\n")
    write_png(tmp_path / "DAGM" / "Class2" / "Train" / "0002.PNG", texture(99))  # not in Labels.txt

    result = ingest_files([tmp_path / "DAGM"], tmp_path / "s.zarr", IngestOptions())
    classes = stored(result.uri).attrs["classes"]
    assert classes == ["Class1", "Class2", "Class10"]
    assert classes == read_dagm(tmp_path / "DAGM", per_class=True).classes
    assert [(str(p.path), p.reason) for p in result.problems] == [(str(tmp_path / 'DAGM' / 'Class2' / 'Train' / '0002.PNG'), 'image not listed in Labels.txt')]


def test_dagm_mixed_with_plain_files_is_refused(tmp_path):
    (tmp_path / "C1" / "Label").mkdir(parents=True)
    (tmp_path / "C1" / "Label" / "Labels.txt").write_text("0\n")
    write_png(tmp_path / "plain.png", texture(1))
    with pytest.raises(DataError, match="cannot mix DAGM folders"):
        ingest_files([tmp_path / "C1", tmp_path / "plain.png"], tmp_path / "s.zarr", IngestOptions())


def test_reingest_is_idempotent_and_other_inputs_are_refused(tmp_path):
    good_images(tmp_path / "in")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    first = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(lot="L1"))
    stamp = (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns
    again = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(lot="L1"))
    assert again.reused and again.n_images == first.n_images and again.keys == first.keys
    assert [str(p) for p in again.problems] == [str(p) for p in first.problems]
    assert (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns == stamp

    with pytest.raises(DataError, match="s.zarr: already exists and holds other images"):
        ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(lot="L2"))
    write_png(tmp_path / "in" / "good09.png", texture(99))
    with pytest.raises(DataError, match="already exists and holds other images"):
        ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(lot="L1"))


def test_default_store_name_follows_the_inputs(tmp_path):
    good_images(tmp_path / "in")
    first = ingest_files([tmp_path / "in"], None, IngestOptions(lot="L7"), store_dir=tmp_path / "data")
    again = ingest_files([tmp_path / "in"], None, IngestOptions(lot="L7"), store_dir=tmp_path / "data")
    assert first.uri == again.uri and again.reused
    assert os.path.basename(first.uri).startswith("L7-") and first.uri.startswith(str(tmp_path / "data" / "imagesets"))
    # A lot with slashes made folders; one starting with "/" a store outside the data directory.
    for lot, start in (("2026/03/L042", "2026_03_L042-"), ("/tmp/escaped", "tmp_escaped-"), ("..", "imageset-")):
        stored_at = Path(ingest_files([tmp_path / "in"], None, IngestOptions(lot=lot), store_dir=tmp_path / "data").uri)
        assert stored_at.parent == tmp_path / "data" / "imagesets" and stored_at.name.startswith(start), stored_at
        assert zarr.open_group(str(stored_at), mode="r").attrs["lot"] == lot
    # A store an earlier version named after the lot as given is still the one these files go to.
    earlier = ingest_files([tmp_path / "in"], None, IngestOptions(lot="Lot 9"), store_dir=tmp_path / "data")
    legacy = Path(earlier.uri).with_name(Path(earlier.uri).name.replace("Lot_9-", "Lot 9-"))
    Path(earlier.uri).rename(legacy)
    again = ingest_files([tmp_path / "in"], None, IngestOptions(lot="Lot 9"), store_dir=tmp_path / "data")
    assert again.reused and again.uri == str(legacy)


def test_interrupted_ingest_leaves_no_store(tmp_path):
    good_images(tmp_path / "in", n=6)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(), on_progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_times_keys_and_attributes(tmp_path):
    good_images(tmp_path / "in", n=2)
    os.utime(tmp_path / "in" / "good00.png", (1_700_000_000, 1_700_000_000))
    result = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(lot="L1", line="3", product="P", camera="top"))
    group = stored(result.uri)
    times = layout.read_times(group, 2, default=None)
    assert times[0] == dt.datetime.fromtimestamp(1_700_000_000, dt.timezone.utc)
    assert group.attrs["acquired_at"] == "2023-11-14T22:13:20Z"
    assert {k: group.attrs[k] for k in ("lot", "line", "product", "camera")} == {"lot": "L1", "line": "3", "product": "P", "camera": "top"}
    assert group["acquired_at"].attrs["units"] == layout.TIME_UNITS

    fixed = dt.datetime(2026, 3, 1, 8, tzinfo=dt.timezone.utc)
    result = ingest_files([tmp_path / "in"], tmp_path / "t.zarr", IngestOptions(acquired_at=fixed))
    assert layout.read_times(stored(result.uri), 2, default=None) == [fixed, fixed]


def test_process_pool_gives_the_same_store(tmp_path):
    images = good_images(tmp_path / "in", n=5)
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    result = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions(workers=2, processes=True))
    np.testing.assert_array_equal(stored(result.uri)["images"][:], np.stack(images))
    assert [os.path.basename(p.path) for p in result.problems] == ["empty.png"]


def test_tiff_bmp_and_jpeg_inputs(tmp_path):
    import tifffile

    tiff = texture(1, (32, 32), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", tiff)
    tifffile.imwrite(tmp_path / "b.tiff", texture(2, (32, 32), np.uint16))
    result = ingest_files([tmp_path / "a.tif", tmp_path / "b.tiff"], tmp_path / "s.zarr", IngestOptions())
    np.testing.assert_array_equal(stored(result.uri)["images"][0], tiff)

    bmp = write_png(tmp_path / "c.bmp", texture(3))
    Image.fromarray(texture(4)).save(tmp_path / "d.jpg", quality=95)
    result = ingest_files([tmp_path / "c.bmp", tmp_path / "d.jpg"], tmp_path / "t.zarr", IngestOptions())
    assert result.n_images == 2 and not result.problems
    np.testing.assert_array_equal(stored(result.uri)["images"][0], bmp)


def test_symlinked_files_keep_their_own_names(tmp_path):
    good_images(tmp_path / "real", n=2)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "camera-a.png").symlink_to(tmp_path / "real" / "good00.png")
    (tmp_path / "links" / "camera-b.png").symlink_to(tmp_path / "real" / "good01.png")
    result = ingest_files([tmp_path / "links"], tmp_path / "s.zarr", IngestOptions())
    assert result.keys == ["camera-a.png", "camera-b.png"]


def test_cli_reports_each_bad_file_and_exits_3(tmp_path, sqlite_url, cli):
    from defectscan.exitcodes import EXIT_PARTIAL

    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    good_images(tmp_path / "in", n=3)
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    write_png(tmp_path / "in" / "wide.png", texture(5, (32, 40)))
    result = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "in"), str(tmp_path / "gone.png"), "--out", str(tmp_path / "s.zarr"))
    assert result.exit_code == EXIT_PARTIAL
    for name, reason in (("empty.png", "empty file"), ("wide.png", "different size: 32x40"), ("gone.png", "does not exist")):
        assert f"{name}: {reason}" in result.output
    assert "3 images (3x32x32 uint8)" in result.output and "3 skipped" in result.output

    padded = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "in" / "good00.png"), str(tmp_path / "in" / "wide.png"), "--pad", "--out", str(tmp_path / "p.zarr"))
    assert padded.exit_code == 0 and "2 images (2x32x40 uint8)" in padded.output

    strict = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "in"), "--strict", "--out", str(tmp_path / "t.zarr"))
    assert strict.exit_code == 1 and "Error: " in strict.output and "empty.png: empty file" in strict.output
    assert not (tmp_path / "t.zarr").exists()

    nothing = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "in" / "empty.png"), "--out", str(tmp_path / "u.zarr"))
    assert nothing.exit_code == 1 and "Error: no usable images (1 skipped (1 empty file)): " in nothing.output

    bad_time = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "in"), "--acquired-at", "noon", "--out", str(tmp_path / "v.zarr"))
    assert bad_time.exit_code == 1 and "'noon' is not an ISO 8601 time" in bad_time.output


def test_cli_ingests_a_dagm_folder_into_a_labelled_set(tmp_path, sqlite_url, cli):
    folder = tmp_path / "Class3" / "Test"
    (folder / "Label").mkdir(parents=True)
    for i in range(2):
        write_png(folder / f"{i + 1:04d}.PNG", texture(i))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    write_png(folder / "Label" / "0001_label.PNG", mask)
    (folder / "Label" / "Labels.txt").write_text("2\n1\t1\t0001.PNG\t0\t0001_label.PNG\n2\t0\t0002.PNG\t0\t0\n3\tx\tbad line\n")
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    result = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "Class3"), "--lot", "dagm", "--out", str(tmp_path / "d.zarr"))
    assert result.exit_code == 3 and "Labels.txt:4: unparsable Labels.txt line: 3 fields, expected 5" in result.output
    assert result.stderr.startswith("skipped "), "no progress bar (nor the empty line it left) when stderr is not a terminal"
    group = stored(tmp_path / "d.zarr")
    assert group.attrs["classes"] == ["Class3"] and int(group["labels"][0].sum()) == 9 and not group["labels"][1].any()


def test_a_concurrent_ingest_that_finished_first_wins(tmp_path, monkeypatch):
    import defectscan.data.ingest as ingest_module

    good_images(tmp_path / "in", n=2)
    real_writer = ingest_module._Writer

    class FinishesSecond(real_writer):
        def finish(self, digest, problems):
            # The other ingest of the same files completes while this one is still writing.
            monkeypatch.setattr(ingest_module, "_Writer", real_writer)
            ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions())
            return super().finish(digest, problems)

    monkeypatch.setattr(ingest_module, "_Writer", FinishesSecond)
    result = ingest_files([tmp_path / "in"], tmp_path / "s.zarr", IngestOptions())
    assert result.reused and result.n_images == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "s.zarr"]


def test_a_store_refused_at_a_registered_location_is_removed_not_left_there(tmp_path, sqlite_url, cli):
    import shutil

    good_images(tmp_path / "a", n=3)
    good_images(tmp_path / "b", n=3, shape=(32, 32))
    for i, path in enumerate(sorted((tmp_path / "b").iterdir())):
        path.rename(tmp_path / "b" / f"other{i}.png")
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    out = tmp_path / "ab.zarr"
    first = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "a"), str(tmp_path / "b"), "--lot", "AB", "--out", str(out))
    assert first.exit_code == 0, first.output
    shutil.rmtree(out)  # the store is gone; its image set's records stay
    refused = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "a"), "--lot", "AB", "--out", str(out))
    assert refused.exit_code == 1 and "changed since it was registered" in refused.output
    assert refused.output.rstrip().endswith("; the store just written was removed") and not out.exists()
    restored = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "a"), str(tmp_path / "b"), "--lot", "AB", "--out", str(out))
    assert restored.exit_code == 0 and "image set 1" in restored.output, restored.output  # the same files again: its own store back


# ---- files a line's software writes (read-only review, Dec 2026) ----


def test_a_truncated_compressed_tiff_is_skipped_by_name_and_the_others_go_in(tmp_path):
    """zlib.error escaped the TIFF reader: one cut file stopped the ingest, naming nothing."""
    import tifffile

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"f{i}.tif", texture(i, (64, 64)), compression="zlib")
    whole = (folder / "f1.tif").read_bytes()
    (folder / "f1.tif").write_bytes(whole[: 2 * len(whole) // 3])
    result = ingest_files([folder], tmp_path / "s.zarr", IngestOptions())
    assert result.keys == ["f0.tif", "f2.tif"]
    [problem] = result.problems
    assert problem.path.endswith("f1.tif") and problem.reason.startswith("corrupt or not a TIFF image")


def test_lzw_palette_and_min_is_white_tiffs_are_read_as_they_are_shown(tmp_path):
    import tifffile

    gray = texture(3, (32, 32))
    tifffile.imwrite(tmp_path / "lzw.tif", gray, compression="lzw")
    # Min-is-white: 0 is white; the pixels as shown are the stored values inverted.
    tifffile.imwrite(tmp_path / "white.tif", 255 - gray, photometric="miniswhite")
    # A palette of 16-bit TIFF colours, index i shown as gray 255 - i.
    levels = (255 - np.arange(256, dtype=np.uint16)) * 257
    tifffile.imwrite(tmp_path / "palette.tif", gray, photometric="palette", colormap=np.stack([levels] * 3))
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((32, 32, 4), np.uint8), photometric="separated")
    result = ingest_files([tmp_path / n for n in ("lzw.tif", "white.tif", "palette.tif", "cmyk.tif")], tmp_path / "s.zarr", IngestOptions())
    images = stored(result.uri)["images"][:]
    np.testing.assert_array_equal(images[0], gray)
    np.testing.assert_array_equal(images[1], gray)
    np.testing.assert_array_equal(images[2], 255 - gray)
    assert [(os.path.basename(p.path), p.reason) for p in result.problems] == [
        ("cmyk.tif", "SEPARATED TIFF is not supported; expected grayscale, RGB or palette")]


def test_palette_and_transparent_masks_give_their_classes_not_their_colours(tmp_path):
    """A label tool's palette PNG holds class numbers as indices; a transparent background marks nothing."""
    from defectscan.data.folders import read_folders

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("p0", "p1"):
        write_png(tmp_path / "images" / f"{name}.png", texture(1))
    classes = np.zeros((32, 32), np.uint8)
    classes[2:6, 2:6], classes[10:14, 10:14] = 1, 2
    palette_mask = Image.fromarray(classes, mode="P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette_mask.save(tmp_path / "masks" / "p0.png")
    drawn = np.zeros((32, 32, 4), np.uint8)
    drawn[..., :3] = 255  # white under the transparency, as editors leave it
    drawn[20:24, 20:24] = (255, 255, 255, 255)
    Image.fromarray(drawn, mode="RGBA").save(tmp_path / "masks" / "p1.png")

    data = read_folders(tmp_path / "images", tmp_path / "masks", classes=("scratch", "stain"))
    assert not data.problems
    _, first = data.load(0)
    _, second = data.load(1)
    np.testing.assert_array_equal(first, classes)
    assert second.sum() == 16 and second[20:24, 20:24].all()


def test_images_and_masks_in_one_folder_pair_each_image_with_its_label(tmp_path):
    """KolektorSDD's layout: Part0.jpg beside Part0_label.bmp; no file is its own mask nor a training image."""
    from defectscan.data.folders import read_folders

    folder = tmp_path / "kos01"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"Part{i}.png", texture(i))
    label = np.zeros((32, 32), np.uint8)
    label[4:8, 4:8] = 255
    write_png(folder / "Part1_label.png", label)
    write_png(folder / "Part2_label.png", np.zeros((32, 32), np.uint8))
    data = read_folders(folder, folder)
    assert not data.problems and data.keys == ["Part0.png", "Part1.png", "Part2.png"]
    assert data.defective == [False, True, True]
    assert data.load(1)[1].sum() == 16 and not data.load(2)[1].any()


def test_a_parents_own_images_beside_dagm_subfolders_are_refused_not_dropped(tmp_path):
    lot = tmp_path / "lot7"
    good_images(lot, n=3)
    (lot / "golden" / "Label").mkdir(parents=True)
    write_png(lot / "golden" / "0001.PNG", texture(5))
    (lot / "golden" / "Label" / "Labels.txt").write_text("1\n1\t0\t0001.PNG\t0\t0\n")
    with pytest.raises(DataError, match=r"cannot mix DAGM folders .*golden separately from .*good00.png"):
        ingest_files([lot], tmp_path / "s.zarr", IngestOptions())


def test_broken_links_and_names_that_are_not_utf8_are_reported_and_the_rest_go_in(tmp_path):
    folder = tmp_path / "in"
    good_images(folder, n=2)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    latin1 = os.fsdecode(b"Pr\xfcfteil.png")
    write_png(folder / latin1, texture(7))
    result = ingest_files([folder], tmp_path / "s.zarr", IngestOptions())
    assert result.keys == ["good00.png", "good01.png"]
    reasons = {os.path.basename(p.path): p.reason for p in result.problems}
    assert reasons == {"gone.png": "does not exist (a broken link)",
                       "Pr\\xfcfteil.png": "file name is not UTF-8 text (rename it; image keys are stored as UTF-8)"}
    assert stored(result.uri).attrs["defectscan"]["skipped"][1]["path"].endswith("Pr\\xfcfteil.png")
    # A folder of such a name is not part of any key: its files go in.
    odd = tmp_path / os.fsdecode(b"Pr\xfcfung")
    good_images(odd, n=2)
    inside = ingest_files([odd], tmp_path / "odd.zarr", IngestOptions())
    assert inside.keys == ["good00.png", "good01.png"] and not inside.problems


def test_a_strip_over_pillows_bomb_limit_goes_in(tmp_path, monkeypatch):
    """Pillow refuses images over 179 megapixels as bombs; a line-scan strip is a plant's own file."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # the default limit, scaled down for a small file
    write_png(tmp_path / "strip.png", texture(2, (64, 96)))
    result = ingest_files([tmp_path / "strip.png"], tmp_path / "s.zarr", IngestOptions(kind="strip"))
    assert result.n_images == 1 and not result.problems


def test_twelve_bit_data_is_ingested_with_its_bit_depth_or_warned_about(tmp_path, sqlite_url, cli):
    folder = tmp_path / "cam12"
    folder.mkdir()
    for i in range(2):
        write_png(folder / f"f{i}.png", (texture(i, (32, 32), np.uint16) >> 4))  # 0..4095 in 16-bit words
    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    plain = cli("--database-url", sqlite_url, "ingest", str(folder), "--out", str(tmp_path / "a.zarr"))
    assert plain.exit_code == 1 and "the store is kept, not registered: ingest again with --bit-depth 12" in plain.output
    assert (tmp_path / "a.zarr").exists() and "no image sets registered" in cli("--database-url", sqlite_url, "imagesets", "list").output
    given = cli("--database-url", sqlite_url, "ingest", str(folder), "--bit-depth", "12", "--out", str(tmp_path / "a.zarr"))
    assert given.exit_code == 0 and "already holds these 2 images; image set 1" in given.output  # the store kept is reused
    shown = cli("--database-url", sqlite_url, "imagesets", "show", "1", "--json")
    assert '"bit_depth": 12' in shown.output
    sixteen = cli("--database-url", sqlite_url, "ingest", str(folder), "--bit-depth", "16", "--out", str(tmp_path / "b.zarr"))
    assert sixteen.exit_code == 0
    eight = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "cam12"), "--bit-depth", "12", "--out", str(tmp_path / "c.zarr"))
    assert eight.exit_code == 0
    write_png(tmp_path / "e.png", texture(1))
    refused = cli("--database-url", sqlite_url, "ingest", str(tmp_path / "e.png"), "--bit-depth", "12", "--out", str(tmp_path / "e.zarr"))
    assert refused.exit_code == 1 and "bit depth 12 does not fit uint8 images" in refused.output and not (tmp_path / "e.zarr").exists()


def test_masks_saved_as_palette_images_or_tiffs_with_alpha_and_one_bit_tiffs_read_as_drawn(tmp_path):
    """A black-and-white mask quantized to a palette listing white first read inverted (its indices); a TIFF mask's
    transparent background marked the whole image; a 1-bit min-is-white TIFF read inverted."""
    import tifffile

    from defectscan.data.imagefiles import read_image, read_mask

    drawn = np.zeros((64, 64), np.uint8)
    drawn[10:20, 10:20] = 255
    Image.fromarray(drawn).quantize(2).save(tmp_path / "quantized.png")
    assert (read_mask(tmp_path / "quantized.png") > 0).sum() == 100
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[2:6, 2:6, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "pillow.tif")
    tifffile.imwrite(tmp_path / "tifffile.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert (read_mask(tmp_path / "pillow.tif") > 0).sum() == (read_mask(tmp_path / "tifffile.tif") > 0).sum() == 16
    ink = np.zeros((16, 16), bool)
    ink[:4] = True
    tifffile.imwrite(tmp_path / "white.tif", ink, photometric="miniswhite")
    shown = np.asarray(Image.open(tmp_path / "white.tif").convert("L"))
    np.testing.assert_array_equal(read_image(tmp_path / "white.tif"), shown)

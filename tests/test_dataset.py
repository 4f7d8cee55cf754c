"""The tf.data pipeline (scaling, crops, flips + rot90, seeded stream, resume offset, caches) and the Zarr reader."""

from __future__ import annotations

import numpy as np
import pytest
from defectscan.data.dataset import LabelledImages
from defectscan.model.feed import evaluation_dataset, training_dataset
from defectscan.errors import DataError


def _images(n=6, size=32, classes=("defect",)) -> LabelledImages:
    """Image i has value 10*i + 5 everywhere, and a defect square of class (i % classes) + 1 on odd i."""

    def load(i):
        image = np.full((size, size), 10 * i + 5, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if i % 2:
            mask[2:10, 3:7] = (i // 2) % len(classes) + 1
            image[2:10, 3:7] = 250
        return image, mask

    return LabelledImages("toy", [str(i) for i in range(n)], list(classes), (size, size), load, [bool(i % 2) for i in range(n)])


def _take(dataset, n):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(n)]


def test_batches_are_scaled_and_targets_have_one_channel_per_class():
    images = _images(classes=("scratch", "spot"))
    (x, y), = _take(training_dataset(images, batch_size=3, seed=0, augment=False), 1)
    assert x.shape == (3, 32, 32, 1) and x.dtype == np.float32 and y.shape == (3, 32, 32, 2)
    assert x.min() >= -1 and x.max() <= 1
    values = sorted(set(np.round((x[:, 20, 20, 0] + 1) * 127.5).astype(int)))
    assert all((v - 5) % 10 == 0 for v in values)
    # Targets follow the pixels: the defect square is class 1 or 2, and only there.
    for image, target in zip(x, y):
        defect = np.isclose(image[..., 0], 250 / 127.5 - 1)
        assert np.array_equal(target.any(axis=-1), defect)


def test_augmentation_moves_image_and_target_together():
    batches = _take(training_dataset(_images(), batch_size=6, seed=1), 4)
    seen = set()
    for x, y in batches:
        for image, target in zip(x, y):
            defect = np.isclose(image[..., 0], 250 / 127.5 - 1)
            assert np.array_equal(defect, target[..., 0] > 0)
            if defect.any():
                rows, cols = np.nonzero(defect)
                seen.add((rows.min(), cols.min(), rows.max(), cols.max()))
    assert len(seen) > 1, "flips/rotations place the defect differently"


def test_whole_non_square_images_are_turned_by_half_turns_only_and_stay_intact():
    """A quarter turn made a 32x48 image 48x32, and batching re-read its pixels as 32x48: image and mask scrambled alike."""
    def load(i):
        image = np.full((32, 48), 10 * i + 5, np.uint8)
        mask = np.zeros((32, 48), np.uint8)
        image[2:10, 3:7], mask[2:10, 3:7] = 250, 1
        return image, mask

    images = LabelledImages("wide", [str(i) for i in range(4)], ["defect"], (32, 48), load, [True] * 4)
    places = set()
    for x, y in _take(training_dataset(images, batch_size=4, seed=0), 6):
        for image, target in zip(x, y):
            defect = np.isclose(image[..., 0], 250 / 127.5 - 1)
            rows, cols = np.nonzero(defect)
            assert defect.sum() == 32 and (np.ptp(rows), np.ptp(cols)) == (7, 3)  # still one 8x4 square, where the label is
            assert np.array_equal(defect, target[..., 0] > 0)
            places.add((rows.min(), cols.min()))
    assert places == {(2, 3), (2, 41), (22, 3), (22, 41)}  # as it was, mirrored, turned half, both


def test_same_seed_same_stream_and_start_step_continues_it():
    images = _images()
    a = _take(training_dataset(images, batch_size=2, seed=7, crop_size=16), 5)
    b = _take(training_dataset(images, batch_size=2, seed=7, crop_size=16), 5)
    other = _take(training_dataset(images, batch_size=2, seed=8, crop_size=16), 5)
    resumed = _take(training_dataset(images, batch_size=2, seed=7, crop_size=16, start_step=3), 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xo) for (xa, _), (xo, _) in zip(a, other))
    for (xa, ya), (xr, yr) in zip(a[3:], resumed):
        np.testing.assert_array_equal(xa, xr)
        np.testing.assert_array_equal(ya, yr)


def _crop_sources(x, y):
    """(source image index, crop holds a defect) per crop; a crop is never all defect, so a background pixel names its image."""
    pixels = np.round((x[..., 0] + 1) * 127.5)
    return [(int((p[p != 250][0] - 5) // 10), bool(t.any())) for p, t in zip(pixels, y)]


def test_crops_are_centred_on_defects_when_asked():
    images = _images(n=4)
    (x, y), = _take(training_dataset(images, batch_size=32, seed=0, crop_size=16, defect_crop_fraction=1.0), 1)
    assert x.shape == (32, 16, 16, 1) and y.shape == (32, 16, 16, 1)
    sources = _crop_sources(x, y)
    assert all(has_defect == bool(index % 2) for index, has_defect in sources)
    (x0, y0), = _take(training_dataset(images, batch_size=32, seed=0, crop_size=16, defect_crop_fraction=0.0), 1)
    random_crops = _crop_sources(x0, y0)
    assert not any(has_defect for index, has_defect in random_crops if index % 2 == 0)
    assert any(not has_defect for index, has_defect in random_crops if index % 2), "uniform crops miss some defects"


def _two_products(size=64) -> LabelledImages:
    """Group A: gray 100 with a defect of 30 on odd images; group B: gray 200 with a defect of 250 on odd
    images; group C: gray 150 and never a defect. Keys "A/0", "B/1", ... as a DAGM set's."""
    groups = [("A", 100, 30), ("B", 200, 250), ("C", 150, None)] * 2 + [("A", 100, 30), ("B", 200, 250)]
    keys = [f"{group}/{i}" for i, (group, _, _) in enumerate(groups)]
    defective = [bool(i % 2) and value is not None for i, (_, _, value) in enumerate(groups)]

    def load(i):
        _, background, value = groups[i]
        image = np.full((size, size), background, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if defective[i]:
            image[40:48, 10:14] = value
            mask[40:48, 10:14] = 1
        return image, mask

    return LabelledImages("products", keys, ["defect"], (size, size), load, defective)


def test_defect_bank_keeps_squares_around_each_groups_defects():
    from defectscan.model.paste import DefectBank

    images = _two_products()
    bank = DefectBank.of(images, 16, seed=0)
    assert bank.patches.shape == (3, 16, 16, 1) and bank.patch_classes.shape == (3, 16, 16, 1)
    assert bank.count.tolist() == [1, 2, 0] and bank.first.tolist() == [0, 1, 3]
    assert bank.image_group.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    flagged_but_unlabelled = LabelledImages("empty mask", ["A/0"], ["defect"], (64, 64),
                                            lambda i: (np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)), [True])
    assert len(DefectBank.of(flagged_but_unlabelled, 16, seed=0).patches) == 0
    for patch, classes, value in zip(bank.patches[..., 0], bank.patch_classes[..., 0], (30, 250, 250), strict=True):
        assert classes.sum() == 32 and (patch[classes > 0] == value).all()


def test_pasted_defects_come_from_the_crops_own_group_and_bring_their_label():
    images = _two_products()

    def crops(fraction, seed=0):
        return _take(training_dataset(images, batch_size=32, seed=seed, crop_size=32, defect_crop_fraction=0.0,
                                      defect_paste_fraction=fraction, augment=False), 2)

    for x, y in crops(1.0):
        pixels = np.round((x[..., 0] + 1) * 127.5)
        for image, target in zip(pixels, y[..., 0] > 0):
            background = np.bincount(image.astype(int).ravel()).argmax()
            if background == 150:
                assert not target.any(), "group C has no defect to paste"
                continue
            assert target.any(), "every A and B crop gets a defect"
            own = (background, {100: 30, 200: 250}[background])
            assert min(own) <= image.min() and image.max() <= max(own), "only its own group's defect, feathered into its surface"
            assert (image[target] == own[1]).any()
    for (a, ya), (b, yb) in zip(crops(0.5), crops(0.5)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
    plain = _take(training_dataset(images, batch_size=8, seed=3, crop_size=32), 2)
    zero = _take(training_dataset(images, batch_size=8, seed=3, crop_size=32, defect_paste_fraction=0.0), 2)
    for (a, _), (b, _) in zip(plain, zero):
        np.testing.assert_array_equal(a, b)
    good_only = images.subset([0, 2, 4], "good only")
    (x, y), = _take(training_dataset(good_only, batch_size=4, seed=0, crop_size=32, defect_paste_fraction=1.0), 1)
    assert x.shape == (4, 32, 32, 1) and not y.any(), "nothing to paste: the crops as they are"


def test_file_cache_and_no_cache_give_the_same_stream(tmp_path):
    images = _images()
    memory = _take(training_dataset(images, batch_size=2, seed=3, cache="memory"), 4)
    on_disk = _take(training_dataset(images, batch_size=2, seed=3, cache=str(tmp_path / "cache")), 4)
    uncached = _take(training_dataset(images, batch_size=2, seed=3, cache="none"), 4)
    for (a, _), (b, _), (c, _) in zip(memory, on_disk, uncached):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert list(tmp_path.glob("cache*"))
    # The same prefix for another split: its own images, not the cached ones (validation images were trained on).
    other = images.subset([1, 3], "another split")
    (x, _), = _take(training_dataset(other, batch_size=2, seed=3, cache=str(tmp_path / "cache")), 1)
    assert set(np.round((x[:, 20, 20, 0] + 1) * 127.5).astype(int)) <= {15, 35}


def test_evaluation_dataset_keeps_order_and_whole_images():
    batches = _take(evaluation_dataset(_images(n=5), batch_size=2), 10)
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]
    firsts = [round((x[i, 20, 20, 0] + 1) * 127.5) for x, _ in batches for i in range(len(x))]
    assert firsts == [5, 15, 25, 35, 45]


def test_refuses_empty_sets_and_oversized_crops():
    with pytest.raises(DataError, match="crop_size 48"):
        training_dataset(_images(), batch_size=2, seed=0, crop_size=48)
    with pytest.raises(DataError, match="no usable images"):
        training_dataset(_images(n=0), batch_size=2, seed=0)


def _zarr_set(path, images, labels, classes):
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(1,) + images.shape[1:] if images.ndim == 3 else images.shape)
    if labels is not None:
        group.create_array("labels", data=labels, chunks=(1,) + labels.shape[1:] if labels.ndim == 3 else labels.shape)
    if classes is not None:
        group.attrs["classes"] = classes
    return path


def test_zarr_stack_and_strip_samples(tmp_path):
    from defectscan.data.zarrset import read_zarr

    stack = np.arange(3 * 32 * 32, dtype=np.uint16).reshape(3, 32, 32) * 20
    labels = np.zeros((3, 32, 32), np.uint8)
    labels[1, 4:8, 4:8] = 2
    samples = read_zarr(_zarr_set(tmp_path / "stack.zarr", stack, labels, ["scratch", "spot"]))
    assert len(samples) == 3 and samples.shape == (32, 32) and samples.classes == ["scratch", "spot"]
    assert samples.defective == [False, True, False]
    image, classes = samples.load(1)
    assert image.dtype == np.uint8 and np.array_equal(image, np.round(stack[1] / 257).astype(np.uint8))
    assert classes.max() == 2
    ((_, y),) = _take(training_dataset(samples, batch_size=3, seed=0, augment=False), 1)
    assert y.shape == (3, 32, 32, 2)
    # a 12-bit camera's set: scaled as inspection scales a set registered with --bit-depth 12 (it trained on 0..16)
    from defectscan.data.pixels import as_uint8
    from defectscan.model.recipe import DataSpec

    twelve = np.minimum(stack, 4095).astype(np.uint16)
    spec = DataSpec(format="zarr", path=str(_zarr_set(tmp_path / "twelve.zarr", twelve, labels, ["scratch", "spot"])), bit_depth=12)
    assert np.array_equal(spec.open().load(2)[0], as_uint8(twelve[2], 12)) and spec.open().load(2)[0].max() == 255
    cache = str(tmp_path / "cache")  # one cache prefix for both scalings: each gets its own file
    as_16 = _take(training_dataset(DataSpec(format="zarr", path=spec.path).open(), batch_size=3, seed=0, augment=False, cache=cache), 1)
    as_12 = _take(training_dataset(spec.open(), batch_size=3, seed=0, augment=False, cache=cache), 1)
    assert as_12[0][0].max() > as_16[0][0].max()
    with pytest.raises(ValueError, match="data.classes and data.per_class do not apply to a zarr set"):
        DataSpec(format="zarr", path="x.zarr", classes=["scratch"])
    with pytest.raises(ValueError, match="data.bit_depth and data.fill_missing_chunks apply to zarr sets, not to dagm files"):
        DataSpec(format="dagm", path="x", bit_depth=12)

    strip = np.full((40, 70), 9, np.uint8)
    strip_labels = np.zeros((40, 70), np.uint8)
    strip_labels[20, 40] = 1
    tiles = read_zarr(_zarr_set(tmp_path / "strip.zarr", strip, strip_labels, ["defect"]), tile=32)
    assert tiles.keys == ["y0x0", "y0x32"] and tiles.defective == [False, True]


def test_zarr_without_labels_or_classes_is_refused(tmp_path):
    from defectscan.data.zarrset import read_zarr

    images = np.full((2, 32, 32), 9, np.uint8)
    with pytest.raises(DataError, match="no array 'labels'"):
        read_zarr(_zarr_set(tmp_path / "a.zarr", images, None, ["defect"]))
    with pytest.raises(DataError, match="'classes' must be a non-empty list"):
        read_zarr(_zarr_set(tmp_path / "b.zarr", images, np.zeros_like(images), None))
    bad = np.zeros_like(images)
    bad[0, 0, 0] = 3
    # when opened, not when TensorFlow loads the sample mid-training (a traceback then)
    with pytest.raises(DataError, match=r"c.zarr: labels of sample\(s\) 0 \(class 3\) name a class beyond the 1 in attribute 'classes' \(defect\)"):
        read_zarr(_zarr_set(tmp_path / "c.zarr", images, bad, ["defect"]))
    with pytest.raises(DataError, match="does not exist"):
        read_zarr(tmp_path / "missing.zarr")


def test_zarr_training_set_with_missing_image_chunks_or_still_being_written_is_refused(tmp_path):
    """Zarr reads a missing chunk as zeros: a black picture trained on with its defect label."""
    import shutil

    import zarr

    from defectscan.data.imageset import META_ATTR
    from defectscan.data.zarrset import read_zarr

    images = np.full((3, 32, 32), 9, np.uint8)
    path = _zarr_set(tmp_path / "a.zarr", images, np.zeros_like(images), ["defect"])
    assert len(read_zarr(path)) == 3
    shutil.rmtree(path / "images" / "c" / "1")
    with pytest.raises(DataError, match=r"a.zarr: 'images': 1 chunk\(s\) missing: \(1, 0, 0\) .*data.fill_missing_chunks: true"):
        read_zarr(path)
    # written with write_empty_chunks=False: the left-out chunk is the fill value, and the writer says so
    from defectscan.model.recipe import DataSpec

    filled = DataSpec(format="zarr", path=str(path), fill_missing_chunks=True).open()
    assert len(filled) == 3 and not filled.load(1)[0].any()
    again = _zarr_set(tmp_path / "b.zarr", images, np.zeros_like(images), ["defect"])
    zarr.open_group(str(again), mode="a").attrs[META_ATTR] = {"complete": False}
    with pytest.raises(DataError, match="marked incomplete"):
        read_zarr(again)


def test_zoomed_crops_keep_their_size_image_and_target_together_and_leave_unzoomed_streams_alone():
    images = _images(n=4, size=64)
    plain = _take(training_dataset(images, batch_size=16, seed=2, crop_size=24, augment=False), 2)
    again = _take(training_dataset(images, batch_size=16, seed=2, crop_size=24, augment=False, zoom=0.0), 2)
    for (xa, ya), (xb, yb) in zip(plain, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    zoomed = _take(training_dataset(images, batch_size=16, seed=2, crop_size=24, defect_crop_fraction=1.0, augment=False, zoom=0.5), 2)
    repeat = _take(training_dataset(images, batch_size=16, seed=2, crop_size=24, defect_crop_fraction=1.0, augment=False, zoom=0.5), 2)
    areas = set()
    for (x, y), (xr, yr) in zip(zoomed, repeat):
        np.testing.assert_array_equal(x, xr)
        assert x.shape == (16, 24, 24, 1) and set(np.unique(y)) <= {0.0, 1.0}
        for image, target in zip(x, y):
            if target.any():
                # The defect (8x4 px, value 250) is resized with its target: its pixels stay where the target is.
                assert image[..., 0][target[..., 0] > 0].mean() > 0.5
                areas.add(int(target.sum()))
    assert len(areas) > 3, f"the defect's size changes with the crop's scale, got areas {sorted(areas)}"

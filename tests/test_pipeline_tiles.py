"""Tiled inference of a large image equals whole-image inference (real TinyUNet structure)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from defectscan.model.preprocess import InputContract, pad_to_multiple, to_model_input
from defectscan.pipeline.plan import plan_strip, plan_tiles, window_shape
from defectscan.model.export import file_sha256
from defectscan.pipeline.worker import ArrayRef, ModelRef, inspect_tiles, probabilities, window_input

from pipeline_helpers import save_small_unet, textured

GRID = InputContract()  # the small UNet's: multiple of 16


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory):
    path = save_small_unet(tmp_path_factory.mktemp("model") / "small.keras")
    return ModelRef(uri=str(path), sha256=file_sha256(str(path)), classes=("defect",), batch_size=2)


@pytest.mark.parametrize("shape", [(700, 1100), (512, 1536)])
def test_tiles_cover_the_image_once_inside_their_windows(shape):
    height, width = shape
    covered = np.zeros(shape, np.int32)
    win_h, win_w = window_shape(height, width, 256, 128, contract=GRID)
    for tile in plan_tiles(height, width, 256, 128, contract=GRID):
        y0, x0, y1, x1 = tile.core
        wy, wx = tile.window
        assert wy % 16 == 0 and wx % 16 == 0
        assert wy <= y0 and wx <= x0 and y1 <= wy + win_h and x1 <= wx + win_w
        # the core keeps a full halo from the window's edge, except where the window meets the image's edge
        assert y0 - wy >= 128 or wy == 0
        assert wx + win_w - x1 >= 128 or wx + win_w >= width
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


def test_tiled_probabilities_equal_whole_image(model_ref):
    image = textured((700, 1100), seed=3)
    image[300:340, 500:700] = 250  # a bright bar across tile borders
    whole_x, _ = pad_to_multiple(to_model_input(image[None]))
    whole = probabilities(model_ref, whole_x)[0, :, :700, :1100]

    tiled = np.full_like(whole, np.nan)
    shape = window_shape(700, 1100, 256, 128, contract=GRID)
    tiles = plan_tiles(700, 1100, 256, 128, contract=GRID)
    windows = np.stack([window_input(image, tile, shape, contract=GRID) for tile in tiles])
    scores = probabilities(model_ref, to_model_input(windows))
    for tile, score in zip(tiles, scores, strict=True):
        y0, x0, y1, x1 = tile.core
        wy, wx = tile.window
        tiled[:, y0:y1, x0:x1] = score[:, y0 - wy : y1 - wy, x0 - wx : x1 - wx]
    assert not np.isnan(tiled).any()
    assert np.abs(tiled - whole).max() <= 1e-4


def test_too_small_halo_differs(model_ref):
    """The check above has teeth: without a halo, tile borders show."""
    image = textured((512, 768), seed=4)
    whole_x, _ = pad_to_multiple(to_model_input(image[None]))
    whole = probabilities(model_ref, whole_x)[0]
    tiles = plan_tiles(512, 768, 256, 0, contract=GRID)
    windows = np.stack([window_input(image, tile, window_shape(512, 768, 256, 0, contract=GRID), contract=GRID) for tile in tiles])
    tiled = np.zeros_like(whole)
    for tile, score in zip(tiles, probabilities(model_ref, to_model_input(windows)), strict=True):
        y0, x0, y1, x1 = tile.core
        tiled[:, y0:y1, x0:x1] = score[:, : y1 - y0, : x1 - x0]
    assert np.abs(tiled - whole).max() > 1e-3


def test_strip_written_through_tile_shards_matches_whole_image(model_ref, tmp_path):
    image = textured((600, 900), seed=5)
    source = zarr.create_array(tmp_path / "strip.zarr", shape=image.shape, chunks=(256, 256), dtype="uint8")
    source[...] = image
    out = zarr.create_array(tmp_path / "out.zarr", shape=(1, *image.shape), chunks=(1, 256, 256), dtype="uint8", fill_value=0)
    for shard in plan_strip(1, 600, 900, 256, 128, tiles_per_shard=3, contract=GRID):
        inspect_tiles(shard, ArrayRef(str(tmp_path / "strip.zarr"), ""), ArrayRef(str(tmp_path / "out.zarr"), ""), model_ref)
    whole_x, _ = pad_to_multiple(to_model_input(image[None]))
    expected = np.rint(probabilities(model_ref, whole_x)[0, :, :600, :900] * 255)
    # uint8 rounding of probabilities that agree to 1e-4 differs by at most one step
    assert np.abs(out[...].astype(int) - expected.astype(int)).max() <= 1


def test_the_receptive_radius_bounds_what_changes_an_output_pixel(tmp_path):
    """Everything farther than the contract's radius from a block of pixels can change without changing them."""
    import keras

    from defectscan.model.preprocess import contract_of, predict_probabilities

    model = keras.models.load_model(save_small_unet(tmp_path / "small.keras"))
    radius = contract_of(model).receptive_radius
    assert radius == 122
    image = textured((512, 512), seed=6)
    changed = textured((512, 512), seed=7)
    y0, y1 = 192, 320  # the block kept: 16-aligned, as tiles are placed
    keep = slice(y0 - radius, y1 + radius)
    changed[keep, keep] = image[keep, keep]
    before, after = predict_probabilities(model, np.stack([image, changed]))
    assert np.abs(before[y0:y1, y0:y1] - after[y0:y1, y0:y1]).max() <= 1e-5
    assert np.abs(before - after).max() > 1e-3  # the change reached the rest of the map


def test_a_strip_whose_tiles_do_not_suit_the_model_is_refused_before_any_work(factory, cluster, tmp_path):
    from defectscan.config import load_settings
    from defectscan.errors import ConfigError
    from defectscan.pipeline.run import inspect_image_sets

    from pipeline_helpers import add_model, register, save_threshold_model, write_strip

    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    strip = register(factory, write_strip(tmp_path / "S.zarr", textured((200, 300))))
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__TILE_SIZE": "128", "DEFECTSCAN_INSPECTION__HALO": "100"}).inspection
    with pytest.raises(ConfigError, match=r"inspection.tile_size/halo for model threshold:1 on image set \d+: tile_size \(128\) and halo \(100\) "
                                          r"must be multiples of 16, the model's input multiple"):
        inspect_image_sets(factory, cluster, model, [strip], settings, max_in_flight=1)


def test_a_deeper_unet_variant_is_registered_and_inspected_with_its_own_input_contract(factory, cluster, tmp_path):
    """Five poolings: inputs padded to multiples of 32, a receptive radius of 250 pixels. Nothing assumes 16."""
    import keras

    from defectscan.config import load_settings
    from defectscan.errors import ConfigError
    from defectscan.model.preprocess import predict_probabilities
    from defectscan.model.registry import register_model
    from defectscan.model.unet import build_model
    from defectscan.pipeline.run import inspect_image_sets
    from defectscan.pipeline.worker import _open

    from pipeline_helpers import register, write_stack, write_strip

    deep = build_model(filters=(4, 4, 8, 8, 16, 16), seed=0)
    deep.build((None, None, None, 1))
    deep.save(tmp_path / "deep.keras")
    with factory() as session:
        model = register_model(session, tmp_path / "deep.keras", name="deep", version="1")
        session.commit()
        session.refresh(model)
    assert (model.input_spec["multiple_of"], model.input_spec["receptive_radius"]) == (32, 250)

    images = np.stack([textured((48, 80), seed=s) for s in range(4)])  # 48 and 80: multiples of 16, not of 32
    stack = register(factory, write_stack(tmp_path / "L.zarr", images))
    strip = register(factory, write_strip(tmp_path / "S.zarr", textured((200, 300), seed=8)))
    environ = {"DEFECTSCAN_INSPECTION__BATCH_SIZE": "2", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "2", "DEFECTSCAN_INSPECTION__TILE_SIZE": "64"}
    too_small = load_settings(environ={**environ, "DEFECTSCAN_INSPECTION__HALO": "128"}).inspection
    with pytest.raises(ConfigError, match=r"halo \(128\) is less than the model's receptive radius \(250 pixels\): tile borders would show; use 256 or more"):
        inspect_image_sets(factory, cluster, model, [stack, strip], too_small, max_in_flight=1)

    settings = load_settings(environ={**environ, "DEFECTSCAN_INSPECTION__HALO": "256"}).inspection
    summary = inspect_image_sets(factory, cluster, model, [stack, strip], settings, max_in_flight=2)
    assert summary.status == "succeeded" and summary.counts.inspected == 5, summary
    stored = _open(ArrayRef(f"{tmp_path / 'L.masks.zarr'}", "deep/1"), "r")[...]
    expected = np.rint(predict_probabilities(keras.models.load_model(tmp_path / "deep.keras"), images) * 255).transpose(0, 3, 1, 2)
    assert np.abs(stored.astype(int) - expected.astype(int)).max() <= 1


def test_the_compiled_uint8_program_gives_the_scores_of_the_float_probabilities(model_ref):
    """Workers scale pixels and round scores inside the compiled program: the same numbers as scaling and
    rounding in numpy around the float model (what `evaluate` does), padding and cropping included."""
    from defectscan.model.verdict import to_uint8
    from defectscan.pipeline.worker import score_images

    images = np.stack([textured((200, 300), seed=s) for s in range(3)])
    images[1, 50:90, 100:180] = 250
    x, (height, width) = pad_to_multiple(to_model_input(images))
    expected = to_uint8(probabilities(model_ref, x))[:, :, :height, :width]
    scores = score_images(model_ref, images)
    assert scores.dtype == np.uint8 and scores.shape == (3, 1, 200, 300)
    np.testing.assert_array_equal(scores, expected)


def test_two_task_threads_of_a_worker_call_its_model_one_at_a_time():
    """threads_per_worker > 1: shards overlap around the model, never inside it (the runtimes are not
    thread-safe for one model, and their own pools already use the cores)."""
    import threading
    import time

    from defectscan.pipeline.worker import _batched

    inside, most = [0], [0]

    def program(batch):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        inside[0] -= 1
        return batch.transpose(0, 3, 1, 2)

    x = np.zeros((12, 8, 8, 1), np.uint8)
    threads = [threading.Thread(target=_batched, args=(program, x, 4, 1, np.uint8)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_large_images_go_through_the_model_fewer_at_a_time_with_the_same_scores(model_ref, monkeypatch):
    """A batch of 8 images of 1024x1024 held 4.5 GB of activations, and a set of one such image was padded to 8."""
    from dataclasses import replace

    from defectscan.pipeline import worker

    images = np.stack([textured((64, 96), seed=s) for s in range(3)])
    whole = worker.score_images(model_ref, images)
    shapes = []
    real = worker._batched
    monkeypatch.setattr(worker, "_batched", lambda program, x, batch_size, *rest: shapes.append(batch_size) or real(program, x, batch_size, *rest))
    capped = replace(model_ref, batch_size=8, max_batch_pixels=64 * 96)
    np.testing.assert_array_equal(worker.score_images(capped, images), whole)
    assert shapes == [1]
    assert worker.calls_of(replace(model_ref, batch_size=8, max_batch_pixels=4 * 1024 * 1024), (1024, 1024)) == 4
    assert worker.calls_of(replace(model_ref, batch_size=8, max_batch_pixels=4 * 1024 * 1024), (4096, 4096)) == 1
    assert worker.calls_of(replace(model_ref, batch_size=8, max_batch_pixels=4 * 1024 * 1024), (512, 512)) == 8

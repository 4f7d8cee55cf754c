"""Tiled inference of a large image equals whole-image inference (real TinyUNet structure)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from defectscan.model.preprocess import pad_to_multiple, to_model_input
from defectscan.pipeline.plan import plan_strip, plan_tiles, window_shape
from defectscan.model.export import file_sha256
from defectscan.pipeline.worker import ArrayRef, ModelRef, inspect_tiles, probabilities, window_input

from pipeline_helpers import save_small_unet, textured


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory):
    path = save_small_unet(tmp_path_factory.mktemp("model") / "small.keras")
    return ModelRef(uri=str(path), sha256=file_sha256(str(path)), classes=("defect",), batch_size=2)


@pytest.mark.parametrize("shape", [(700, 1100), (512, 1536)])
def test_tiles_cover_the_image_once_inside_their_windows(shape):
    height, width = shape
    covered = np.zeros(shape, np.int32)
    win_h, win_w = window_shape(height, width, 256, 128)
    for tile in plan_tiles(height, width, 256, 128):
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
    shape = window_shape(700, 1100, 256, 128)
    tiles = plan_tiles(700, 1100, 256, 128)
    windows = np.stack([window_input(image, tile, shape) for tile in tiles])
    scores = probabilities(model_ref, windows)
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
    tiles = plan_tiles(512, 768, 256, 0)
    windows = np.stack([window_input(image, tile, window_shape(512, 768, 256, 0)) for tile in tiles])
    tiled = np.zeros_like(whole)
    for tile, score in zip(tiles, probabilities(model_ref, windows), strict=True):
        y0, x0, y1, x1 = tile.core
        tiled[:, y0:y1, x0:x1] = score[:, : y1 - y0, : x1 - x0]
    assert np.abs(tiled - whole).max() > 1e-3


def test_strip_written_through_tile_shards_matches_whole_image(model_ref, tmp_path):
    image = textured((600, 900), seed=5)
    source = zarr.create_array(tmp_path / "strip.zarr", shape=image.shape, chunks=(256, 256), dtype="uint8")
    source[...] = image
    out = zarr.create_array(tmp_path / "out.zarr", shape=(1, *image.shape), chunks=(1, 256, 256), dtype="uint8", fill_value=0)
    for shard in plan_strip(1, 600, 900, 256, 128, tiles_per_shard=3):
        inspect_tiles(shard, ArrayRef(str(tmp_path / "strip.zarr"), ""), ArrayRef(str(tmp_path / "out.zarr"), ""), model_ref)
    whole_x, _ = pad_to_multiple(to_model_input(image[None]))
    expected = np.rint(probabilities(model_ref, whole_x)[0, :, :600, :900] * 255)
    # uint8 rounding of probabilities that agree to 1e-4 differs by at most one step
    assert np.abs(out[...].astype(int) - expected.astype(int)).max() <= 1

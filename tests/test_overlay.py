"""report/overlay.py on arrays whose drawing is known pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage

from defectscan.report.pixels import DefectMask
from defectscan.errors import DataError
from defectscan.report.overlay import CROP_MARGIN, TINT_FROM, class_color, crop_window, outline, render, save_png, to_rgb


def _ring(h: int, w: int) -> np.ndarray:
    ring = np.ones((h, w), bool)
    ring[1:-1, 1:-1] = False
    return ring


def test_outline_is_the_mask_pixels_touching_the_outside():
    square = np.ones((5, 6), bool)
    assert (outline(square) == _ring(5, 6)).all()
    plus = np.zeros((3, 3), bool)
    plus[1, :] = plus[:, 1] = True
    centre_only = np.zeros((3, 3), bool)
    centre_only[1, 1] = True
    assert (outline(plus) == plus & ~centre_only).all()  # the centre has all four neighbours inside
    line = np.zeros((3, 5), bool)
    line[1, :] = True
    assert (outline(line) == line).all()
    assert not outline(np.zeros((4, 4), bool)).any()


def test_render_draws_contours_in_class_colours_over_the_tinted_image():
    image = np.full((40, 50), 100, np.uint8)
    scores = np.zeros((2, 40, 50), np.uint8)
    scores[0, 10:16, 20:28] = 255
    scores[1, 2:4, 2:4] = TINT_FROM - 1  # too faint to tint
    a = DefectMask(7, 0, "scratch", (10, 20, 16, 28), np.ones((6, 8), bool), 0.99)
    b = DefectMask(8, 1, "stain", (30, 5, 33, 8), np.ones((3, 3), bool), 0.7)
    picture = np.asarray(render(image, [a, b], scores))
    assert picture.shape == (40, 50, 3)
    ys, xs = np.nonzero(_ring(6, 8))
    assert (picture[ys + 10, xs + 20] == class_color(0)).all()
    ys, xs = np.nonzero(_ring(3, 3))
    assert (picture[ys + 30, xs + 5] == class_color(1)).all()
    inside = picture[12, 22]
    assert tuple(inside) == (193, 40, 40)  # score 1: 0.6 of the red tint over gray 100
    assert (picture[3, 3] == 100).all() and (picture[39, 49] == 100).all()
    assert class_color(0) != class_color(1)


def test_render_window_with_origin_and_clipped_contours():
    image = np.full((20, 20), 50, np.uint8)
    d = DefectMask(1, 0, "x", (100, 200, 104, 230), np.ones((4, 30), bool), 0.9)
    picture = np.asarray(render(image, [d], origin=(95, 195), labels=False))
    # box rows 100..103 -> window rows 5..8, columns 200.. -> 5..19 (the rest is outside the window)
    assert (picture[5, 5:20] == class_color(0)).all() and (picture[8, 5:20] == class_color(0)).all()
    assert (picture[6:8, 5] == class_color(0)).all() and (picture[6, 6] == 50).all()


def test_sixteen_bit_images_are_scaled_and_bad_inputs_refused(tmp_path):
    wide = np.array([[0, 1000], [2000, 4000]], np.uint16)
    assert to_rgb(wide)[:, :, 0].tolist() == [[0, 64], [128, 255]]
    with pytest.raises(DataError, match="expected a 2-D gray image"):
        to_rgb(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataError, match="does not cover the 4x4 image"):
        render(np.zeros((4, 4), np.uint8), [], np.zeros((1, 3, 3), np.uint8))
    with pytest.raises(DataError, match="cannot write the PNG"):
        save_png(PILImage.new("RGB", (2, 2)), tmp_path / "missing-dir" / "x.png")
    out = save_png(PILImage.new("RGB", (2, 2)), tmp_path / "x.png")
    assert PILImage.open(out).size == (2, 2)


def test_crop_window_grows_the_box_and_stays_inside_the_image():
    assert crop_window((30, 40, 38, 48), (64, 64)) == (30 - CROP_MARGIN, 40 - CROP_MARGIN, 38 + CROP_MARGIN, 48 + CROP_MARGIN)
    assert crop_window((0, 2, 5, 63), (64, 64), margin=4) == (0, 0, 9, 64)

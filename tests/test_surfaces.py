"""The real-photo DAGM-like generator: layout read back, determinism, labels, offline sources, refusals."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from defectscan.data.dagm import read_dagm
from defectscan.data.surfaces import SKIMAGE_SOURCES, SURFACES, SurfaceSpec, make_surface_sample, write_surfaces_dagm
from defectscan.data.synth import DEFECT_KINDS
from defectscan.errors import DataError
from skimage.data import _fetchers


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos():
    return {name: load() for name, load in SURFACES.items()}


def test_writes_the_dagm_layout_that_read_dagm_reads(tmp_path):
    spec = SurfaceSpec(surfaces=("terrain", "moon"), train=4, test=3, size=64, defect_fraction=0.5, seed=1)
    summary = write_surfaces_dagm(tmp_path, spec)
    assert (summary.images, summary.defective) == (14, 2 * (2 + 2))
    assert json.loads((tmp_path / "surfaces.json").read_text()) == {"Class1": "terrain", "Class2": "moon"}
    for split, count in (("Train", 4), ("Test", 3)):
        images = read_dagm(tmp_path, split, per_class=True, strict=True)
        assert len(images) == 2 * count and images.shape == (64, 64) and not images.problems
        assert images.classes == ["Class1", "Class2"]
        assert sum(images.defective) == 2 * round(count * 0.5)
        for i, key in enumerate(images.keys):
            image, classes = images.load(i)
            assert image.dtype == np.uint8 and image.std() > 5, "a textured photo, not a flat field"
            assert classes.any() == images.defective[i]
            assert set(np.unique(classes)) <= {0, 1 + int(key.startswith("Class2"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    spec = SurfaceSpec(surfaces=("moon", "deep_field"), train=3, test=2, size=64, seed=4)
    write_surfaces_dagm(tmp_path / "a", spec)
    write_surfaces_dagm(tmp_path / "b", spec)
    write_surfaces_dagm(tmp_path / "c", SurfaceSpec(surfaces=("moon", "deep_field"), train=3, test=2, size=64, seed=5))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_a_surface_and_split_have_their_own_stream(tmp_path):
    write_surfaces_dagm(tmp_path / "both", SurfaceSpec(surfaces=("moon", "deep_field"), train=2, test=2, size=32, seed=2))
    write_surfaces_dagm(tmp_path / "one", SurfaceSpec(surfaces=("deep_field",), train=2, test=2, size=32, seed=2))
    both, one = _files(tmp_path / "both" / "Class2"), _files(tmp_path / "one" / "Class1")
    assert both == one, "a surface's images do not depend on which other surfaces are asked for"
    assert both["Train/0001.PNG"] != both["Test/0001.PNG"]


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_change_the_pixels_under_the_label_only(photos, kind):
    for index, (name, photo) in enumerate(photos.items()):
        # The crop and camera are drawn first: the same stream gives the same picture without the defect.
        image, label = make_surface_sample(np.random.default_rng(index), photo, 96, (kind,), defective=True)
        clean, no_label = make_surface_sample(np.random.default_rng(index), photo, 96, (kind,), defective=False)
        assert no_label is None and image.dtype == np.uint8 and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 255}
        inside = label > 0
        assert 0 < inside.mean() < 0.5, name
        changed = image.astype(int) != clean.astype(int)
        assert changed[inside].sum() > 5, f"{kind} on {name} is visible"
        assert not changed[~inside].any(), f"{kind} on {name} stays inside its label"


def test_surfaces_load_offline_as_gray_photos(photos, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a surface tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name, load in SURFACES.items():
        photo = load()
        assert photo.ndim == 2 and photo.dtype == np.float64, name
        assert 0.0 <= photo.min() and photo.max() <= 1.0 and photo.std() > 0.02, name
        assert min(photo.shape) >= 256, name
        np.testing.assert_array_equal(photo, photos[name])


def test_the_surfaces_read_only_the_allowed_photo_files(monkeypatch):
    """Photos kept for an independent check never enter a dataset: only the listed files are read."""
    fetched = []
    original_fetch = _fetchers._fetch
    monkeypatch.setattr(_fetchers, "_fetch", lambda name, *a, **k: fetched.append(name) or original_fetch(name, *a, **k))
    for load in SURFACES.values():
        load()
    assert sorted(fetched) == sorted(SKIMAGE_SOURCES)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size": 100}, "size must be a multiple of 16 and at least 32, got 100"),
        ({"size": 16}, "size must be a multiple of 16 and at least 32, got 16"),
        ({"defect_fraction": 1.5}, "defect_fraction must be within 0..1, got 1.5"),
        ({"train": -1}, "train and test counts must not be negative, got -1, 40"),
        ({"seed": -3}, "seed must not be negative, got -3"),
        ({"surfaces": ()}, "surfaces must name at least one surface"),
        ({"surfaces": ("moon", "wood")}, "unknown surface 'wood'; known: moon, tissue, terrain, deep_field"),
        ({"surfaces": ("moon", "moon")}, "surfaces must not repeat, got moon, moon"),
        ({"defects": ("dent",)}, "unknown defect kind 'dent'; known: scratch, spot, crack, stain"),
        ({"defects": ()}, "defects must name at least one defect kind"),
        ({"contrast": (3.0, 2.0)}, "contrast must be LOW, HIGH with 0 < LOW <= HIGH (standard deviations), got (3.0, 2.0)"),
        ({"contrast": (0.0, 2.0)}, "contrast must be LOW, HIGH with 0 < LOW <= HIGH"),
        ({"contrast": (2.0,)}, "contrast must be LOW, HIGH with 0 < LOW <= HIGH"),
    ],
)
def test_bad_specs_are_refused_in_one_line(fields, message):
    with pytest.raises(DataError) as caught:
        SurfaceSpec(**fields)
    assert message in str(caught.value) and "\n" not in str(caught.value)



def test_a_single_name_is_one_surface():
    assert SurfaceSpec(surfaces="moon", defects="spot") == SurfaceSpec(surfaces=("moon",), defects=("spot",))


def test_the_contrast_range_sets_how_far_a_defect_moves_the_pixels(photos):
    moved = {}
    for contrast in ((1.0, 1.0), (3.0, 3.0)):
        image, label = make_surface_sample(np.random.default_rng(7), photos["terrain"], 128, ("spot",), True, contrast)
        clean, _ = make_surface_sample(np.random.default_rng(7), photos["terrain"], 128, ("spot",), False, contrast)
        inside = label > 0
        moved[contrast] = np.abs(image.astype(int) - clean.astype(int))[inside].mean()
    assert 2.0 < moved[(3.0, 3.0)] / moved[(1.0, 1.0)] <= 3.2, moved

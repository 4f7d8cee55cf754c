"""The synthetic DAGM-like generator: layout, determinism, defect kinds, weak ellipse labels."""

from __future__ import annotations

import numpy as np
import pytest
from defectscan.data.imagefiles import read_image
from defectscan.data.synth import _SHAPES, DEFECT_KINDS, SynthSpec, ellipse_label, make_sample, write_synthetic_dagm
from defectscan.errors import DataError
from scipy import ndimage


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_the_dagm_layout_with_labels(tmp_path):
    summary = write_synthetic_dagm(tmp_path, SynthSpec(classes=2, train=4, test=2, size=64, defect_fraction=0.5, seed=1))
    assert (summary.images, summary.defective) == (12, 6)
    for cls in ("Class1", "Class2"):
        lines = (tmp_path / cls / "Train" / "Label" / "Labels.txt").read_text().splitlines()
        assert lines[0] == "1" and len(lines) == 5
        for line in lines[1:]:
            number, defective, image, zero, label = line.split("\t")
            assert image == f"{int(number):04d}.PNG" and zero == "0"
            picture = read_image(tmp_path / cls / "Train" / image)
            assert picture.shape == (64, 64) and picture.dtype == np.uint8
            if defective == "1":
                mask = read_image(tmp_path / cls / "Train" / "Label" / label)
                assert set(np.unique(mask)) == {0, 255}
            else:
                assert label == "0"


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    spec = SynthSpec(classes=2, train=3, test=1, size=64, seed=4)
    write_synthetic_dagm(tmp_path / "a", spec)
    write_synthetic_dagm(tmp_path / "b", spec)
    write_synthetic_dagm(tmp_path / "c", SynthSpec(classes=2, train=3, test=1, size=64, seed=5))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_every_defect_kind_is_visible_and_inside_its_ellipse_label(kind):
    rng = np.random.default_rng(3)
    defect = _SHAPES[kind](rng, 128)
    assert 10 < defect.sum() < 0.3 * defect.size
    label = ellipse_label(defect)
    assert label[defect].all(), "the weak label covers the whole defect"
    # A weak label: larger than the defect, and one filled blob.
    assert label.sum() > defect.sum()
    assert ndimage.label(label)[1] == 1


def test_defects_change_the_pixels_under_the_label_only():
    for class_index in range(len(DEFECT_KINDS)):
        # The texture is drawn first, so the same stream gives the same surface with and without the defect.
        image, label = make_sample(np.random.default_rng(class_index), 128, class_index, defective=True)
        clean, no_label = make_sample(np.random.default_rng(class_index), 128, class_index, defective=False)
        assert no_label is None and image.dtype == np.uint8
        inside = label > 0
        assert 0 < inside.mean() < 0.5
        assert clean.std() > 10, "textured background"
        changed = image.astype(int) != clean.astype(int)
        assert changed[inside].sum() > 5
        assert not changed[~inside].any()


def test_bad_specs_are_refused():
    with pytest.raises(DataError, match="multiple of 16"):
        SynthSpec(size=100)
    with pytest.raises(DataError, match="defect_fraction"):
        SynthSpec(defect_fraction=1.5)
    with pytest.raises(DataError, match="classes"):
        SynthSpec(classes=0)
    with pytest.raises(DataError, match="^synthetic dataset: seed must not be negative, got -1$"):
        SynthSpec(seed=-1)


def test_a_negative_training_seed_is_refused_by_name():
    """It was accepted, then failed in numpy as 'expected non-negative integer' when carving validation."""
    from defectscan.errors import ConfigError
    from defectscan.model.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"train.seed: Input should be greater than or equal to 0 \(got -1\)"):
        load_recipe(None, ["train.seed=-1"])


def test_cli_data_synth(cli, tmp_path):
    result = cli("data", "synth", str(tmp_path / "s"), "--classes", "1", "--train", "2", "--test", "2", "--size", "32", "--defect-fraction", "1")
    assert result.exit_code == 0, result.output
    assert "4 images (4 defective) in 1 classes, 32x32" in result.output
    assert len(list((tmp_path / "s" / "Class1" / "Test" / "Label").glob("*_label.PNG"))) == 2


def test_a_dataset_is_written_only_to_a_new_or_empty_folder(tmp_path, cli):
    """A 2-class run over a 4-class one kept Class3 and Class4, which then joined the dataset."""
    out = tmp_path / "s"
    first = cli("data", "synth", str(out), "--classes", "2", "--train", "1", "--test", "1", "--size", "32")
    assert first.exit_code == 0, first.output
    again = cli("data", "synth", str(out), "--classes", "1", "--train", "1", "--test", "1", "--size", "32")
    assert again.exit_code == 1
    assert again.output.strip() == f"Error: {out}: already exists and is not an empty folder; write the dataset to a new folder, or delete it first"
    assert sorted(p.name for p in out.iterdir()) == ["Class1", "Class2"]

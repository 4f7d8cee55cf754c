"""DAGM 2007 reader and the images + masks folders reader: layout, classes, bad files by name."""

from __future__ import annotations

import numpy as np
import pytest
from defectscan.data.dagm import read_dagm
from defectscan.data.folders import read_folders
from defectscan.data.synth import SynthSpec, write_synthetic_dagm
from defectscan.errors import DataError
from PIL import Image


@pytest.fixture
def dagm(tmp_path):
    root = tmp_path / "dagm"
    write_synthetic_dagm(root, SynthSpec(classes=2, train=4, test=2, size=32, defect_fraction=0.5, seed=0))
    return root


def _labels(root, cls="Class1", split="Train"):
    return root / cls / split / "Label" / "Labels.txt"


def test_reads_all_classes_merged_into_one_defect_class(dagm):
    images = read_dagm(dagm, "Train")
    assert len(images) == 8 and images.classes == ["defect"] and images.shape == (32, 32)
    assert sum(images.defective) == 4 and not images.problems
    assert images.keys[0] == "Class1/Train/0001.PNG"
    for i in range(len(images)):
        image, classes = images.load(i)
        assert image.dtype == np.uint8 and classes.dtype == np.uint8
        assert set(np.unique(classes)) <= {0, 1}
        assert classes.any() == images.defective[i]
    assert len(read_dagm(dagm, "Test")) == 4


def test_per_class_gives_each_folder_its_own_class(dagm):
    images = read_dagm(dagm, "Train", per_class=True)
    assert images.classes == ["Class1", "Class2"]
    values = {int(images.load(i)[1].max()) for i in range(len(images)) if images.defective[i]}
    assert values == {1, 2}
    only = read_dagm(dagm, "Train", classes=["Class2"])
    assert len(only) == 4 and all(k.startswith("Class2/") for k in only.keys)
    with pytest.raises(DataError, match="no class folder Class9"):
        read_dagm(dagm, classes=["Class9"])


def test_bad_files_are_skipped_counted_and_named(dagm):
    train = dagm / "Class1" / "Train"
    (train / "0001.PNG").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(train / "0002.PNG")
    lines = _labels(dagm).read_text().splitlines()
    lines[3] = "3\tmaybe\t0003.PNG\t0\t0"
    _labels(dagm).write_text("\n".join(lines) + "\n")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(train / "Label" / "0099_label.PNG")
    (train / "0004.PNG").unlink()

    images = read_dagm(dagm, "Train")
    found = {str(p.path).replace(str(dagm) + "/", ""): p.reason for p in images.problems}
    assert found["Class1/Train/0001.PNG"].startswith("unreadable: not an image file")
    assert found["Class1/Train/0002.PNG"] == "wrong size: 16x16, expected 32x32 like the rest of the dataset"
    assert any(k.startswith("Class1/Train/Label/Labels.txt:4") and v.startswith("unparsable Labels.txt line") for k, v in found.items())
    assert found["Class1/Train/Label/0099_label.PNG"] == "label without an image"
    assert any("0004" in k for k in found)
    assert "Class1/Train/0003.PNG" in found  # present but its line did not parse
    assert len(images) == 4 and all(k.startswith("Class2/") for k in images.keys)
    assert images.problems.summary().startswith(f"{len(images.problems)} skipped")


def test_strict_stops_at_the_first_bad_file(dagm):
    (dagm / "Class1" / "Train" / "0001.PNG").write_bytes(b"")
    with pytest.raises(DataError, match=r"Class1/Train/0001.PNG: unreadable: empty file"):
        read_dagm(dagm, "Train", strict=True)


def test_layout_errors_name_the_path(tmp_path, dagm):
    with pytest.raises(DataError, match="no ClassN folders"):
        read_dagm(tmp_path / "dagm" / "Class1")
    with pytest.raises(DataError, match="does not exist"):
        read_dagm(tmp_path / "nothing")
    _labels(dagm).unlink()
    with pytest.raises(DataError, match="Labels.txt not found"):
        read_dagm(dagm)
    with pytest.raises(DataError, match="split 'Val'"):
        read_dagm(dagm, "Val")


def test_cli_data_check_lists_bad_files_and_fails(cli, dagm):
    assert cli("data", "check", str(dagm)).exit_code == 0
    (dagm / "Class2" / "Train" / "0003.PNG").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = cli("data", "check", str(dagm))
    assert result.exit_code == 1
    assert f"bad file: {dagm}/Class2/Train/0003.PNG: unreadable" in result.output
    assert "7 images" in result.output
    strict = cli("data", "check", str(dagm), "--strict")
    assert strict.exit_code == 1 and "Error: " in strict.output and "0003.PNG" in strict.output


def _save(path, array):
    Image.fromarray(array).save(path)


def test_folders_reader_matches_masks_by_stem(tmp_path):
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    images_dir.mkdir()
    masks_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _save(images_dir / f"{name}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    binary = np.zeros((32, 32), np.uint8)
    binary[4:8, 4:8] = 255
    _save(masks_dir / "a_mask.png", binary)
    multi = np.zeros((32, 32), np.uint8)
    multi[0:2, 0:2], multi[10:12, 10:12] = 1, 2
    _save(masks_dir / "b.png", multi)
    _save(masks_dir / "zzz.png", binary)  # no image
    _save(images_dir / "d.png", np.zeros((8, 8), np.uint8))  # wrong size

    images = read_folders(images_dir, masks_dir, classes=["scratch", "spot"])
    assert images.keys == ["a.png", "b.png", "c.png"] and images.defective == [True, True, False]
    assert {str(p) for p in images.problems} == {
        f"{masks_dir}/zzz.png: mask without an image",
        f"{images_dir}/d.png: wrong size: 8x8, expected 32x32 like the rest of the dataset",
    }
    assert images.load(0)[1].max() == 1 and images.load(0)[1].sum() == 16
    assert sorted(np.unique(images.load(1)[1])) == [0, 1, 2]
    assert not images.load(2)[1].any()
    three = np.full((32, 32), 3, np.uint8)
    three[0, 0] = 0
    _save(masks_dir / "c.png", three)
    bad = read_folders(images_dir, masks_dir, classes=["scratch", "spot"])
    assert any("c.png" in str(p) and "mask value 3 is above the number of classes (2)" in p.reason for p in bad.problems)
    with pytest.raises(DataError, match="mask without an image"):
        read_folders(images_dir, masks_dir, strict=True)


def test_folders_reader_pairs_the_exact_stem_first_and_leaves_out_what_it_cannot_pair(tmp_path):
    """`bolt_label.png` was taken as the mask of `bolt.png`; a second mask or a second image of one stem overwrote silently."""
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    images_dir.mkdir()
    masks_dir.mkdir()
    rng = np.random.default_rng(1)
    for name in ("bolt.png", "bolt_label.png", "p1.png", "p2.png", "p2.bmp"):
        _save(images_dir / name, rng.integers(0, 255, (32, 32), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:8] = 255
    for name in ("bolt_label.png", "p1.png", "p1_mask.png", "p2.png"):
        _save(masks_dir / name, mask)

    images = read_folders(images_dir, masks_dir)
    assert images.keys == ["bolt.png", "bolt_label.png"] and images.defective == [False, True]
    assert sorted(str(p) for p in images.problems) == [
        f"{images_dir}/p2.png: another image has the same name stem (p2.bmp); both are left out",
        f"{masks_dir}/p1_mask.png: a second mask for p1.png (the first is p1.png); the image is left out",
    ]


def test_labels_with_trailing_tabs_are_read(dagm):
    """A spreadsheet's export ends each line with a tab: every entry was refused as '6 fields, expected 5'."""
    labels = _labels(dagm)
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0], *(line + "\t" for line in lines[1:])]) + "\n")
    images = read_dagm(dagm, "Train", classes=["Class1"])
    assert len(images) == 4 and not images.problems and sum(images.defective) == 2

"""Read (and write) a dataset in the DAGM 2007 layout.

    ClassN/{Train,Test}/NNNN.PNG
    ClassN/{Train,Test}/Label/Labels.txt   first line: a count/header; then tab-separated lines
                                           id, defective (0/1), image file, 0, label file or 0
    ClassN/{Train,Test}/Label/NNNN_label.PNG   weak label: an ellipse around each defect

Bad entries (an unreadable or wrongly sized image, a label without its image, a Labels.txt line
that does not parse) are reported by file name through a ProblemLog: skipped and counted by
default, the first one raised with strict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from defectscan.data.dataset import LabelledImages, keep_common_shape
from defectscan.data.imagefiles import read_image, read_labelled, read_mask
from defectscan.data.pixels import as_uint8
from defectscan.data.problems import ProblemLog
from defectscan.errors import DataError

SPLITS = ("Train", "Test")
MERGED_CLASS = "defect"
_CLASS_DIR = re.compile(r"^Class\d+$")


def natural_key(path: Path) -> list[str | int]:
    """Class2 before Class10: the order that gives DAGM's classes their numbers, in every reader."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def class_folders(root: Path) -> list[Path]:
    folders = sorted((p for p in root.iterdir() if p.is_dir() and _CLASS_DIR.match(p.name)), key=natural_key)
    if not folders:
        raise DataError(f"{root}: no ClassN folders; expected the DAGM 2007 layout ClassN/{{Train,Test}}/NNNN.PNG")
    return folders


def _parse_labels(labels_file: Path, problems: ProblemLog) -> dict[str, str | None]:
    """image file name -> label file name (None for a defect-free image)."""
    try:
        lines = labels_file.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{labels_file}: Labels.txt not found; expected the DAGM 2007 layout") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{labels_file}: cannot read: {exc}") from None
    entries: dict[str, str | None] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        # Trailing tabs (a spreadsheet's export) leave empty fields at the end; they are not fields.
        fields = line.rstrip().split("\t") if "\t" in line.rstrip() else line.split()
        try:
            if len(fields) != 5:
                raise ValueError(f"{len(fields)} fields, expected 5 (id, defective, image, 0, label)")
            int(fields[0])
            defective = int(fields[1])
            if defective not in (0, 1):
                raise ValueError(f"defective flag {fields[1]!r}, expected 0 or 1")
        except ValueError as exc:
            problems.add(f"{labels_file}:{number}", f"unparsable Labels.txt line: {exc}")
            continue
        image, label = fields[2], fields[4]
        if defective and label == "0":
            problems.add(f"{labels_file}:{number}", f"unparsable Labels.txt line: {image} is marked defective but names no label file")
            continue
        entries[image] = label if defective else None
    return entries


def check_listing(split_dir: Path, entries: dict[str, str | None], problems: ProblemLog) -> set[str]:
    """Report the label files no entry names and whose image is absent, and the images Labels.txt does not
    list (they would be left out without a word); the names of the PNG images present."""
    label_dir = split_dir / "Label"
    present = {p.name for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    listed_labels = {label for label in entries.values() if label}
    for label_file in sorted(p.name for p in label_dir.glob("*_label.*")):
        if label_file not in listed_labels and label_file.replace("_label", "") not in present:
            problems.add(label_dir / label_file, "label without an image")
    for name in sorted(present - set(entries)):
        problems.add(split_dir / name, "image not listed in Labels.txt")
    return present


def read_dagm(
    root: str | Path,
    split: str = "Train",
    classes: Sequence[str] | None = None,
    per_class: bool = False,
    strict: bool = False,
) -> LabelledImages:
    """The images of `split` in the chosen class folders (all by default).

    per_class=False merges every folder's defects into one class "defect" (one output channel);
    per_class=True gives each folder its own class, named after the folder.
    """
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"DAGM split {split!r} is not one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    folders = class_folders(root)
    if classes:
        wanted = set(classes)
        missing = wanted - {f.name for f in folders}
        if missing:
            raise DataError(f"{root}: no class folder {', '.join(sorted(missing))}; found {', '.join(f.name for f in folders)}")
        folders = [f for f in folders if f.name in wanted]
    problems = ProblemLog(strict=strict)
    class_names = [f.name for f in folders] if per_class else [MERGED_CLASS]
    candidates: list[tuple[tuple[Path, Path | None, int], tuple[int, int]]] = []

    for position, folder in enumerate(folders):
        split_dir = folder / split
        label_dir = split_dir / "Label"
        entries = _parse_labels(label_dir / "Labels.txt", problems)
        class_id = position + 1 if per_class else 1
        present = check_listing(split_dir, entries, problems)
        for image_name, label_name in entries.items():
            image_path = split_dir / image_name
            label_path = label_dir / label_name if label_name else None
            if image_name not in present:
                if label_path is not None:
                    problems.add(label_path, f"label without an image: {image_path} is missing")
                else:
                    problems.add(image_path, "listed in Labels.txt but missing")
                continue
            pair = read_labelled(image_path, label_path, problems, "label")
            if pair is None:
                continue
            image, _ = pair
            candidates.append(((image_path, label_path, class_id), image.shape))
    items, shape = keep_common_shape(candidates, problems, path_of=lambda item: item[0])

    def load(index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path, class_id = items[index]
        image = as_uint8(read_image(image_path))
        if label_path is None:
            return image, np.zeros(image.shape, np.uint8)
        return image, np.where(read_mask(label_path) > 0, class_id, 0).astype(np.uint8)

    return LabelledImages(
        name=f"{root} ({split})",
        keys=[str(image.relative_to(root)) for image, _, _ in items],
        classes=class_names,
        shape=shape,
        loader=load,
        defective=[label is not None for _, label, _ in items],
        problems=problems,
    )


def write_split(split_dir: Path, samples: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> list[str]:
    """Write one split folder: NNNN.PNG, Label/Labels.txt and Label/NNNN_label.PNG for each (image, label or
    None when defect-free) in order, numbered from 0001; the image file names written."""
    from PIL import Image

    label_dir = Path(split_dir) / "Label"
    label_dir.mkdir(parents=True, exist_ok=True)
    lines, names = [], []
    for i, (image, label) in enumerate(samples, start=1):
        name = f"{i:04d}"
        Image.fromarray(image).save(Path(split_dir) / f"{name}.PNG")
        if label is not None:
            Image.fromarray(label).save(label_dir / f"{name}_label.PNG")
            lines.append(f"{i}\t1\t{name}.PNG\t0\t{name}_label.PNG")
        else:
            lines.append(f"{i}\t0\t{name}.PNG\t0\t0")
        names.append(f"{name}.PNG")
    (label_dir / "Labels.txt").write_text("1\n" + "\n".join(lines) + ("\n" if lines else ""))
    return names

"""Which files an ingest takes: expand the paths given, recognise DAGM folders, name each image.

A path may be an image file, a folder of image files (not recursive, sorted by name) or a DAGM
2007 folder: one with Label/Labels.txt, or a parent of such folders (ClassN/{Train,Test}). A
DAGM folder brings its label images and class names; its Labels.txt is read by data/dagm.py. Each image's key is its path relative to
the common folder of everything ingested, so equal file names from two folders stay distinct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from defectscan.data.dagm import _parse_labels, check_listing, natural_key
from defectscan.data.imagefiles import IMAGE_SUFFIXES
from defectscan.data.problems import ProblemLog, utf8_name
from defectscan.errors import DataError

LABELS_FILE = Path("Label") / "Labels.txt"


@dataclass(frozen=True)
class Source:
    """One image file to ingest, with its DAGM label image and class (1-based) when it has one."""

    path: Path
    key: str
    label_path: Path | None = None
    class_index: int = 0


@dataclass(frozen=True)
class Sources:
    items: list[Source]
    # Class names when the inputs are DAGM folders (labels are written), else empty.
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def collect_sources(paths: list[str | Path], problems: ProblemLog) -> Sources:
    """Expand `paths` into image files; a path that does not exist or is not an image is a problem."""
    plain: list[Path] = []
    dagm_folders: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            problems.add(path, "does not exist")
        elif path.is_dir():
            found = _dagm_folders(path)
            files = _image_files(path, problems)
            if found:
                dagm_folders.extend(found)
                # A DAGM folder's own images come through its Labels.txt; a parent's own images would be dropped.
                if path not in found:
                    plain.extend(files)
            else:
                if not files:
                    problems.add(path, f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
                plain.extend(files)
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.add(path, f"not an image file name (expected one of {', '.join(IMAGE_SUFFIXES)})")
        else:
            plain.append(path)
    if plain and dagm_folders:
        raise DataError(
            "cannot mix DAGM folders (with labels) and plain image files in one image set: "
            f"ingest {', '.join(str(f) for f in dagm_folders[:3])} separately from {', '.join(str(p) for p in plain[:3])}"
        )
    if dagm_folders:
        return _dagm_sources(dagm_folders, problems)
    # Absolute, not resolved: a symlink keeps its own name as the key.
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in plain))
    root = _common_folder(unique)
    return Sources(_with_utf8_keys([Source(p, _key(p, root)) for p in unique], problems), [])


def _image_files(folder: Path, problems: ProblemLog) -> list[Path]:
    """The folder's image files by name; a broken link to one is reported rather than passed over unseen."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.is_file():
            files.append(path)
        elif path.is_symlink() and not path.exists():
            problems.add(path, "does not exist (a broken link)")
    return files


def _with_utf8_keys(items: list[Source], problems: ProblemLog) -> list[Source]:
    """The sources whose keys (their paths below the common folder) can be stored; the others reported, as one such
    file stopped the whole ingest. A folder above them may have any name: it is not part of a key."""
    for source in items:
        if not utf8_name(source.key):
            problems.add(source.path, "file name is not UTF-8 text (rename it; image keys are stored as UTF-8)")
    return [s for s in items if utf8_name(s.key)]


def _dagm_folders(path: Path) -> list[Path]:
    """Folders under `path` (itself, or two levels down at most) that hold Label/Labels.txt."""
    found = []
    for pattern in (LABELS_FILE, Path("*") / LABELS_FILE, Path("*") / "*" / LABELS_FILE):
        found.extend(sorted((labels.parent.parent for labels in path.glob(str(pattern))), key=natural_key))
    return found


def dagm_class_name(folder: Path) -> str:
    """ClassN for ClassN/Train and ClassN/Test folders, else the folder's own name."""
    return folder.parent.name if folder.name.lower() in ("train", "test") else folder.name


def _dagm_sources(folders: list[Path], problems: ProblemLog) -> Sources:
    classes: list[str] = []
    items: list[Source] = []
    # A folder given twice (or found under two paths given) is ingested once, as plain files are.
    resolved = list(dict.fromkeys(Path(os.path.abspath(f)) for f in folders))
    root = _common_folder([f / "x" for f in resolved])
    for folder in resolved:
        name = dagm_class_name(folder)
        if name not in classes:
            classes.append(name)
        class_index = classes.index(name) + 1
        for image, label in read_labels_txt(folder, problems):
            if not image.exists():
                problems.add(image, "listed in Label/Labels.txt but does not exist")
                continue
            if label is not None and not label.exists():
                problems.add(label, f"label image of {image.name} listed in Label/Labels.txt does not exist")
                continue
            items.append(Source(image, _key(image, root), label, class_index if label is not None else 0))
    return Sources(_with_utf8_keys(items, problems), classes)


def read_labels_txt(folder: Path, problems: ProblemLog) -> list[tuple[Path, Path | None]]:
    """(image, label image or None) per entry of folder/Label/Labels.txt, parsed by data/dagm.py."""
    entries = _parse_labels(folder / LABELS_FILE, problems)
    check_listing(folder, entries, problems)
    return [(folder / image, folder / "Label" / label if label else None) for image, label in entries.items()]


def _common_folder(paths: list[Path]) -> Path:
    if not paths:
        return Path(".")
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _key(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()

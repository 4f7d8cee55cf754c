"""Read an "images + masks" dataset: two folders, masks matched to images by file stem.

    images/part-001.png      masks/part-001.png   (or part-001_mask.png, part-001_label.png)

An image without a mask is defect-free. Mask pixels: a mask holding only 0 and 255 (or 0/1) is
one class; otherwise the value k > 0 is class k (1-based index into `classes`). A mask without
an image, an unreadable file or a wrong size is reported by name (skipped, or raised with strict).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectscan.data.dataset import LabelledImages, keep_common_shape
from defectscan.data.imagefiles import IMAGE_SUFFIXES, read_image, read_labelled, read_mask
from defectscan.data.pixels import as_uint8
from defectscan.data.problems import ProblemLog
from defectscan.errors import DataError

MASK_SUFFIXES = ("", "_mask", "_label")


def _image_of_mask(path: Path, image_stems: set[str]) -> str | None:
    """The stem of the image a mask belongs to: the same stem first (a mask `bolt_label.png` of the image
    `bolt_label.png`), then without `_mask`/`_label`; None when no image has either."""
    return path.stem if path.stem in image_stems else _named_as_mask_of(path.stem, image_stems)


def _named_as_mask_of(stem: str, image_stems: set[str]) -> str | None:
    """The image stem that `stem` is named as the mask of (bolt_mask, bolt_label -> bolt), or None."""
    for suffix in MASK_SUFFIXES[1:]:
        if stem.endswith(suffix) and stem[: -len(suffix)] in image_stems:
            return stem[: -len(suffix)]
    return None


def _pair_by_stem(images_dir: Path, masks_dir: Path, problems: ProblemLog) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images by stem, and their masks. An image whose stem another image shares (p1.png, p1.bmp), or that
    has two masks (p1.png, p1_mask.png), is left out and reported: neither mask nor defect-free is known."""
    image_files: dict[str, Path] = {}
    ambiguous: set[str] = set()
    # Images and masks in one folder (part7.jpg beside part7_label.bmp, as KolektorSDD ships): a file named
    # as another's mask is a mask only, and no file is its own mask.
    one_folder = images_dir.resolve() == masks_dir.resolve()
    stems = {p.stem for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if one_folder else set()
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if one_folder and _named_as_mask_of(path.stem, stems) is not None:
            continue
        if path.stem in image_files:
            problems.add(path, f"another image has the same name stem ({image_files[path.stem].name}); both are left out")
            ambiguous.add(path.stem)
        else:
            image_files[path.stem] = path
    masks: dict[str, Path] = {}
    images = set(image_files.values())
    for path in sorted(masks_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or (one_folder and path in images):
            continue
        stem = _image_of_mask(path, set(image_files))
        if stem is None:
            problems.add(path, "mask without an image")
        elif stem in masks:
            problems.add(path, f"a second mask for {image_files[stem].name} (the first is {masks[stem].name}); the image is left out")
            ambiguous.add(stem)
        else:
            masks[stem] = path
    return {k: v for k, v in image_files.items() if k not in ambiguous}, {k: v for k, v in masks.items() if k not in ambiguous}


def mask_to_classes(mask: np.ndarray, num_classes: int) -> np.ndarray:
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 65535}:
        return (mask > 0).astype(np.uint8)
    if values.max() > num_classes:
        raise DataError(f"mask value {int(values.max())} is above the number of classes ({num_classes})")
    return mask.astype(np.uint8)


def read_folders(
    images_dir: str | Path,
    masks_dir: str | Path,
    classes: Sequence[str] = ("defect",),
    strict: bool = False,
) -> LabelledImages:
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder does not exist")
    problems = ProblemLog(strict=strict)
    image_files, masks = _pair_by_stem(images_dir, masks_dir, problems)

    candidates: list[tuple[tuple[Path, Path | None], tuple[int, int]]] = []
    for stem, image_path in image_files.items():
        mask_path = masks.get(stem)
        pair = read_labelled(image_path, mask_path, problems, "mask")
        if pair is None:
            continue
        image, mask = pair
        if mask is not None:
            try:
                mask_to_classes(mask, len(classes))
            except DataError as exc:
                problems.add(mask_path, f"unreadable: {exc}")
                continue
        candidates.append(((image_path, mask_path), image.shape))
    items, shape = keep_common_shape(candidates, problems, path_of=lambda item: item[0])

    def load(index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = items[index]
        image = as_uint8(read_image(image_path))
        if mask_path is None:
            return image, np.zeros(image.shape, np.uint8)
        return image, mask_to_classes(read_mask(mask_path), len(classes))

    return LabelledImages(
        name=str(images_dir),
        keys=[p.name for p, _ in items],
        classes=list(classes),
        shape=shape,
        loader=load,
        defective=[m is not None for _, m in items],
        problems=problems,
    )

"""Reviewed images as a training set in the DAGM layout that `train`, `evaluate` and `data check` read.

    OUT/Class1/Train/NNNN.PNG, Label/Labels.txt, Label/NNNN_label.PNG   (data/dagm.py)
    OUT/export.json   what was exported: scope, model, and per file its image id, key and decision

An image QA passed is defect-free (the model's false calls become good examples). An image QA
failed is labelled with its confirmed defects (each defect's mask, the score map above the rule's
threshold inside its region) and the mask QA drew for a defect the model missed; under an
explicit `fail`, defects QA did not decide count as confirmed when they are those of the inspection
QA looked at (QA saw them and failed the part), not another model version's or a redo's.
Images without a decision are left out, as is a failed image with nothing to draw (no confirmed
defect, no drawn mask), which is listed in `skipped`. All defect classes go into one label (one
class folder): a multi-class model's classes are listed per file in export.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from defectscan.data.dagm import write_split
from defectscan.data.pixels import as_uint8
from defectscan.db.queries import Filters, ImageSource, check_filters
from defectscan.db.reviews import Decided, decided_images, latest_image_reviews
from defectscan.db.schema import Defect, Image, ImageReview, ImageSet, Model
from defectscan.errors import DataError
from defectscan.model import rle
from defectscan.report.pixels import PixelsGone, load_image

MARKER = "export.json"
FOLDER = Path("Class1") / "Train"


@dataclass
class Exported:
    out: Path
    model: str
    images: int = 0
    defective: int = 0
    skipped: list[str] = field(default_factory=list)


def export_reviewed(session: Session, out: str | Path, filters: Filters, *, force: bool = False) -> Exported:
    """Write the decided images in scope (one model version) under `out`."""
    out = Path(out).absolute()  # `--out .` inside an earlier export: the partial folder goes beside it, by name
    _check_out(out, force)
    check_filters(session, filters)
    decided = decided_images(session, filters)
    if not decided:
        raise DataError(f"no reviewed image in scope ({_describe(filters)}): review some first (`defectscan review queue`)")
    models = {d.model_id for d in decided}
    if len(models) > 1:
        names = sorted(f"{m.name}:{m.version}" for m in session.scalars(select(Model).where(Model.id.in_(models))))
        raise DataError(f"the reviewed images in scope were inspected by several model versions ({', '.join(names)}): give --model")
    model = session.get(Model, models.pop())
    result = Exported(out=out, model=f"{model.name}:{model.version}")
    samples, listing = [], []
    ids = [d.image_id for d in decided]
    drawn = {row.image_id: row for row in session.scalars(latest_image_reviews().where(ImageReview.image_id.in_(ids)))}
    image_keys = dict(session.execute(select(Image.id, Image.key).where(Image.id.in_(ids))).all())
    for item in decided:
        try:
            image, source = _pixels(session, item)
        except PixelsGone as exc:  # a chunk deleted since: the rest goes out; a store that cannot be read stops the export
            result.skipped.append(f"image {item.image_id}: {exc}")
            continue
        label, classes = (None, set()) if item.decision == "pass" else _label(session, item, drawn.get(item.image_id), source)
        if item.decision == "fail" and label is None:
            result.skipped.append(f"image {item.image_id}: QA failed it, but no confirmed defect or drawn mask says where")
            continue
        samples.append((image, label))
        listing.append({"image_id": item.image_id, "key": image_keys.get(item.image_id), "decision": item.decision,
                        "inspection_id": item.inspection_id, "classes": sorted(classes)})
    if not samples:
        # Checked before `out` is touched: an empty set with --force replaced a good earlier export.
        raise DataError(f"nothing to export in scope ({_describe(filters)}): " + "; ".join(result.skipped))
    _check_one_size(samples, listing, filters)
    # Written beside `out` and moved into place whole: an earlier export stays until this one is complete.
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    names = write_split(partial / FOLDER, samples)
    for name, entry in zip(names, listing, strict=True):
        entry["file"] = str(FOLDER / name)
    result.images = len(samples)
    result.defective = sum(1 for _, label in samples if label is not None)
    (partial / MARKER).write_text(json.dumps({"model": result.model, "scope": _describe(filters), "images": listing,
                                              "skipped": result.skipped}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return result


def _check_one_size(samples: list, listing: list[dict], filters: Filters) -> None:
    """One image size per export: the dataset readers keep the most common size and skip the others, so reviewed
    images of a second size would drop out of the fine-tune or the held-out set without a word here."""
    sizes: dict[tuple[int, int], list[int]] = {}
    for (image, _), entry in zip(samples, listing, strict=True):
        sizes.setdefault(image.shape[:2], []).append(entry["image_id"])
    if len(sizes) > 1:
        described = "; ".join(f"{h}x{w}: {len(ids)} image(s), e.g. image {ids[0]}" for (h, w), ids in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        raise DataError(f"the reviewed images in scope ({_describe(filters)}) have {len(sizes)} sizes ({described}); "
                        "training reads one size per set: export each size on its own (narrow the scope, e.g. --lot)")


def _check_out(out: Path, force: bool) -> None:
    """Refuse, before anything is read or removed, a folder the export may not replace."""
    if out.is_symlink():
        raise DataError(f"{out}: is a symbolic link; give the folder it points to")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out}: folder is not empty; give --force to replace an earlier export there")
        if not (out / MARKER).is_file():
            raise DataError(f"{out}: not an earlier export (no {MARKER}); --force replaces only those")


def _describe(filters: Filters) -> str:
    return ", ".join(f"{k} {v.isoformat() if hasattr(v, 'isoformat') else v}" for k, v in filters.given().items()) or "everything"


def _pixels(session: Session, item: Decided) -> tuple[np.ndarray, ImageSource]:
    image, image_set = session.execute(
        select(Image, ImageSet).join(ImageSet, Image.image_set_id == ImageSet.id).where(Image.id == item.image_id)
    ).one()
    source = ImageSource.of(image_set, image)
    return as_uint8(load_image(source), (image_set.attrs or {}).get("bit_depth")), source


def _label(session: Session, item: Decided, drawn, source: ImageSource) -> tuple[np.ndarray | None, set[str]]:
    """255 on the confirmed defects and the drawn mask, 0 elsewhere (None when nothing is marked), and the classes painted."""
    label = np.zeros((source.height, source.width), np.uint8)
    classes: set[str] = set()
    defects = session.scalars(select(Defect).where(Defect.inspection_id == item.inspection_id)).all()
    explicit = drawn is not None and drawn.decision == "fail"
    # Undecided defects count as seen only on the inspection QA looked at: another model version's, or a redo's
    # (--force), were never shown to QA, and painted the very regions QA had called false calls.
    seen = explicit and drawn.inspection_id == item.inspection_id
    for defect in defects:
        decision = item.defect_decisions.get(defect.id)
        if decision == "confirmed" or (decision is None and seen):
            box = (defect.bbox_y0, defect.bbox_x0, defect.bbox_y1, defect.bbox_x1)
            _paint(label, box, rle.decode(defect.rle, (box[2] - box[0], box[3] - box[1])))
            classes.add(defect.class_name)
    if explicit and drawn.rle:
        box = (drawn.bbox_y0, drawn.bbox_x0, drawn.bbox_y1, drawn.bbox_x1)
        _paint(label, box, rle.decode(drawn.rle, (box[2] - box[0], box[3] - box[1])))
        classes.add(drawn.class_name)
    return (label, classes) if label.any() else (None, set())


def _paint(label: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray) -> None:
    y0, x0, y1, x1 = box
    label[y0:y1, x0:x1][mask] = 255

"""Record QA's decisions on defects and images (rows are only ever added; db/reviews.py reads them back).

Every id is checked before anything is written, so a mistyped id leaves no half-recorded batch;
names are free text (`--by` defaults to the login name) and need not exist anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from defectscan.db.reviews import latest_image_reviews, refresh_review_daily
from defectscan.db.schema import DEFECT_DECISIONS, IMAGE_DECISIONS, Defect, DefectReview, Image, ImageReview, Inspection, utcnow
from defectscan.errors import DataError
from defectscan.model import rle
from defectscan.users import user_name


def _missing(asked: Sequence[int], found: set[int], what: str) -> None:
    missing = sorted(set(asked) - found)
    if missing:
        listed = ", ".join(str(i) for i in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"no {what} with id {listed}; nothing was recorded")


def review_defects(session: Session, defect_ids: Sequence[int], decision: str, *, by: str | None = None, note: str | None = None) -> list[int]:
    """One DefectReview per defect (committed together); their ids."""
    if decision not in DEFECT_DECISIONS:
        raise DataError(f"decision {decision!r}: expected one of {', '.join(DEFECT_DECISIONS)}")
    if not defect_ids:
        raise DataError("no defect ids given")
    ids = list(dict.fromkeys(int(i) for i in defect_ids))
    images = dict(session.execute(
        select(Defect.id, Inspection.image_id).join(Inspection, Defect.inspection_id == Inspection.id).where(Defect.id.in_(ids))
    ).all())
    _missing(ids, set(images), "defect")
    reviewer, now = user_name(by), utcnow()
    rows = [DefectReview(defect_id=i, image_id=images[i], decision=decision, reviewer=reviewer, reviewed_at=now, note=note) for i in ids]
    _record(session, rows, list(images.values()))
    return [row.id for row in rows]


def _record(session: Session, rows: list, image_ids: list[int]) -> None:
    """Add the decisions and recount the lots listing's rollup of their image sets, in one transaction."""
    from sqlalchemy.exc import IntegrityError

    session.add_all(rows)
    try:
        session.flush()
    except IntegrityError:
        # The inspection or defect decided on was replaced between the look-up and the write (inspect --force).
        session.rollback()
        raise DataError("what was decided on was re-inspected meanwhile (inspect --force); nothing was recorded: "
                        "look at the new results and decide again") from None
    refresh_review_daily(session, image_ids)
    session.commit()


def review_images(
    session: Session,
    image_ids: Sequence[int],
    decision: str,
    *,
    by: str | None = None,
    note: str | None = None,
    mask: np.ndarray | None = None,
    class_name: str | None = None,
    model: str | None = None,
) -> list[int]:
    """One ImageReview per image (committed together); their ids. A drawn `mask` (a defect the model
    missed) goes with a `fail` decision, a class name and a single image of the mask's size.

    Each decision records the inspection QA looked at: `model`'s (a reference, as `review queue --model`
    takes), else that of a version in production, else the newest. An export paints an explicit fail's
    undecided defects only from that inspection."""
    if decision not in IMAGE_DECISIONS:
        raise DataError(f"decision {decision!r}: expected one of {', '.join(IMAGE_DECISIONS)}")
    if not image_ids:
        raise DataError("no image ids given")
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    sizes = {row.id: (row.height, row.width) for row in session.execute(select(Image.id, Image.height, Image.width).where(Image.id.in_(ids)))}
    _missing(ids, set(sizes), "image")
    box = _drawn(mask, class_name, decision, ids, sizes)
    newest = _looked_at(session, ids, model)
    never = [i for i in ids if i not in newest]
    if never:
        # A decision is on what inspection said; one taken before would later count for a verdict QA never saw.
        by_whom = f" by {model}" if model else ""
        raise DataError(f"image {', '.join(map(str, never[:5]))} {'has' if len(never) == 1 else 'have'} not been inspected{by_whom}: "
                        "nothing to review yet; nothing was recorded")
    kept = _kept_masks(session, ids) if decision == "fail" and mask is None else {}
    reviewer, now = user_name(by), utcnow()
    rows = [
        ImageReview(image_id=i, inspection_id=newest[i], decision=decision, reviewer=reviewer, reviewed_at=now, note=note,
                    **{"class_name": class_name, **box, **kept.get(i, {})})
        for i in ids
    ]
    _record(session, rows, ids)
    return [row.id for row in rows]


def _looked_at(session: Session, ids: list[int], model: str | None) -> dict[int, int]:
    """image id -> the inspection QA looked at: `model`'s, else a production version's, else the newest. (The newest
    alone was a shadow candidate's, inspected after production, while QA reviewed production's queue.)"""
    from defectscan.db import model_refs
    from defectscan.db.schema import Model

    query = select(Inspection.image_id, func.max(Inspection.id)).where(Inspection.image_id.in_(ids)).group_by(Inspection.image_id)
    if model is not None:
        return dict(session.execute(query.where(Inspection.model_id == model_refs.resolve(session, model).id)).all())
    production = select(Model.id).where(Model.stage == "production")
    return {**dict(session.execute(query).all()), **dict(session.execute(query.where(Inspection.model_id.in_(production))).all())}


_MASK_COLUMNS = ("class_name", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "rle")


def _kept_masks(session: Session, ids: list[int]) -> dict[int, dict]:
    """The drawn mask of each image whose current review is a `fail` with one: failing it again without a mask
    (a second look, a note) keeps where QA said the defect is."""
    current = session.scalars(latest_image_reviews().where(ImageReview.image_id.in_(ids), ImageReview.rle.is_not(None)))
    return {row.image_id: {c: getattr(row, c) for c in _MASK_COLUMNS} for row in current if row.decision == "fail"}


def _drawn(mask: np.ndarray | None, class_name: str | None, decision: str, ids: list[int], sizes: dict) -> dict:
    """The bbox and RLE columns of a drawn mask (all None without one), after checking it fits its image."""
    if mask is None:
        if class_name is not None:
            raise DataError("--class names the class of a drawn --mask; give the mask too")
        return {"bbox_y0": None, "bbox_x0": None, "bbox_y1": None, "bbox_x1": None, "rle": None}
    if decision != "fail":
        raise DataError("a drawn mask marks a defect the model missed: it goes with --as fail")
    if class_name is None:
        raise DataError("a drawn mask needs --class (the defect class it shows)")
    if len(ids) != 1:
        raise DataError(f"a drawn mask belongs to one image; {len(ids)} were given")
    mask = np.asarray(mask) > 0
    if mask.shape != sizes[ids[0]]:
        raise DataError(f"the mask is {mask.shape[0]}x{mask.shape[1]}, image {ids[0]} is {sizes[ids[0]][0]}x{sizes[ids[0]][1]}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DataError("the mask marks no pixel (expected the defect's pixels non-zero)")
    if mask.all():
        raise DataError("the mask marks every pixel of the image (expected the defect's pixels non-zero on a black or transparent background)")
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return {"bbox_y0": y0, "bbox_x0": x0, "bbox_y1": y1, "bbox_x1": x1, "rle": rle.encode(mask[y0:y1, x0:x1])}


def named_images(session: Session, image_ids: Sequence[int], limit: int = 20) -> list[str]:
    """"image 196: lot L042, img2.png" per image (up to `limit`): what a decision was recorded on, said back,
    since an inspection id from `images list` is easily taken for an image id."""
    from defectscan.db.queries_report import NO_LOT
    from defectscan.db.schema import ImageSet

    rows = session.execute(
        select(Image.id, ImageSet.lot, Image.key).join(ImageSet, Image.image_set_id == ImageSet.id).where(Image.id.in_(list(image_ids)[:limit]))
    ).all()
    by_id = {i: f"image {i}: lot {lot or NO_LOT}, {key}" for i, lot, key in rows}
    named = [by_id[i] for i in list(dict.fromkeys(image_ids))[:limit] if i in by_id]
    return named + ([f"and {len(set(image_ids)) - limit} more"] if len(set(image_ids)) > limit else [])


def images_of_defects(session: Session, defect_ids: Sequence[int]) -> list[int]:
    """The images the defects were found on, in the defects' order."""
    rows = dict(session.execute(
        select(Defect.id, Inspection.image_id).join(Inspection, Defect.inspection_id == Inspection.id).where(Defect.id.in_(list(defect_ids)))
    ).all())
    return list(dict.fromkeys(rows[i] for i in defect_ids if i in rows))


"""QA's defect decisions across a redo of the same model version (`inspect --force`).

A redo deletes an image's defects and records new ones; the decisions QA made on the old ones
stayed on record with a NULL defect, and so no longer counted anywhere (figures, queue, export).
Each decision now goes to the new defect of the same class whose pixels overlap the old one's
(intersection over union at least `MIN_OVERLAP`): a new decision row, with the reviewer, time and
note of the old one. A defect with no such match is new to QA and stays undecided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from defectscan.db.reviews import latest_defect_reviews
from defectscan.db.schema import Defect, DefectReview, Inspection
from defectscan.model import rle

MIN_OVERLAP = 0.5


@dataclass(frozen=True)
class Decision:
    defect_id: int
    class_name: str
    box: tuple[int, int, int, int]
    rle: str
    decision: str
    reviewer: str
    reviewed_at: object
    note: str | None


def decisions_on(session: Session, inspections) -> dict[int, list[Decision]]:
    """The current decisions on the defects of the inspections `inspections` (a condition) selects, by image id."""
    latest = latest_defect_reviews().subquery()
    rows = session.execute(
        select(Inspection.image_id, Defect.id, Defect.class_name, Defect.bbox_y0, Defect.bbox_x0, Defect.bbox_y1, Defect.bbox_x1, Defect.rle,
               latest.c.decision, latest.c.reviewer, latest.c.reviewed_at, latest.c.note)
        .join(Defect, Defect.inspection_id == Inspection.id).join(latest, latest.c.defect_id == Defect.id).where(inspections)
    ).all()
    found: dict[int, list[Decision]] = {}
    for image_id, defect_id, class_name, y0, x0, y1, x1, encoded, *decided in rows:
        found.setdefault(image_id, []).append(Decision(defect_id, class_name, (y0, x0, y1, x1), encoded, *decided))
    return found


def carry(session: Session, decisions: dict[int, list[Decision]], new_defects: list[tuple[int, int, dict]]) -> int:
    """Add decision rows for the new defects ((image id, defect id, defect row)) that match an old decided one."""
    rows = []
    for image_id, defect_id, row in new_defects:
        left = decisions.get(image_id, [])
        box = (row["bbox_y0"], row["bbox_x0"], row["bbox_y1"], row["bbox_x1"])
        match = next((old for old in left if old.class_name == row["class_name"] and overlap(old.box, old.rle, box, row["rle"]) >= MIN_OVERLAP), None)
        if match is None:
            continue
        left.remove(match)  # one old decision, one new defect
        note = f"carried from defect {match.defect_id} by a re-inspection" + (f": {match.note}" if match.note else "")
        rows.append({"defect_id": defect_id, "image_id": image_id, "decision": match.decision, "reviewer": match.reviewer,
                     "reviewed_at": match.reviewed_at, "note": note})
    if rows:
        session.execute(insert(DefectReview), rows)
    return len(rows)


def overlap(box_a: tuple[int, int, int, int], rle_a: str, box_b: tuple[int, int, int, int], rle_b: str) -> float:
    """Intersection over union of two defects' masks, each given by its box (y0, x0, y1, x1) and RLE."""
    if box_a[0] >= box_b[2] or box_b[0] >= box_a[2] or box_a[1] >= box_b[3] or box_b[1] >= box_a[3]:
        return 0.0
    y0, x0 = min(box_a[0], box_b[0]), min(box_a[1], box_b[1])
    y1, x1 = max(box_a[2], box_b[2]), max(box_a[3], box_b[3])
    canvases = []
    for (by0, bx0, by1, bx1), encoded in ((box_a, rle_a), (box_b, rle_b)):
        canvas = np.zeros((y1 - y0, x1 - x0), bool)
        canvas[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] = rle.decode(encoded, (by1 - by0, bx1 - bx0))
        canvases.append(canvas)
    union = (canvases[0] | canvases[1]).sum()
    return float((canvases[0] & canvases[1]).sum() / union) if union else 0.0

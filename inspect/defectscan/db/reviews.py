"""QA's decisions on the model's results, and the figures they give: false-call and escape rates.

A decision is the newest review row of its defect or image (older rows are its history). QA's
decision on an image is its own image review when there is one; without one, an image whose
every defect has a decision is decided by them (failed when one is confirmed, passed when all are
false calls); otherwise the image is undecided.

- false-call rate: images the model failed that QA passed / images the model failed that QA decided;
- escape rate: images the model passed that QA failed / images the model passed that QA decided
  (the sampled passes of `review queue --sample-passed`), with its 95 % Wilson interval, since the
  sample is small;
- confirmed-defect rate: defects QA confirmed / defects QA decided.

Figures are computed from the reviewed rows only (a few per cent of a plant's images), so they
cost little next to the lots listing they join.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from defectscan.db.queries import Filters, Page, apply_filters, check_filters, image_scope
from defectscan.db.schema import Defect, DefectReview, Image, ImageReview, ImageSet, Inspection, Model
from defectscan.errors import DataError
from defectscan.times import iso_utc

REVIEW_COLUMNS = ("false_calls", "failed_reviewed", "false_call_rate", "escapes", "passed_reviewed", "escape_rate",
                  "escape_rate_95", "defects_confirmed", "defects_reviewed")


@dataclass
class ReviewFigures:
    failed_reviewed: int = 0
    false_calls: int = 0
    passed_reviewed: int = 0
    escapes: int = 0
    defects_reviewed: int = 0
    defects_confirmed: int = 0

    def add(self, other: ReviewFigures) -> None:
        for name in ("failed_reviewed", "false_calls", "passed_reviewed", "escapes", "defects_reviewed", "defects_confirmed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def false_call_rate(self) -> float | None:
        return self.false_calls / self.failed_reviewed if self.failed_reviewed else None

    @property
    def escape_rate(self) -> float | None:
        return self.escapes / self.passed_reviewed if self.passed_reviewed else None

    @property
    def escape_interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.escapes, self.passed_reviewed)

    def as_row(self) -> dict:
        interval = self.escape_interval
        return {
            "false_calls": self.false_calls,
            "failed_reviewed": self.failed_reviewed,
            "false_call_rate": _rounded(self.false_call_rate),
            "escapes": self.escapes,
            "passed_reviewed": self.passed_reviewed,
            "escape_rate": _rounded(self.escape_rate),
            "escape_rate_95": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
            "defects_confirmed": self.defects_confirmed,
            "defects_reviewed": self.defects_reviewed,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion: honest at 0 of 20, where p +- 2 sigma says [0, 0]."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def latest_image_reviews() -> Select:
    """The current decision row of every reviewed image."""
    newest = select(func.max(ImageReview.id)).group_by(ImageReview.image_id)
    return select(ImageReview).where(ImageReview.id.in_(newest))


def latest_defect_reviews() -> Select:
    """The current decision row of every reviewed defect that still exists."""
    newest = select(func.max(DefectReview.id)).where(DefectReview.defect_id.is_not(None)).group_by(DefectReview.defect_id)
    return select(DefectReview).where(DefectReview.id.in_(newest))


@dataclass(frozen=True)
class Decided:
    """QA's decision on one inspected image, with the defect decisions it rests on."""

    inspection_id: int
    image_id: int
    model_id: int
    lot: str | None
    verdict: str
    decision: str  # "pass" or "fail"
    defect_decisions: dict[int, str]


def decided_images(session: Session, filters: Filters = Filters()) -> list[Decided]:
    """Every inspection in scope whose image QA has decided (explicitly, or through all its defects)."""
    return _decisions(session, filters)[0]


def qa_decisions(session: Session, inspection_ids: list[int]) -> dict[int, str]:
    """QA's decision ("pass"/"fail") on the images of these inspections, for those QA decided."""
    if not inspection_ids:
        return {}
    return {d.inspection_id: d.decision for d in _decisions(session, Filters(), inspection_ids)[0]}


def _decisions(session: Session, filters: Filters, inspection_ids: list[int] | None = None) -> tuple[list[Decided], list[tuple[int | None, int, str]]]:
    """(the decided images, and (lot, model id, decision) of every decided defect) in scope."""
    latest_images = latest_image_reviews().subquery()
    latest_defects = latest_defect_reviews().subquery()
    base = (
        select(Inspection.id, Inspection.image_id, Inspection.model_id, ImageSet.lot, Inspection.verdict, Inspection.n_defects)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
    )
    if inspection_ids is not None:
        base = base.where(Inspection.id.in_(inspection_ids))
    explicit = apply_filters(session, base.add_columns(latest_images.c.decision).join(latest_images, latest_images.c.image_id == Image.id),
                             filters, defects=False)
    by_defects = apply_filters(
        session,
        base.add_columns(Defect.id, latest_defects.c.decision).join(Defect, Defect.inspection_id == Inspection.id)
        .join(latest_defects, latest_defects.c.defect_id == Defect.id),
        filters, defects=False,
    )
    defect_decisions: dict[int, dict[int, str]] = defaultdict(dict)
    facts: dict[int, tuple] = {}
    for inspection_id, image_id, model_id, lot, verdict, n_defects, defect_id, decision in session.execute(by_defects):
        defect_decisions[inspection_id][defect_id] = decision
        facts[inspection_id] = (image_id, model_id, lot, verdict, n_defects)
    decided: dict[int, Decided] = {}
    for inspection_id, image_id, model_id, lot, verdict, _n, decision in session.execute(explicit):
        decided[inspection_id] = Decided(inspection_id, image_id, model_id, lot, verdict, decision, defect_decisions.get(inspection_id, {}))
    for inspection_id, decisions in defect_decisions.items():
        image_id, model_id, lot, verdict, n_defects = facts[inspection_id]
        if inspection_id in decided or len(decisions) < n_defects:
            continue
        decision = "fail" if "confirmed" in decisions.values() else "pass"
        decided[inspection_id] = Decided(inspection_id, image_id, model_id, lot, verdict, decision, decisions)
    defects = [(facts[i][2], facts[i][1], d) for i, decisions in defect_decisions.items() for d in decisions.values()]
    return sorted(decided.values(), key=lambda d: d.inspection_id), defects


def review_figures(session: Session, filters: Filters = Filters()) -> dict[tuple, ReviewFigures]:
    """ReviewFigures per (lot, model id) of the decided images and defects in scope."""
    figures: dict[tuple, ReviewFigures] = defaultdict(ReviewFigures)
    decided, defects = _decisions(session, filters)
    for item in decided:
        f = figures[(item.lot, item.model_id)]
        if item.verdict == "fail":
            f.failed_reviewed += 1
            f.false_calls += item.decision == "pass"
        elif item.verdict == "pass":
            f.passed_reviewed += 1
            f.escapes += item.decision == "fail"
    for lot, model_id, decision in defects:
        f = figures[(lot, model_id)]
        f.defects_reviewed += 1
        f.defects_confirmed += decision == "confirmed"
    return dict(figures)


REVIEW_LIST_COLUMNS = ("kind", "id", "image_id", "image_key", "lot", "defect_id", "decision", "class", "reviewer", "reviewed_at",
                       "current", "note")


def list_reviews(
    session: Session, filters: Filters = Filters(), *, reviewer: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0,
) -> Page:
    """Review rows (defect and image decisions, superseded ones too, marked), newest first."""
    if kind not in (None, "defect", "image"):
        raise DataError(f"kind {kind!r}: expected defect or image")
    if limit < 1 or offset < 0:
        raise DataError(f"--limit {limit} / --offset {offset}: expected a limit of at least 1 and an offset of at least 0")
    check_filters(session, filters)
    rows = []
    scope = image_scope(filters)
    if kind in (None, "defect"):
        current = set(session.scalars(select(latest_defect_reviews().subquery().c.id)))
        query = (select(DefectReview, Image.key, ImageSet.lot, Defect.class_name).join(Image, DefectReview.image_id == Image.id)
                 .join(ImageSet, Image.image_set_id == ImageSet.id).outerjoin(Defect, DefectReview.defect_id == Defect.id).where(*scope))
        if reviewer is not None:
            query = query.where(DefectReview.reviewer == reviewer)
        rows += [("defect", r, key, lot, cls, r.id in current) for r, key, lot, cls in session.execute(query)]
    if kind in (None, "image"):
        current = set(session.scalars(select(latest_image_reviews().subquery().c.id)))
        query = (select(ImageReview, Image.key, ImageSet.lot).join(Image, ImageReview.image_id == Image.id)
                 .join(ImageSet, Image.image_set_id == ImageSet.id).where(*scope))
        if reviewer is not None:
            query = query.where(ImageReview.reviewer == reviewer)
        rows += [("image", r, key, lot, r.class_name, r.id in current) for r, key, lot in session.execute(query)]
    rows.sort(key=lambda x: (x[1].reviewed_at, x[0], x[1].id), reverse=True)
    page = [
        dict(zip(REVIEW_LIST_COLUMNS, (k, r.id, r.image_id, key, lot, getattr(r, "defect_id", None), r.decision, cls, r.reviewer,
                                       iso_utc(r.reviewed_at), is_current, r.note), strict=True))
        for k, r, key, lot, cls, is_current in rows[offset : offset + limit]
    ]
    return Page(page, more=len(rows) > offset + limit, offset=offset)


def add_review_figures(session: Session, rows: list[dict], filters: Filters = Filters()) -> None:
    """Add QA's figures (REVIEW_COLUMNS) to lot rows (`lots list`, `lots show`), matched by lot and model version."""
    figures = review_figures(session, filters)
    labels = {model_id: f"{name}:{version}" for model_id, name, version in
              session.execute(select(Model.id, Model.name, Model.version).where(Model.id.in_({k[1] for k in figures})))}
    by_label = {(lot, labels[model_id]): f for (lot, model_id), f in figures.items()}
    for row in rows:
        row.update(by_label.get((row["lot"], row["model"]), ReviewFigures()).as_row())

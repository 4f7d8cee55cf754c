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
from dataclasses import asdict, dataclass

from sqlalchemy import Select, and_, case, delete, exists, func, insert, or_, select
from sqlalchemy.orm import Session, aliased

from defectscan.db.queries import Filters, Page, apply_filters, check_filters, image_scope, rollup_conditions, rollup_window
from defectscan.db.schema import Defect, DefectReview, Image, ImageReview, ImageSet, Inspection, Model, ReviewDaily, capture_day
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

    def count(self, verdict: str, decision: str | None, n: int = 1) -> None:
        """`n` images the model judged `verdict` and QA decided `decision` (None: undecided)."""
        if decision is None:
            return
        if verdict == "fail":
            self.failed_reviewed += n
            self.false_calls += n if decision == "pass" else 0
        elif verdict == "pass":
            self.passed_reviewed += n
            self.escapes += n if decision == "fail" else 0

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


# "No newer row of the same image/defect" rather than max(id) per group: the database then finds the
# current rows of the images in scope through the (image_id, id) and (defect_id, id) indexes instead
# of grouping every review ever made (benchmarks/bench_queries.py).
def _newest_image_review():
    newer = aliased(ImageReview)
    return ~exists().where(newer.image_id == ImageReview.image_id, newer.id > ImageReview.id)


def _newest_defect_review():
    newer = aliased(DefectReview)
    return ~exists().where(newer.defect_id == DefectReview.defect_id, newer.id > DefectReview.id)


def latest_image_reviews() -> Select:
    """The current decision row of every reviewed image."""
    return select(ImageReview).where(_newest_image_review())


def latest_defect_reviews() -> Select:
    """The current decision row of every reviewed defect that still exists."""
    return select(DefectReview).where(DefectReview.defect_id.is_not(None), _newest_defect_review())


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


def qa_truth(session: Session, image_set_ids: list[int]) -> dict[int, str]:
    """QA's decision on each image of these sets, whichever model version's inspection it was made through: its image
    decision; else "fail" when QA confirmed a defect of any inspection of it; else "pass" when QA decided every defect
    of one of its inspections (all false calls). What a comparison of two versions counts against."""
    explicit = dict(session.execute(
        select(ImageReview.image_id, ImageReview.decision).join(Image, ImageReview.image_id == Image.id)
        .where(_newest_image_review(), Image.image_set_id.in_(image_set_ids))
    ).all())
    decided, defects = _decisions(session, Filters(), image_set_ids=image_set_ids)
    image_of = dict(session.execute(
        select(Inspection.id, Inspection.image_id).join(Image, Inspection.image_id == Image.id).where(Image.image_set_id.in_(image_set_ids))
    ).all())
    truth = {d.image_id: "pass" for d in decided if d.image_id not in explicit}
    truth.update({image_of[inspection_id]: "fail" for inspection_id, decision in defects
                  if decision == "confirmed" and image_of[inspection_id] not in explicit})
    return {**truth, **explicit}


def _decisions(
    session: Session, filters: Filters, inspection_ids: list[int] | None = None, image_set_ids: list[int] | None = None,
) -> tuple[list[Decided], list[tuple[int, str]]]:
    """(the decided images, and (inspection id, decision) of every decided defect) in scope."""
    latest_images = latest_image_reviews().subquery()
    latest_defects = latest_defect_reviews().subquery()
    base = (
        select(Inspection.id, Inspection.image_id, Inspection.model_id, ImageSet.lot, Inspection.verdict, Inspection.n_defects)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
    )
    if inspection_ids is not None:
        base = base.where(Inspection.id.in_(inspection_ids))
    if image_set_ids is not None:
        base = base.where(Image.image_set_id.in_(image_set_ids))
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
    defects = [(i, d) for i, decisions in defect_decisions.items() for d in decisions.values()]
    return sorted(decided.values(), key=lambda d: d.inspection_id), defects


def _in_scope(session: Session, query: Select, filters: Filters) -> Select:
    """A query from inspections, joined to images and image sets and filtered."""
    return apply_filters(session, query.join(Image, Inspection.image_id == Image.id).join(ImageSet, Image.image_set_id == ImageSet.id),
                         filters, defects=False)


# What QA's figures can be grouped by: an image set's lot or line.
GROUPS = {"lot": ImageSet.lot, "line": ImageSet.line}


def review_figures(
    session: Session, filters: Filters = Filters(), *, lots: set[str | None] | None = None, by: str = "lot",
) -> dict[tuple, ReviewFigures]:
    """ReviewFigures per (lot or line, model id) of the decided images and defects in scope (of these lots, when given).

    The same decisions as `decided_images`, counted by the database: a page of lots must not carry
    every decision of its lots into Python (benchmarks/bench_queries.py).
    """
    def scoped(query: Select) -> Select:
        query = _in_scope(session, query, filters)
        return query if lots is None else query.where(_lot_condition(lots))

    group = GROUPS[by].label("group")
    figures: dict[tuple, ReviewFigures] = defaultdict(ReviewFigures)

    images = latest_image_reviews().subquery()
    explicit = scoped(select(group, Inspection.model_id, Inspection.verdict, images.c.decision, func.count())
                      .select_from(Inspection)).join(images, images.c.image_id == Image.id)
    for key, model_id, verdict, decision, n in session.execute(explicit.group_by(GROUPS[by], Inspection.model_id, Inspection.verdict,
                                                                                 images.c.decision)):
        figures[(key, model_id)].count(verdict, decision, int(n))

    defects = latest_defect_reviews().subquery()
    confirmed = func.sum(case((defects.c.decision == "confirmed", 1), else_=0))
    per_image = scoped(
        select(group, Inspection.model_id, Inspection.verdict, Inspection.n_defects, Image.id.label("image_id"),
               func.count().label("decided"), confirmed.label("confirmed"))
        .select_from(Inspection).join(Defect, Defect.inspection_id == Inspection.id)
    ).join(defects, defects.c.defect_id == Defect.id).group_by(Inspection.id, GROUPS[by], Inspection.model_id, Inspection.verdict,
                                                                Inspection.n_defects, Image.id).subquery()
    # Without an image decision, an image whose every defect is decided is decided by them.
    by_defects = case(
        (and_(per_image.c.decided >= per_image.c.n_defects, ~exists().where(ImageReview.image_id == per_image.c.image_id)),
         case((per_image.c.confirmed > 0, "fail"), else_="pass")),
        else_=None,
    ).label("decision")
    totals = select(per_image.c.group, per_image.c.model_id, per_image.c.verdict, by_defects, func.count(), func.sum(per_image.c.decided),
                    func.sum(per_image.c.confirmed)).group_by(per_image.c.group, per_image.c.model_id, per_image.c.verdict, by_defects)
    for key, model_id, verdict, decision, n, decided, n_confirmed in session.execute(totals):
        f = figures[(key, model_id)]
        f.count(verdict, decision, int(n))
        f.defects_reviewed += int(decided)
        f.defects_confirmed += int(n_confirmed)
    return dict(figures)


def review_figures_rows(session: Session, filters: Filters = Filters(), *, by: str = "lot") -> list[dict]:
    """review_figures as rows (`review figures`): the lot or line, the model version, REVIEW_COLUMNS."""
    figures = review_figures(session, filters, by=by)
    labels = _labels(session, {model_id for _, model_id in figures})
    return [{by: key, "model": labels[model_id], **f.as_row()}
            for (key, model_id), f in sorted(figures.items(), key=lambda item: (item[0][0] is None, item[0][0] or "", labels[item[0][1]]))]


CLASS_COLUMNS = ("class", "model", "defects_reviewed", "defects_confirmed", "false_calls", "confirmed_rate", "escapes")


def class_figures(session: Session, filters: Filters = Filters()) -> list[dict]:
    """QA's figures per defect class and model version: the model's defects QA decided (confirmed, false calls)
    and the defects QA drew on images the model passed (escapes, by the class QA gave them)."""
    rows: dict[tuple, dict] = {}

    def row(cls: str | None, model_id: int) -> dict:
        return rows.setdefault((cls or "(no class)", model_id), {"defects_reviewed": 0, "defects_confirmed": 0, "escapes": 0})

    defects = latest_defect_reviews().subquery()
    confirmed = func.sum(case((defects.c.decision == "confirmed", 1), else_=0))
    decided = _in_scope(session, select(Defect.class_name, Inspection.model_id, func.count(), confirmed).select_from(Inspection)
                        .join(Defect, Defect.inspection_id == Inspection.id), filters).join(defects, defects.c.defect_id == Defect.id)
    for cls, model_id, n, n_confirmed in session.execute(decided.group_by(Defect.class_name, Inspection.model_id)):
        r = row(cls, model_id)
        r["defects_reviewed"] += int(n)
        r["defects_confirmed"] += int(n_confirmed)
    images = latest_image_reviews().subquery()
    missed = _in_scope(session, select(images.c.class_name, Inspection.model_id, func.count()).select_from(Inspection), filters).join(
        images, images.c.image_id == Image.id).where(Inspection.verdict == "pass", images.c.decision == "fail")
    for cls, model_id, n in session.execute(missed.group_by(images.c.class_name, Inspection.model_id)):
        row(cls, model_id)["escapes"] += int(n)
    labels = _labels(session, {model_id for _, model_id in rows})
    return [
        {"class": cls, "model": labels[model_id], **r, "false_calls": r["defects_reviewed"] - r["defects_confirmed"],
         "confirmed_rate": _rounded(r["defects_confirmed"] / r["defects_reviewed"]) if r["defects_reviewed"] else None}
        for (cls, model_id), r in sorted(rows.items(), key=lambda item: (labels[item[0][1]], item[0][0]))
    ]


def _labels(session: Session, model_ids: set[int]) -> dict[int, str]:
    return {model_id: f"{name}:{version}" for model_id, name, version in
            session.execute(select(Model.id, Model.name, Model.version).where(Model.id.in_(model_ids)))}


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
    # Each kind's newest offset + limit + 1 rows by (reviewed_at, id), in SQL (an index each), merged here in
    # the same order: the page and whether there is more. Time and id orders differ when reviewers' clocks do.
    wanted = offset + limit + 1
    rows = []
    scope = image_scope(filters)
    if kind in (None, "defect"):
        query = (select(DefectReview, Image.key, ImageSet.lot, Defect.class_name, _newest_defect_review())
                 .join(Image, DefectReview.image_id == Image.id).join(ImageSet, Image.image_set_id == ImageSet.id)
                 .outerjoin(Defect, DefectReview.defect_id == Defect.id).where(*scope))
        if reviewer is not None:
            query = query.where(DefectReview.reviewer == reviewer)
        query = query.order_by(DefectReview.reviewed_at.desc(), DefectReview.id.desc()).limit(wanted)
        rows += [("defect", r, key, lot, cls, is_current) for r, key, lot, cls, is_current in session.execute(query)]
    if kind in (None, "image"):
        query = (select(ImageReview, Image.key, ImageSet.lot, _newest_image_review())
                 .join(Image, ImageReview.image_id == Image.id).join(ImageSet, Image.image_set_id == ImageSet.id).where(*scope))
        if reviewer is not None:
            query = query.where(ImageReview.reviewer == reviewer)
        query = query.order_by(ImageReview.reviewed_at.desc(), ImageReview.id.desc()).limit(wanted)
        rows += [("image", r, key, lot, r.class_name, is_current) for r, key, lot, is_current in session.execute(query)]
    rows.sort(key=lambda x: (x[1].reviewed_at, x[0], x[1].id), reverse=True)
    page = [
        dict(zip(REVIEW_LIST_COLUMNS, (k, r.id, r.image_id, key, lot, getattr(r, "defect_id", None), r.decision, cls, r.reviewer,
                                       iso_utc(r.reviewed_at), bool(is_current) and (k == "image" or r.defect_id is not None), r.note),
                 strict=True))
        for k, r, key, lot, cls, is_current in rows[offset : offset + limit]
    ]
    return Page(page, more=len(rows) > offset + limit, offset=offset)


def add_review_figures(session: Session, rows: list[dict], filters: Filters = Filters()) -> None:
    """Add QA's figures (REVIEW_COLUMNS) to lot rows (`lots list`, `lots show`), matched by lot and model version.

    Only the lots of these rows; whole capture days from the rollup review_daily, the partial days
    at a time window's edges (and filters the rollup does not hold) from the decisions themselves.
    """
    if not rows:
        return
    lots = {row["lot"] for row in rows}
    window = rollup_window(filters)
    if window is None:
        figures = review_figures(session, filters, lots=lots)
    else:
        first_day, end_day, edges = window
        figures = _rollup_figures(session, filters, lots, first_day, end_day)
        for since, until in edges:
            for key, part in review_figures(session, Filters(**{**filters.given(), "since": since, "until": until}), lots=lots).items():
                figures.setdefault(key, ReviewFigures()).add(part)
    labels = _labels(session, {k[1] for k in figures})
    by_label = {(lot, labels[model_id]): f for (lot, model_id), f in figures.items()}
    for row in rows:
        row.update(by_label.get((row["lot"], row["model"]), ReviewFigures()).as_row())


def _lot_condition(lots: set[str | None]):
    named = [lot for lot in lots if lot is not None]
    return or_(ImageSet.lot.in_(named), ImageSet.lot.is_(None)) if None in lots else ImageSet.lot.in_(named)


def _rollup_figures(session: Session, filters: Filters, lots: set[str | None], first_day, end_day) -> dict[tuple, ReviewFigures]:
    daily = ReviewDaily
    counts = [daily.failed_reviewed, daily.false_calls, daily.passed_reviewed, daily.escapes, daily.defects_reviewed, daily.defects_confirmed]
    query = (
        select(ImageSet.lot, daily.model_id, *(func.sum(c) for c in counts))
        .join(ImageSet, daily.image_set_id == ImageSet.id)
        .where(_lot_condition(lots), *rollup_conditions(session, filters, daily, first_day, end_day))
        .group_by(ImageSet.lot, daily.model_id)
    )
    return {(lot, model_id): ReviewFigures(**{c.key: int(v or 0) for c, v in zip(counts, values, strict=True)})
            for lot, model_id, *values in session.execute(query)}


def refresh_review_daily(session: Session, image_ids: list[int]) -> None:
    """Recount review_daily for the image sets of these images (call inside the transaction that changed
    their decisions or inspections; it commits nothing)."""
    ids = sorted(set(image_ids))
    if not ids:
        return
    sets = sorted(set(session.scalars(select(Image.image_set_id).where(Image.id.in_(ids)))))
    refresh_review_daily_of_sets(session, sets)


def fill_review_daily(session: Session) -> None:
    """Count the decisions into an empty review_daily (the upgrade through 0005 creates it empty), a set at a time."""
    if session.scalar(select(ReviewDaily.image_set_id).limit(1)) is not None:
        return
    reviewed = (select(Image.image_set_id).distinct()
                .where(Image.id.in_(select(ImageReview.image_id)) | Image.id.in_(select(DefectReview.image_id))).order_by(Image.image_set_id))
    for image_set_id in session.scalars(reviewed).all():
        refresh_review_daily_of_sets(session, [image_set_id])


def lock_for_recount(session: Session, image_set_ids: list[int]) -> None:
    """One recount of an image set at a time: the later one then reads what the earlier committed. NO KEY
    UPDATE leaves the pipeline's inserts (which only key-share the image set) alone. SQLite: a writing
    transaction already holds the database's one write lock. Taking it again in one transaction is a no-op."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(ImageSet.id).where(ImageSet.id.in_(sorted(set(image_set_ids)))).order_by(ImageSet.id).with_for_update(key_share=True))


def refresh_review_daily_of_sets(session: Session, image_set_ids: list[int]) -> None:
    if not image_set_ids:
        return
    lock_for_recount(session, image_set_ids)
    keys = {
        inspection_id: (image_set_id, model_id, capture_day(acquired_at))
        for inspection_id, model_id, image_set_id, acquired_at in session.execute(
            select(Inspection.id, Inspection.model_id, Image.image_set_id, Image.acquired_at)
            .join(Image, Inspection.image_id == Image.id).where(Image.image_set_id.in_(image_set_ids))
        )
    }
    decided, defects = _decisions(session, Filters(), image_set_ids=image_set_ids)
    figures: dict[tuple, ReviewFigures] = defaultdict(ReviewFigures)
    for item in decided:
        figures[keys[item.inspection_id]].count(item.verdict, item.decision)
    for inspection_id, decision in defects:
        f = figures[keys[inspection_id]]
        f.defects_reviewed += 1
        f.defects_confirmed += decision == "confirmed"
    session.execute(delete(ReviewDaily).where(ReviewDaily.image_set_id.in_(image_set_ids)))
    rows = [{"image_set_id": key[0], "model_id": key[1], "day": key[2], **asdict(f)} for key, f in sorted(figures.items())]
    if rows:
        session.execute(insert(ReviewDaily), rows)

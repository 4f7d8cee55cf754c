"""Write one shard's results in one transaction, with bounded retries when the database is away."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, InternalError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from defectscan.db.reviews import lock_for_recount, refresh_review_daily_of_sets
from defectscan.db.schema import Defect, DefectReview, Image, ImageReview, Inspection, InspectionDaily, JobRun, capture_day, utcnow
from defectscan.db.session import database_error, is_read_only_error
from defectscan.errors import DatabaseError, first_line
from defectscan.model.verdict import ImageResult
from defectscan.pipeline import carried_reviews

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    attempts: int = 5
    backoff_s: float = 0.5


@dataclass
class Counts:
    inspected: int = 0
    errors: int = 0
    defects: int = 0
    failed: int = 0
    # Computed, but already recorded by a concurrent run (whose ids are kept) when this one came to write.
    meanwhile: int = 0
    meanwhile_runs: list[int] = field(default_factory=list)
    # Not judged: the machinery failed (worker lost, disk full); the next run does them.
    pending: int = 0

    def add(self, other: Counts) -> None:
        self.inspected += other.inspected
        self.errors += other.errors
        self.defects += other.defects
        self.failed += other.failed
        self.meanwhile += other.meanwhile
        self.meanwhile_runs = sorted({*self.meanwhile_runs, *other.meanwhile_runs})
        self.pending += other.pending


def with_retries(action: Callable[[], T], retry: Retry, what: str) -> T:
    """Run `action`; when the database cannot be reached, wait (doubling) and try again, a bounded number of times."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return action()
        except (OperationalError, InterfaceError, InternalError) as exc:
            if is_read_only_error(exc):
                # Waiting does not make a read-only database writable.
                raise database_error(exc, what) from None
            if isinstance(exc, InternalError):
                raise
            reason = first_line(exc.orig or exc)
            if attempt == retry.attempts:
                raise DatabaseError(f"{what}: database unavailable after {retry.attempts} attempts: {reason}") from None
            delay = retry.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: database unavailable (%s), retry %d/%d in %.1fs", what, reason, attempt, retry.attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass
class _Day:
    """Counts to add to (or subtract from) one capture day's rollup row, and the capture times seen."""

    images: int = 0
    failed: int = 0
    errors: int = 0
    defects: int = 0
    first_at: dt.datetime | None = None
    last_at: dt.datetime | None = None


class _Daily:
    """Changes to `inspection_daily` of one shard, per capture day."""

    def __init__(self) -> None:
        self.days: dict[dt.date, _Day] = {}

    def add(self, acquired_at: dt.datetime | None, verdict: str, n_defects: int, sign: int = 1) -> None:
        day = capture_day(acquired_at)
        change = self.days.setdefault(day, _Day())
        change.images += sign
        change.failed += sign * (verdict == "fail")
        change.errors += sign * (verdict == "error")
        change.defects += sign * n_defects
        if sign > 0 and acquired_at is not None:
            change.first_at = acquired_at if change.first_at is None else min(change.first_at, acquired_at)
            change.last_at = acquired_at if change.last_at is None else max(change.last_at, acquired_at)

    def write(self, session: Session, image_set_id: int, model_id: int) -> None:
        """One upsert that adds the counts to the stored ones (a row per day is created when missing)."""
        if not self.days:
            return
        dialect = session.get_bind().dialect.name
        table = InspectionDaily.__table__
        statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
        new = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.image_set_id, table.c.model_id, table.c.day],
            set_={
                "images": table.c.images + new.images,
                "failed": table.c.failed + new.failed,
                "errors": table.c.errors + new.errors,
                "defects": table.c.defects + new.defects,
                "first_at": _least(dialect, table.c.first_at, new.first_at),
                "last_at": _greatest(dialect, table.c.last_at, new.last_at),
            },
        )
        # In key order, so concurrent shards of one image set lock the rows in the same order.
        session.execute(statement, [
            {"image_set_id": image_set_id, "model_id": model_id, "day": day, **asdict(change)}
            for day, change in sorted(self.days.items())
        ])


# PostgreSQL's least()/greatest() skip NULLs; SQLite has neither, and its two-argument min()/max()
# return NULL when either side is NULL, hence the coalesce on both sides.
def _least(dialect: str, a, b):
    return func.least(a, b) if dialect == "postgresql" else func.min(func.coalesce(a, b), func.coalesce(b, a))


def _greatest(dialect: str, a, b):
    return func.greatest(a, b) if dialect == "postgresql" else func.max(func.coalesce(a, b), func.coalesce(b, a))


def record_results(
    session: Session,
    *,
    job_run_id: int,
    model_id: int,
    image_set_id: int,
    results: list[ImageResult],
    mask_uri: str,
    mask_array: str,
    redo: str = "none",
) -> Counts:
    """Insert inspections and defects of one shard (call inside a transaction).

    Images already inspected by this model are left alone, except the rows `redo` names ("none";
    "errors": the `error` ones, data errors that may have been fixed, e.g. a restored chunk;
    "all": every one, for --force), which are deleted (defects go with them) and written again:
    either way the table holds one row per (image, model). The per-day rollup `inspection_daily` changes by the same rows, in the
    same transaction, so it always equals a recount of `inspections`.
    """
    counts = Counts()
    if not results:
        return counts
    by_position = {r.position: r for r in results}
    found = session.execute(
        select(Image.position, Image.id, Image.acquired_at).where(Image.image_set_id == image_set_id, Image.position.in_(list(by_position)))
    ).all()
    image_ids = {position: image_id for position, image_id, _ in found}
    acquired = {image_id: when for _, image_id, when in found}
    daily = _Daily()
    counts, mine = _recorded_by_this_run(session, job_run_id, model_id, list(image_ids.values()))
    if mine:
        # A shard is written in one transaction: this one was, whole. What it did not write are a --force run's
        # unreadable images that kept their verdicts: its errors, already added to the run's row then.
        counts.errors += sum(1 for p, image_id in image_ids.items() if image_id not in mine and by_position[p].verdict == "error")
        return counts
    ours = (Inspection.model_id == model_id) & Inspection.image_id.in_(list(image_ids.values()))
    redone = _prepare_redo(session, ours, redo, image_ids=image_ids, by_position=by_position, acquired=acquired, daily=daily)
    kept_errors = len(redone.kept)
    # What is left was recorded by a concurrent run after this one planned its work.
    done = {i: run for i, run in session.execute(select(Inspection.image_id, Inspection.job_run_id).where(ours)) if i not in redone.kept}
    if done:
        counts.meanwhile = len(done)
        counts.meanwhile_runs = sorted({run for run in done.values() if run is not None and run != job_run_id})
    now = utcnow()
    todo = [(image_ids[p], by_position[p]) for p in sorted(image_ids) if image_ids[p] not in done and image_ids[p] not in redone.kept]
    if not todo:
        if kept_errors:  # a redo's unreadable images, their verdicts kept: still this run's errors
            _add_to_run(session, job_run_id, Counts(errors=kept_errors), now)
        counts.errors += kept_errors
        return counts
    rows = [
        _inspection_row(image_id, result, model_id=model_id, job_run_id=job_run_id, mask_uri=mask_uri, mask_array=mask_array, now=now)
        for image_id, result in todo
    ]
    inserted = session.execute(insert(Inspection).returning(Inspection.id, sort_by_parameter_order=True), rows).scalars().all()
    defect_rows = [_defect_row(inspection_id, d) for inspection_id, (_, result) in zip(inserted, todo, strict=True) for d in result.defects]
    defect_ids = session.execute(insert(Defect).returning(Defect.id, sort_by_parameter_order=True), defect_rows).scalars().all() if defect_rows else []
    redone.carry(session, dict(zip(inserted, (image_id for image_id, _ in todo), strict=True)), list(zip(defect_ids, defect_rows, strict=True)))
    for row in rows:
        daily.add(acquired[row["image_id"]], row["verdict"], row["n_defects"])
    daily.write(session, image_set_id, model_id)
    _refresh_reviewed(session, image_set_id, [image_id for image_id, _ in todo])
    written = _counts_of([result.verdict for _, result in todo], defects=len(defect_rows))
    written.errors += kept_errors
    _add_to_run(session, job_run_id, written, now)
    counts.add(written)
    return counts


def _recorded_by_this_run(session: Session, job_run_id: int, model_id: int, image_ids: list[int]) -> tuple[Counts, set[int]]:
    """The shard's images this run has recorded already: a retried write whose first commit reached the database
    though its acknowledgement was lost. They are this run's results (counted as such, and already in its row),
    not another run's, and a --force retry must not replace them a second time."""
    rows = session.execute(select(Inspection.image_id, Inspection.verdict, Inspection.n_defects).where(
        Inspection.model_id == model_id, Inspection.job_run_id == job_run_id, Inspection.image_id.in_(image_ids))).all()
    return _counts_of([verdict for _, verdict, _ in rows], defects=sum(n for _, _, n in rows)), {image_id for image_id, _, _ in rows}


def _counts_of(verdicts: list[str], *, defects: int) -> Counts:
    """What a run counts of these verdicts: judged (pass or fail), failed, in error; and their defects."""
    return Counts(inspected=sum(v != "error" for v in verdicts), errors=sum(v == "error" for v in verdicts),
                  failed=sum(v == "fail" for v in verdicts), defects=defects)


def _add_to_run(session: Session, job_run_id: int, counts: Counts, now: dt.datetime) -> None:
    session.execute(
        update(JobRun)
        .where(JobRun.id == job_run_id)
        .values(
            n_inspected=JobRun.n_inspected + counts.inspected,
            n_errors=JobRun.n_errors + counts.errors,
            n_defects=JobRun.n_defects + counts.defects,
            heartbeat_at=now,
        )
    )


def _refresh_reviewed(session: Session, image_set_id: int, image_ids: list[int]) -> None:
    """QA's figures of images QA already decided change with a new inspection (another model version, a redo): recount them.
    The lock comes before the look for decisions: a decision committed meanwhile is then seen here, or its
    own recount (which takes the same lock) waits for these inspections and counts them."""
    lock_for_recount(session, [image_set_id])
    reviewed = session.scalar(select(ImageReview.id).where(ImageReview.image_id.in_(image_ids)).limit(1)) or session.scalar(
        select(DefectReview.id).where(DefectReview.image_id.in_(image_ids)).limit(1))
    if reviewed is not None:
        refresh_review_daily_of_sets(session, [image_set_id])


@dataclass
class _Redo:
    """What a redo takes from the rows it replaces to the new ones."""

    # Images whose new result is an error: they keep their recorded verdict (a read that failed this time).
    kept: set[int] = field(default_factory=set)
    # QA's decisions on the replaced defects, by image id (pipeline/carried_reviews.py).
    decided: dict[int, list] = field(default_factory=dict)
    # image id -> its image reviews that pointed at the replaced inspection (the one QA looked at).
    looked_at: dict[int, list[int]] = field(default_factory=dict)

    def carry(self, session: Session, image_of: dict[int, int], defects: list[tuple[int, dict]]) -> None:
        """To the new rows: QA's decisions (`image_of`: new inspection id -> image id; `defects`: (id, row) of the new defects)."""
        for inspection_id, image_id in image_of.items():
            if self.looked_at.get(image_id):
                session.execute(update(ImageReview).where(ImageReview.id.in_(self.looked_at[image_id])).values(inspection_id=inspection_id))
        if self.decided and defects:
            carried_reviews.carry(session, self.decided, [(image_of[row["inspection_id"]], defect_id, row) for defect_id, row in defects])


def _prepare_redo(session: Session, ours, redo: str, *, image_ids: dict[int, int], by_position: dict[int, ImageResult],
                  acquired: dict[int, dt.datetime | None], daily: _Daily) -> _Redo:
    """Delete the rows a redo writes again, after noting what goes over to the new ones."""
    redone = _Redo()
    if redo == "none":
        return redone
    doomed = ours & (Inspection.verdict == "error") if redo == "errors" else ours
    if redo == "all":
        # --force never replaces a verdict by an error: an image that could not be read this time keeps its verdict
        # and QA's decisions on it (replaced, they were lost for good), and the run reports the error.
        failing = [image_ids[p] for p, result in by_position.items() if p in image_ids and result.verdict == "error"]
        redone.kept = set(session.scalars(select(Inspection.image_id).where(ours, Inspection.image_id.in_(failing), Inspection.verdict != "error")))
        doomed = doomed & Inspection.image_id.not_in(redone.kept)
        redone.decided = carried_reviews.decisions_on(session, doomed)
    # Locked before the reviews that point at them are read: a decision recorded meanwhile (PostgreSQL) would be set
    # to NULL by the delete and never pointed at the redone inspection. (SQLite has one writer at a time.)
    session.execute(select(Inspection.id).where(doomed).with_for_update())
    for review_id, image_id in session.execute(select(ImageReview.id, Inspection.image_id).join(Inspection, ImageReview.inspection_id == Inspection.id)
                                               .where(doomed)):
        redone.looked_at.setdefault(image_id, []).append(review_id)
    _delete_for_redo(session, doomed, acquired, daily)
    return redone


def _delete_for_redo(session: Session, doomed, acquired: dict[int, dt.datetime | None], daily: _Daily) -> None:
    """Delete the rows to be written again; they leave the rollup. Exactly those (via RETURNING): all their
    images are written again afterwards, so first_at/last_at, which cannot be un-merged, stay exact."""
    deleted = session.execute(delete(Inspection).where(doomed).returning(Inspection.image_id, Inspection.verdict, Inspection.n_defects))
    for image_id, verdict, n_defects in deleted:
        daily.add(acquired[image_id], verdict, n_defects, sign=-1)


def _inspection_row(image_id: int, result: ImageResult, *, model_id: int, job_run_id: int, mask_uri: str, mask_array: str, now: dt.datetime) -> dict:
    return {
        "image_id": image_id,
        "model_id": model_id,
        "job_run_id": job_run_id,
        "verdict": result.verdict,
        "n_defects": len(result.defects),
        "defect_pixels": result.defect_pixels,
        "max_score": result.max_score,
        "mask_uri": mask_uri,
        "mask_array": mask_array,
        "error": result.error,
        "duration_ms": result.duration_ms,
        "inspected_at": now,
    }


def _defect_row(inspection_id: int, d) -> dict:
    return {
        "inspection_id": inspection_id,
        "class_index": d.class_index,
        "class_name": d.class_name,
        "bbox_y0": d.bbox[0],
        "bbox_x0": d.bbox[1],
        "bbox_y1": d.bbox[2],
        "bbox_x1": d.bbox[3],
        "area": d.area,
        "centroid_y": d.centroid[0],
        "centroid_x": d.centroid[1],
        "orientation": d.orientation,
        "eccentricity": d.eccentricity,
        "mean_score": d.mean_score,
        "max_score": d.max_score,
        "rle": d.rle,
    }


# A shard of images is recorded by at most this many concurrent runs, each conflict costing one more try.
_CONFLICT_ATTEMPTS = 5


def record_shard(factory: sessionmaker[Session], retry: Retry, **kwargs) -> Counts:
    def write() -> Counts:
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                with factory.begin() as session:
                    return record_results(session, **kwargs)
            except IntegrityError as exc:
                # A concurrent run committed some of these images between our look-up and our insert
                # (PostgreSQL makes the insert wait for it; SQLite reads outside the write lock).
                # Writing again finds its rows and counts them as recorded meanwhile.
                if not _is_inspection_conflict(exc) or attempt == _CONFLICT_ATTEMPTS:
                    raise
                log.info("image set %s: images recorded by a concurrent run meanwhile, writing the shard again", kwargs["image_set_id"])
        raise AssertionError("unreachable")

    return with_retries(write, retry, f"recording results of image set {kwargs['image_set_id']}")


def _is_inspection_conflict(exc: IntegrityError) -> bool:
    text = str(exc.orig)
    return "uq_inspections_image_id_model_id" in text or "inspections.image_id, inspections.model_id" in text

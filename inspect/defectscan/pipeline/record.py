"""Write one shard's results in one transaction, with bounded retries when the database is away."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from defectscan.db.schema import Defect, Image, Inspection, JobRun, utcnow
from defectscan.errors import DatabaseError
from defectscan.pipeline.postprocess import ImageResult
from defectscan.secrets import mask_secrets

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

    def add(self, other: Counts) -> None:
        self.inspected += other.inspected
        self.errors += other.errors
        self.defects += other.defects
        self.failed += other.failed


def with_retries(action: Callable[[], T], retry: Retry, what: str) -> T:
    """Run `action`; when the database cannot be reached, wait (doubling) and try again, a bounded number of times."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return action()
        except (OperationalError, InterfaceError) as exc:
            reason = mask_secrets(str(exc.orig or exc).strip().splitlines()[0])
            if attempt == retry.attempts:
                raise DatabaseError(f"{what}: database unavailable after {retry.attempts} attempts: {reason}") from None
            delay = retry.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: database unavailable (%s), retry %d/%d in %.1fs", what, reason, attempt, retry.attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def record_results(
    session: Session,
    *,
    job_run_id: int,
    model_id: int,
    image_set_id: int,
    results: list[ImageResult],
    mask_uri: str,
    mask_array: str,
    replace: bool,
) -> Counts:
    """Insert inspections and defects of one shard (call inside a transaction).

    Images already inspected by this model are left alone unless `replace`, which deletes their
    rows (defects go with them) and writes the new ones: either way the table holds one row
    per (image, model).
    """
    counts = Counts()
    if not results:
        return counts
    by_position = {r.position: r for r in results}
    image_ids = dict(
        session.execute(
            select(Image.position, Image.id).where(Image.image_set_id == image_set_id, Image.position.in_(list(by_position)))
        ).all()
    )
    if replace:
        session.execute(delete(Inspection).where(Inspection.model_id == model_id, Inspection.image_id.in_(list(image_ids.values()))))
        done = set()
    else:
        done = set(
            session.scalars(select(Inspection.image_id).where(Inspection.model_id == model_id, Inspection.image_id.in_(list(image_ids.values()))))
        )
    now = utcnow()
    rows, pending = [], []
    for position, image_id in sorted(image_ids.items()):
        if image_id in done:
            continue
        result = by_position[position]
        rows.append(
            {
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
        )
        pending.append(result)
    if not rows:
        return counts
    inserted = session.execute(insert(Inspection).returning(Inspection.id, sort_by_parameter_order=True), rows).scalars().all()
    defect_rows = [
        {
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
        for inspection_id, result in zip(inserted, pending, strict=True)
        for d in result.defects
    ]
    if defect_rows:
        session.execute(insert(Defect), defect_rows)
    counts.inspected = sum(1 for r in pending if r.verdict != "error")
    counts.errors = sum(1 for r in pending if r.verdict == "error")
    counts.failed = sum(1 for r in pending if r.verdict == "fail")
    counts.defects = len(defect_rows)
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
    return counts


def record_shard(factory: sessionmaker[Session], retry: Retry, **kwargs) -> Counts:
    def write() -> Counts:
        with factory.begin() as session:
            return record_results(session, **kwargs)

    return with_retries(write, retry, f"recording results of image set {kwargs['image_set_id']}")

"""What QA still has to decide in a lot: every failed image, and a reproducible sample of passed ones.

Escapes (defective parts the model passed) can only be found among passed images, so the queue
adds `sample_passed` of them, drawn from all the lot's passed images with a seed fixed by the lot
name: the sample does not move as decisions come in or when the queue is listed again, and the
escape rate measured on it is an unbiased estimate for the lot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from defectscan.db.queries import Filters, apply_filters, check_filters
from defectscan.db.reviews import decided_images
from defectscan.db.schema import Image, ImageSet, Inspection, Model
from defectscan.errors import DataError
from defectscan.times import iso_utc

QUEUE_COLUMNS = ("image_id", "image_key", "lot", "model", "verdict", "n_defects", "max_score", "acquired_at", "why")


@dataclass(frozen=True)
class Queue:
    lot: str
    model: str
    failed: int
    sampled: int
    decided: int
    rows: list[dict]


def review_queue(session: Session, lot: str, *, model: str | None = None, sample_passed: int = 0, seed: int = 0) -> Queue:
    """The lot's undecided failed images and its undecided sampled passes, failed first, by image id."""
    if sample_passed < 0:
        raise DataError(f"--sample-passed {sample_passed}: expected 0 or more")
    filters = Filters(lot=lot, model=model)
    query = apply_filters(session, (
        select(Inspection.id.label("inspection_id"), Image.id.label("image_id"), Image.key, ImageSet.lot, Model.name, Model.version, Inspection.verdict, Inspection.n_defects,
               Inspection.max_score, Image.acquired_at, Inspection.model_id)
        .join(Image, Inspection.image_id == Image.id).join(ImageSet, Image.image_set_id == ImageSet.id)
        .join(Model, Inspection.model_id == Model.id)
    ), filters, defects=False)
    rows = session.execute(query.order_by(Image.id)).all()
    if not rows:
        check_filters(session, filters)  # names an unknown lot or model
        raise DataError(f"lot {lot!r} has no inspected image{' for model ' + model if model else ''}")
    models = sorted({f"{r.name}:{r.version}" for r in rows})
    if len(models) > 1:
        raise DataError(f"lot {lot!r} was inspected by several model versions ({', '.join(models)}): give --model")
    decided = {d.inspection_id for d in decided_images(session, filters)}
    failed = [r for r in rows if r.verdict == "fail"]
    passed = [r for r in rows if r.verdict == "pass"]
    sample = _sample(passed, sample_passed, lot, seed)
    queue = [_row(r, "failed") for r in failed if r.inspection_id not in decided]
    queue += [_row(r, "sampled pass") for r in sample if r.inspection_id not in decided]
    return Queue(lot=lot, model=models[0], failed=len(failed), sampled=len(sample), decided=len(decided), rows=queue)


def _sample(passed: list, n: int, lot: str, seed: int) -> list:
    if n == 0 or not passed:
        return []
    digest = int.from_bytes(hashlib.sha256(lot.encode()).digest()[:8], "little")
    rng = np.random.default_rng([digest, seed])
    picked = sorted(rng.choice(len(passed), size=min(n, len(passed)), replace=False))
    return [passed[i] for i in picked]


def _row(r, why: str) -> dict:
    return dict(zip(QUEUE_COLUMNS, (r.image_id, r.key, r.lot, f"{r.name}:{r.version}", r.verdict, r.n_defects, round(r.max_score, 4),
                                    iso_utc(r.acquired_at), why), strict=True))

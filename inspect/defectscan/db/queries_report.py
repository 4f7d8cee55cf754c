"""The report's aggregations, each one SQL query that returns a few rows, never the defects themselves.

Counts per lot or hour (the p-chart's subgroups), per defect class, per area bin and per cell of
a position grid run as GROUP BY in the database, so a report over millions of defects reads only
what it shows. The selection is db/queries.py's `Filters`, applied by its `apply_filters`: one definition
of what "lot L", "line X since D" or "job run N" select, shared with the listing commands.

Works the same on SQLite and PostgreSQL; the two dialect differences (hour buckets, float to
integer bins) are in `_hour_bucket` and `_bin`, and every order by a time that may be NULL says
where NULL goes (PostgreSQL sorts it high, SQLite low), so that both pick and list the same rows.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Integer, Select, case, cast, distinct, func, literal, select
from sqlalchemy.orm import Session

from defectscan.db.model_refs import matching_ids
from defectscan.db.queries import Filters, ImageSource, apply_filters, image_scope
from defectscan.db.schema import Defect, Image, ImageSet, Inspection, JobRun, Model, fills_missing_chunks
from defectscan.errors import DataError
from defectscan.times import iso_utc

# How the report names the image sets without a lot, in the lot table and wherever a lot is shown.
NO_LOT = "(no lot)"
# Most defects drawn on one worst-image overlay (largest first): more only clutter the picture.
MAX_DRAWN_DEFECTS = 25


def _inspections() -> Select:
    return (
        select()
        .select_from(Inspection)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
    )


def _scope_defects(session: Session, filters: Filters, *columns) -> Select:
    """Defects of the inspections in scope, as `inspection_id IN (scope)`.

    Planners drive this from the scope's (indexed) inspections; the equivalent four-table join
    let SQLite walk the whole defects table in class-index order (7 s instead of 1 s at 1M rows).
    Only inspection-level filters apply: a report's scope has no defect-level ones.
    """
    scope = apply_filters(session, _inspections().add_columns(Inspection.id), filters, defects=False)
    return select(*columns).select_from(Defect).where(Defect.inspection_id.in_(scope))


def _failed():
    return func.sum(case((Inspection.verdict == "fail", 1), else_=0))


def _errors():
    return func.sum(case((Inspection.verdict == "error", 1), else_=0))


def _lots():
    """How many lots, the image sets without a lot counted as one more, as `lot_groups` lists them.

    count(DISTINCT lot) leaves NULL out: a line with one lot and sets without one would count one
    lot, be charted per hour and lose the control-limit rule while its lot table lists two.
    """
    return func.count(distinct(ImageSet.lot)) + func.max(case((ImageSet.lot.is_(None), 1), else_=0))


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _hour_bucket(session: Session):
    """The capture hour (UTC) as a value that sorts in time order."""
    if _dialect(session) == "postgresql":
        return func.date_trunc("hour", func.timezone("UTC", Image.acquired_at))
    # SQLite stores UTC times as 'YYYY-MM-DD HH:MM:SS.ffffff' text
    return func.strftime("%Y-%m-%d %H:00", Image.acquired_at)


def _bin(session: Session, value):
    """floor(value) as an integer, for non-negative values (PostgreSQL's CAST rounds, SQLite's truncates)."""
    if _dialect(session) == "postgresql":
        return cast(func.floor(value), Integer)
    return cast(value, Integer)


def _int(value) -> int:
    return int(value or 0)


# --- what the scope holds ------------------------------------------------------------------------------


def scope_models(session: Session, filters: Filters) -> list[dict[str, Any]]:
    """The model versions with results in the scope, most inspections first."""
    query = apply_filters(
        session,
        _inspections().add_columns(Model.id, Model.name, Model.version, func.count(Inspection.id))
        .join(Model, Inspection.model_id == Model.id)
        .group_by(Model.id, Model.name, Model.version)
        .order_by(func.count(Inspection.id).desc(), Model.id),
        filters,
        defects=False,
    )
    return [{"id": i, "name": n, "version": v, "label": f"{n}:{v}", "inspections": c} for i, n, v, c in session.execute(query)]


def model_info(session: Session, reference: str) -> dict[str, Any]:
    """A model version's identity, its evaluation metrics (`models.metrics`) and its operating point."""
    ids = matching_ids(session, reference)
    if len(ids) != 1:
        raise DataError(f"model {reference!r} names {len(ids)} versions: give NAME:VERSION")
    model = session.get(Model, ids[0])
    return {
        "id": model.id, "name": model.name, "version": model.version, "sha256": model.sha256, "uri": model.uri,
        "architecture": model.architecture, "classes": list(model.classes or []), "threshold": model.threshold,
        "stage": model.stage, "metrics": model.metrics or {}, "operating_point": model.operating_point or {},
        "registered_at": iso_utc(model.registered_at),
    }


def totals(session: Session, filters: Filters) -> dict[str, Any]:
    """Images inspected, passed, failed, in error, defects and defect pixels, first and last capture time."""
    query = apply_filters(
        session,
        _inspections().add_columns(
            func.count(Inspection.id), _failed(), _errors(), func.sum(Inspection.n_defects), func.sum(Inspection.defect_pixels),
            func.min(Image.acquired_at), func.max(Image.acquired_at), _lots(),
        ),
        filters,
        defects=False,
    )
    images, failed, errors, defects, pixels, first, last, lots = session.execute(query).one()
    images, failed, errors = _int(images), _int(failed), _int(errors)
    return {
        "images": images, "passed": images - failed - errors, "failed": failed, "errors": errors, "defects": _int(defects),
        "defect_pixels": _int(pixels), "first_at": iso_utc(first), "last_at": iso_utc(last), "lots": _int(lots),
    }


# --- subgroups for the p-chart and the lot table ----------------------------------------------------------


def _group_rows(rows, label) -> list[dict[str, Any]]:
    return [
        {"label": label(key), "key": key, "images": _int(n), "failed": _int(f), "errors": _int(e), "defects": _int(d),
         "first_at": iso_utc(first), "last_at": iso_utc(last), "inspected": (inspected_first, inspected_last)}
        for key, n, f, e, d, first, last, inspected_first, inspected_last in rows
    ]


def _group_columns():
    return (func.count(Inspection.id), _failed(), _errors(), func.sum(Inspection.n_defects), func.min(Image.acquired_at),
            func.max(Image.acquired_at), func.min(Inspection.inspected_at), func.max(Inspection.inspected_at))


def lot_groups(session: Session, filters: Filters, *, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Per lot: images, failed, errors, defects, capture times, inspection times; the `limit` most recent lots in time order, and the lot count."""
    query = apply_filters(session, _inspections().add_columns(ImageSet.lot, *_group_columns()).group_by(ImageSet.lot), filters, defects=False)
    # a lot without capture times counts as the oldest
    rows = session.execute(query.order_by(func.max(Image.acquired_at).desc().nulls_last(), ImageSet.lot).limit(limit)).all()
    count = session.scalar(apply_filters(session, _inspections().add_columns(_lots()), filters, defects=False))
    groups = _group_rows(rows, lambda lot: lot if lot is not None else NO_LOT)
    return sorted(groups, key=lambda g: (g["first_at"] or "", g["label"])), _int(count)


def hour_groups(session: Session, filters: Filters, *, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Per capture hour (UTC): the same counts as `lot_groups`, the `limit` latest hours in time order."""
    hour = _hour_bucket(session).label("hour")
    query = apply_filters(session, _inspections().add_columns(hour, *_group_columns()).group_by(hour), filters, defects=False)
    rows = session.execute(query.order_by(hour.desc().nulls_last()).limit(limit)).all()
    count = session.scalar(select(func.count()).select_from(
        apply_filters(session, _inspections().add_columns(hour).group_by(hour), filters, defects=False).subquery()))

    def label(value) -> str:
        if value is None:
            return "(no time)"
        if isinstance(value, dt.datetime):
            return value.strftime("%Y-%m-%d %H:00")
        return str(value)

    return list(reversed(_group_rows(rows, label))), _int(count)


# --- defects: classes, areas, positions ---------------------------------------------------------------------


def class_counts(session: Session, filters: Filters) -> list[dict[str, Any]]:
    """Per defect class: defects, images having one, total area; most defects first."""
    n = func.count(Defect.id)
    query = _scope_defects(session, filters, Defect.class_name, func.min(Defect.class_index), n, func.count(distinct(Defect.inspection_id)),
                           func.sum(Defect.area)).group_by(Defect.class_name).order_by(n.desc(), Defect.class_name)
    return [{"class": c, "class_index": _int(i), "defects": _int(d), "images": _int(im), "area": _int(a)}
            for c, i, d, im, a in session.execute(query)]


def area_counts(session: Session, filters: Filters, edges: tuple[int, ...]) -> list[int]:
    """Defects per area bin: bin i holds areas in [edges[i], edges[i+1]), the last bin everything from edges[-1] up."""
    if list(edges) != sorted(set(edges)) or not edges:
        raise DataError(f"area bin edges {edges}: expected increasing numbers")
    index = case(*((Defect.area < edge, i) for i, edge in enumerate(edges[1:])), else_=len(edges) - 1).label("bin")
    query = _scope_defects(session, filters, index, func.count(Defect.id)).where(Defect.area >= edges[0]).group_by(index)
    counts = [0] * len(edges)
    for i, n in session.execute(query):
        counts[int(i)] += _int(n)
    return counts


def position_grid(session: Session, filters: Filters, size: int) -> list[list[int]]:
    """Defect centroids counted on a size x size grid over the image, in each image's own relative coordinates."""
    row = _bin(session, Defect.centroid_y * size / Image.height).label("row")
    col = _bin(session, Defect.centroid_x * size / Image.width).label("col")
    query = (
        _scope_defects(session, filters, row, col, func.count(Defect.id))
        .join(Inspection, Defect.inspection_id == Inspection.id).join(Image, Inspection.image_id == Image.id)
        .group_by(row, col)
    )
    grid = [[0] * size for _ in range(size)]
    for r, c, n in session.execute(query):
        grid[min(size - 1, max(0, int(r)))][min(size - 1, max(0, int(c)))] += _int(n)
    return grid


# --- images: worst, errors, not inspected ---------------------------------------------------------------------


def worst_images(session: Session, filters: Filters, n: int) -> list[dict[str, Any]]:
    """The `n` failed images with the most defect pixels (then highest score), with their largest defects' masks."""
    query = apply_filters(
        session,
        _inspections().add_columns(Inspection.id).where(Inspection.verdict == "fail")
        .order_by(Inspection.defect_pixels.desc(), Inspection.max_score.desc(), Inspection.id),
        filters,
        defects=False,
    ).limit(n)
    return list(drawable_inspections(session, list(session.scalars(query))).values())


def drawable_inspections(session: Session, inspection_ids: list[int]) -> dict[int, dict[str, Any]]:
    """What an overlay needs of these inspections (image source, largest defects with masks), by id in the order given."""
    rows = session.execute(
        select(Inspection.id, Image.id, Image.key, ImageSet.lot, ImageSet.line, Image.acquired_at, Inspection.n_defects,
               Inspection.defect_pixels, Inspection.max_score, Inspection.mask_uri, Inspection.mask_array, ImageSet.uri,
               ImageSet.array_path, ImageSet.kind, Image.position, Image.height, Image.width, ImageSet.attrs)
        .join(Image, Inspection.image_id == Image.id).join(ImageSet, Image.image_set_id == ImageSet.id)
        .where(Inspection.id.in_(inspection_ids))
    )
    found = {}
    for (inspection_id, image_id, key, lot, line, when, n_defects, pixels, peak, mask_uri, mask_array, uri, array_path, kind,
         position, height, width, attrs) in rows:
        found[inspection_id] = {
            "inspection_id": inspection_id, "image_id": image_id, "key": key, "lot": lot, "line": line, "acquired_at": iso_utc(when),
            "n_defects": n_defects, "defect_pixels": pixels, "max_score": None if peak is None else round(peak, 4),
            "height": height, "width": width,
            "source": ImageSource(uri, array_path, kind, position, height, width, mask_uri, mask_array, fills_missing_chunks(attrs)),
            "defects": [],
        }
    if found:
        defects = session.execute(
            select(Defect.inspection_id, Defect.id, Defect.class_index, Defect.class_name, Defect.bbox_y0, Defect.bbox_x0,
                   Defect.bbox_y1, Defect.bbox_x1, Defect.area, Defect.max_score, Defect.rle)
            .where(Defect.inspection_id.in_(list(found))).order_by(Defect.inspection_id, Defect.area.desc(), Defect.id)
        )
        for inspection_id, id_, index, name, y0, x0, y1, x1, area, peak, rle in defects:
            drawn = found[inspection_id]["defects"]
            if len(drawn) < MAX_DRAWN_DEFECTS:
                drawn.append({"id": id_, "class_index": index, "class": name, "bbox": [y0, x0, y1, x1], "area": area,
                              "max_score": round(peak, 4), "rle": rle})
    return {i: found[i] for i in inspection_ids if i in found}


def error_images(session: Session, filters: Filters, *, limit: int) -> list[dict[str, Any]]:
    """Images whose inspection ended in error, with the reason (the first `limit`, in capture order)."""
    query = apply_filters(
        session,
        _inspections().add_columns(Image.id, Image.key, ImageSet.lot, ImageSet.uri, Image.position, Inspection.job_run_id, Inspection.error)
        .where(Inspection.verdict == "error").order_by(Image.acquired_at.nulls_first(), Image.id),
        filters,
        defects=False,
    ).limit(limit)
    return [{"image_id": i, "key": k, "lot": lot, "image_set": uri, "position": p, "job_run": j, "error": e}
            for i, k, lot, uri, p, j, e in session.execute(query)]


def not_inspected(session: Session, filters: Filters, model_id: int | None, *, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Images the scope's lot/line/period selects that this model (None: any model) has no result for (skipped, or
    never run).

    Only the image-level filters apply (a job run's scope has no such images by definition).
    """
    judged = [Inspection.image_id == Image.id] + ([Inspection.model_id == model_id] if model_id is not None else [])
    inspected = select(literal(1)).where(*judged).exists()
    conditions = [~inspected, *image_scope(filters)]
    base = select().select_from(Image).join(ImageSet, Image.image_set_id == ImageSet.id).where(*conditions)
    count = session.scalar(base.add_columns(func.count(Image.id)))
    rows = session.execute(base.add_columns(Image.id, Image.key, ImageSet.lot, ImageSet.uri, Image.position)
                           .order_by(Image.acquired_at.nulls_first(), Image.id).limit(limit))
    return _int(count), [{"image_id": i, "key": k, "lot": lot, "image_set": uri, "position": p} for i, k, lot, uri, p in rows]


def job_runs(session: Session, filters: Filters) -> list[dict[str, Any]]:
    """The job runs that wrote the scope's results, oldest first, with their own counts and status."""
    ids = apply_filters(session, _inspections().add_columns(Inspection.job_run_id).where(Inspection.job_run_id.is_not(None))
                 .group_by(Inspection.job_run_id), filters, defects=False)
    runs = session.execute(
        select(JobRun).where(JobRun.id.in_(ids.scalar_subquery())).order_by(JobRun.started_at, JobRun.id)
    ).scalars()
    return [
        {"id": r.id, "job": r.job, "status": r.status, "started_at": iso_utc(r.started_at), "finished_at": iso_utc(r.finished_at),
         "images": r.n_images, "inspected": r.n_inspected, "skipped": r.n_skipped, "errors": r.n_errors, "defects": r.n_defects,
         "images_per_second": r.images_per_second, "error": r.error}
        for r in runs
    ]


__all__ = [
    "area_counts", "class_counts", "error_images", "hour_groups", "job_runs", "lot_groups", "model_info", "not_inspected",
    "position_grid", "scope_models", "totals", "worst_images",
]

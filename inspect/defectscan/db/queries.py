"""The read side of the results database: filtered listings, details and lot summaries.

Used by the `defects`, `images` and `lots` commands and by the reports. Every filter is a bound
parameter; counts and aggregations run in SQL, so nothing here loads more rows than it returns.
Rows are plain dicts whose keys, in order, are the module's `*_COLUMNS`: scripts rely on them.

Time filters select by the image's capture time (`images.acquired_at`; registration gives every
image its set's time when the store has no per-image times).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Select, and_, case, distinct, func, literal, select, union_all
from sqlalchemy.orm import Session, aliased

from defectscan import provenance
from defectscan.config import shipped_defaults
from defectscan.db.model_refs import matching_ids
from defectscan.db.schema import (
    NO_DAY,
    VERDICTS,
    Defect,
    Image,
    ImageSet,
    Inspection,
    InspectionDaily,
    JobRun,
    Model,
    as_row_id,
    fills_missing_chunks,
)
from defectscan.errors import DataError, suggest
from defectscan.times import as_utc, day_in_zone, iso_utc, parse_iso

DEFECT_COLUMNS = (
    "id", "image_id", "image_key", *provenance.LABELS, provenance.TIME, "model", "job_run_id",
    "verdict", "class", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "centroid_y", "centroid_x",
    "mean_score", "max_score",
)
IMAGE_COLUMNS = (
    "id", "image_id", "image_key", "image_set_id", "position", *provenance.LABELS, provenance.TIME,
    "model", "job_run_id", "verdict", "n_defects", "defect_pixels", "max_score", "inspected_at", "error",
)
LOT_COLUMNS = (
    "lot", "model", "images", "failed", "errors", "defects", "defect_rate", "first_at", "last_at", "verdict",
)
CLASS_COLUMNS = ("class", "defects", "mean_area", "max_score")

DEFECT_SORTS = {
    "id": Defect.id,
    "time": Image.acquired_at,
    "area": Defect.area,
    "score": Defect.max_score,
    "class": Defect.class_name,
}
IMAGE_SORTS = {
    "id": Inspection.id,
    "time": Image.acquired_at,
    "score": Inspection.max_score,
    "defects": Inspection.n_defects,
    "key": Image.key,
}
# Sorts by a column that may be NULL (an image without a capture time).
NULLABLE_SORTS = {"time"}


@dataclass(frozen=True)
class Filters:
    """What to select; None means no restriction. Ranges are inclusive, `until` is exclusive."""

    lot: str | None = None
    line: str | None = None
    product: str | None = None
    camera: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    model: str | None = None  # NAME or NAME:VERSION
    job_run: int | None = None
    verdict: str | None = None
    defect_class: str | None = None
    min_area: int | None = None
    max_area: int | None = None
    min_score: float | None = None
    max_score: float | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since >= self.until:
            raise DataError(f"--since {iso_utc(self.since)} is not before --until {iso_utc(self.until)}")
        if self.min_area is not None and self.max_area is not None and self.min_area > self.max_area:
            raise DataError(f"--min-area {self.min_area} is larger than --max-area {self.max_area}")
        for name in ("min_score", "max_score"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:  # written so that NaN, which compares false, is refused too
                raise DataError(f"--{name.replace('_', '-')} {value}: expected a score between 0 and 1")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise DataError(f"--min-score {self.min_score} is larger than --max-score {self.max_score}")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise DataError(f"verdict {self.verdict!r}: expected one of {', '.join(VERDICTS)}")

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Page:
    """Rows of one page and whether more rows follow it (found by reading one row past the page)."""

    rows: list[dict[str, Any]]
    more: bool
    offset: int


# --- parsing user input -------------------------------------------------------------------------


def parse_when(value: str, option: str, *, end_of_day: bool = False) -> dt.datetime:
    """An ISO 8601 date or time as aware UTC; a bare date is midnight UTC (the next midnight when `end_of_day`)."""
    text = value.strip()
    try:
        # whatever names a day without a time (20260301, 2026-W09-7, 2026-03-01Z) is a whole day:
        # datetime.fromisoformat would take it as its first instant, and --until would leave the day out
        day = dt.date.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        day = None
    try:
        zoned = day_in_zone(text)  # 2026-03-01-05:00: the whole day in that time zone
        if zoned is not None:
            return as_utc(zoned + dt.timedelta(days=1) if end_of_day else zoned)
        if day is None:
            return parse_iso(text)
        when = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
        return when + dt.timedelta(days=1) if end_of_day else when
    except (ValueError, OverflowError):  # OverflowError: the day after 9999-12-31
        raise DataError(f"{option} {value!r}: expected an ISO 8601 date or time such as 2026-03-01 or 2026-03-01T08:00:00Z") from None


# --- checks of filter values, with suggestions -----------------------------------------------------



def check_filters(session: Session, filters: Filters) -> None:
    """Refuse a lot, line, product, camera, class, model or job run that no row has, naming close ones.

    Each check is one indexed lookup, or a scan of the small `image_sets`/`models` tables; the
    class names come from the registered models, not from the (large) defects table.
    """
    for name in provenance.LABELS:
        value = getattr(filters, name)
        if value is None:
            continue
        column = getattr(ImageSet, name)
        if session.scalar(select(literal(1)).where(column == value).limit(1)) is None:
            known = list(session.scalars(select(column).distinct().where(column.is_not(None)).limit(10000)))
            raise DataError(f"unknown {name} {value!r}: no image set has it{suggest(value, sorted(known))}")
    if filters.defect_class is not None:
        known = sorted({c for classes in session.scalars(select(Model.classes)) for c in (classes or [])})
        if filters.defect_class not in known:
            raise DataError(f"unknown defect class {filters.defect_class!r}: no registered model has it{suggest(filters.defect_class, known)}")
    if filters.model is not None:
        matching_ids(session, filters.model)
    if filters.job_run is not None and session.get(JobRun, filters.job_run) is None:
        raise DataError(f"unknown job run {filters.job_run}: see `defectscan jobs history` for run ids")


# --- shared filtering -------------------------------------------------------------------------------


def set_scope(filters: Filters) -> list:
    """The filters on where images were taken (image_sets columns)."""
    return [getattr(ImageSet, name) == getattr(filters, name) for name in provenance.LABELS if getattr(filters, name) is not None]


def image_scope(filters: Filters) -> list:
    """The filters on where and when images were taken (image_sets and images columns)."""
    conditions = set_scope(filters)
    if filters.since is not None:
        conditions.append(Image.acquired_at >= filters.since)
    if filters.until is not None:
        conditions.append(Image.acquired_at < filters.until)
    return conditions


def apply_filters(session: Session, query: Select, filters: Filters, *, defects: bool) -> Select:
    """Add the filters to a query that joins inspections, images and image_sets (and defects when `defects`)."""
    conditions = image_scope(filters)
    if filters.model is not None:
        conditions.append(Inspection.model_id.in_(matching_ids(session, filters.model)))
    if filters.job_run is not None:
        conditions.append(Inspection.job_run_id == filters.job_run)
    if filters.verdict is not None:
        conditions.append(Inspection.verdict == filters.verdict)
    if defects:
        if filters.defect_class is not None:
            conditions.append(Defect.class_name == filters.defect_class)
        if filters.min_area is not None:
            conditions.append(Defect.area >= filters.min_area)
        if filters.max_area is not None:
            conditions.append(Defect.area <= filters.max_area)
        if filters.min_score is not None:
            conditions.append(Defect.max_score >= filters.min_score)
        if filters.max_score is not None:
            conditions.append(Defect.max_score <= filters.max_score)
    else:
        if filters.defect_class is not None:
            # an image "has" a class when one of its defects is of that class; an alias, so that a query that
            # itself reads defects (QA's figures) does not correlate this subquery's FROM away
            its = aliased(Defect)
            conditions.append(select(literal(1)).where(its.inspection_id == Inspection.id, its.class_name == filters.defect_class).exists())
        if filters.min_score is not None:
            conditions.append(Inspection.max_score >= filters.min_score)
        if filters.max_score is not None:
            conditions.append(Inspection.max_score <= filters.max_score)
        if filters.min_area is not None:
            conditions.append(Inspection.defect_pixels >= filters.min_area)
        if filters.max_area is not None:
            conditions.append(Inspection.defect_pixels <= filters.max_area)
    return query.where(and_(*conditions)) if conditions else query


def _order(query: Select, sorts: dict[str, Any], sort: str, descending: bool, tiebreak, filters: Filters) -> Select:
    if sort not in sorts:
        raise DataError(f"sort {sort!r}: expected one of {', '.join(sorts)}")
    column = sorts[sort]
    same = column is tiebreak
    if filters.lot is not None or filters.job_run is not None:
        # A lot or job run is a few thousand images: start from them and sort what they have.
        # Ordering by a bare indexed column tempts PostgreSQL into walking that whole index
        # (10M defects) and filtering, which is slow for any but the newest lot; an expression
        # it cannot read from an index keeps the plan on the lot's rows.
        column, tiebreak = func.coalesce(column, column), func.coalesce(tiebreak, tiebreak)
    keys = [key.desc() if descending else key.asc() for key in ((column,) if same else (column, tiebreak))]
    if sort in NULLABLE_SORTS:
        # NULL sorts high on PostgreSQL and low on SQLite: say where it goes, so both list the same rows
        keys[0] = keys[0].nulls_last() if descending else keys[0].nulls_first()
    return query.order_by(*keys)


def _page(session: Session, query: Select, limit: int, offset: int, convert) -> Page:
    if limit < 1 or offset < 0:
        raise DataError(f"--limit {limit} / --offset {offset}: expected a limit of at least 1 and an offset of at least 0")
    rows = session.execute(query.limit(limit + 1).offset(offset)).all()
    return Page([convert(row) for row in rows[:limit]], more=len(rows) > limit, offset=offset)


def _model_label(name: str, version: str) -> str:
    return f"{name}:{version}"


# --- defects ----------------------------------------------------------------------------------------------


def _defects_select() -> Select:
    return (
        select(
            Defect.id, Image.id.label("image_id"), Image.key, ImageSet.lot, ImageSet.line, ImageSet.product, ImageSet.camera,
            Image.acquired_at, Model.name, Model.version, Inspection.job_run_id, Inspection.verdict, Defect.class_name,
            Defect.area, Defect.bbox_y0, Defect.bbox_x0, Defect.bbox_y1, Defect.bbox_x1, Defect.centroid_y, Defect.centroid_x,
            Defect.mean_score, Defect.max_score,
        )
        .select_from(Defect)
        .join(Inspection, Defect.inspection_id == Inspection.id)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
        .join(Model, Inspection.model_id == Model.id)
    )


def _defect_row(row) -> dict[str, Any]:
    return dict(zip(DEFECT_COLUMNS, (
        row.id, row.image_id, row.key, row.lot, row.line, row.product, row.camera, iso_utc(row.acquired_at),
        _model_label(row.name, row.version), row.job_run_id, row.verdict, row.class_name, row.area, row.bbox_y0, row.bbox_x0,
        row.bbox_y1, row.bbox_x1, round(row.centroid_y, 2), round(row.centroid_x, 2), round(row.mean_score, 4), round(row.max_score, 4),
    ), strict=True))


def list_defects(
    session: Session, filters: Filters = Filters(), *, sort: str = "id", descending: bool = True, limit: int = 50, offset: int = 0,
) -> Page:
    """Defects matching `filters`, newest first by default."""
    check_filters(session, filters)
    query = apply_filters(session, _defects_select(), filters, defects=True)
    query = _order(query, DEFECT_SORTS, sort, descending, Defect.id, filters)
    return _page(session, query, limit, offset, _defect_row)


def count_defects(session: Session, filters: Filters = Filters()) -> int:
    query = (
        select(func.count()).select_from(Defect).join(Inspection, Defect.inspection_id == Inspection.id)
        .join(Image, Inspection.image_id == Image.id).join(ImageSet, Image.image_set_id == ImageSet.id)
    )
    return session.scalar(apply_filters(session, query, filters, defects=True))


def get_defect(session: Session, defect_id: int) -> tuple[dict[str, Any], ImageSource]:
    """One defect with its run-length mask, and where its image and score map are stored."""
    row = session.execute(
        _defects_select().add_columns(
            Defect.class_index, Defect.orientation, Defect.eccentricity, Defect.rle, Inspection.id.label("inspection_id"),
            Inspection.mask_uri, Inspection.mask_array, Image.position, Image.height, Image.width, ImageSet.uri, ImageSet.array_path,
            ImageSet.kind, ImageSet.attrs,
        ).where(Defect.id == defect_id)
    ).one_or_none()
    if row is None:
        raise DataError(f"no defect with id {defect_id}")
    record = _defect_row(row)
    record.update(
        class_index=row.class_index, orientation=round(row.orientation, 4), eccentricity=round(row.eccentricity, 4),
        inspection_id=row.inspection_id, rle=row.rle,
    )
    source = ImageSource(row.uri, row.array_path, row.kind, row.position, row.height, row.width, row.mask_uri, row.mask_array,
                         fills_missing_chunks(row.attrs))
    return record, source


# --- images ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """Where an image's pixels and its score map are stored."""

    uri: str
    array_path: str
    kind: str
    position: int
    height: int
    width: int
    mask_uri: str | None = None
    mask_array: str | None = None
    # Registered with --no-chunk-check: a chunk not stored is the fill value, not an image that is gone.
    fill_missing: bool = False

    @classmethod
    def of(cls, image_set: ImageSet, image: Image, mask_uri: str | None = None, mask_array: str | None = None) -> ImageSource:
        return cls(image_set.uri, image_set.array_path, image_set.kind, image.position, image.height, image.width, mask_uri, mask_array,
                   fills_missing_chunks(image_set.attrs))


def _images_select() -> Select:
    return (
        select(
            Inspection.id, Image.id.label("image_id"), Image.key, Image.image_set_id, Image.position, ImageSet.lot, ImageSet.line,
            ImageSet.product, ImageSet.camera, Image.acquired_at, Model.name, Model.version, Inspection.job_run_id,
            Inspection.verdict, Inspection.n_defects, Inspection.defect_pixels, Inspection.max_score, Inspection.inspected_at,
            Inspection.error,
        )
        .select_from(Inspection)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
        .join(Model, Inspection.model_id == Model.id)
    )


def _image_row(row) -> dict[str, Any]:
    return dict(zip(IMAGE_COLUMNS, (
        row.id, row.image_id, row.key, row.image_set_id, row.position, row.lot, row.line, row.product, row.camera,
        iso_utc(row.acquired_at), _model_label(row.name, row.version), row.job_run_id, row.verdict, row.n_defects,
        row.defect_pixels, round(row.max_score, 4), iso_utc(row.inspected_at), row.error,
    ), strict=True))


def list_images(
    session: Session, filters: Filters = Filters(), *, sort: str = "id", descending: bool = True, limit: int = 50, offset: int = 0,
) -> Page:
    """Inspected images (one row per image and model version) matching `filters`; area filters apply to defect pixels."""
    check_filters(session, filters)
    query = apply_filters(session, _images_select(), filters, defects=False)
    query = _order(query, IMAGE_SORTS, sort, descending, Inspection.id, filters)
    return _page(session, query, limit, offset, _image_row)


def get_image(session: Session, ident: str, model: str | None = None, *, by_key: bool = False) -> tuple[dict[str, Any], ImageSource]:
    """An image (by id, or by key when not a number or when `by_key`) with its inspections and their defects,
    and where its pixels are stored (each inspection names its own score map).

    An image inspected by several model versions has one inspection each; `model` picks one.
    """
    by_id = ident.isascii() and ident.isdigit() and not by_key  # "²" and "١٢" are digits to str.isdigit
    query = select(Image.id)
    query = query.where(Image.id == (as_row_id(ident) or 0)) if by_id else query.where(Image.key == ident)
    ids = list(session.scalars(query.limit(2)))
    if not ids:
        raise DataError(f"no image with {'id' if by_id else 'key'} {ident!r}")
    if len(ids) > 1:
        raise DataError(f"image key {ident!r} is used by several images: give the image id (see `defectscan images list`)")
    image_id = ids[0]
    image, image_set = session.execute(
        select(Image, ImageSet).join(ImageSet, Image.image_set_id == ImageSet.id).where(Image.id == image_id)
    ).one()
    inspections = select(Inspection, Model).join(Model, Inspection.model_id == Model.id).where(Inspection.image_id == image_id)
    if model is not None:
        inspections = inspections.where(Inspection.model_id.in_(matching_ids(session, model)))
    found = session.execute(inspections.order_by(Inspection.inspected_at.desc(), Inspection.id.desc())).all()
    record: dict[str, Any] = {
        "image_id": image.id, "image_key": image.key, "image_set_id": image_set.id, "image_set_uri": image_set.uri,
        "position": image.position, "height": image.height, "width": image.width, "lot": image_set.lot, "line": image_set.line,
        "product": image_set.product, "camera": image_set.camera, "acquired_at": iso_utc(image.acquired_at),
        "inspections": [],
    }
    for inspection, model_row in found:
        defects = session.execute(
            select(Defect).where(Defect.inspection_id == inspection.id).order_by(Defect.max_score.desc(), Defect.id)
        ).scalars().all()
        record["inspections"].append({
            "id": inspection.id, "model": _model_label(model_row.name, model_row.version), "job_run_id": inspection.job_run_id,
            "verdict": inspection.verdict, "n_defects": inspection.n_defects, "defect_pixels": inspection.defect_pixels,
            "max_score": round(inspection.max_score, 4), "inspected_at": iso_utc(inspection.inspected_at), "error": inspection.error,
            "mask_uri": inspection.mask_uri, "mask_array": inspection.mask_array,
            "defects": [
                {"id": d.id, "class": d.class_name, "class_index": d.class_index, "area": d.area,
                 "bbox": [d.bbox_y0, d.bbox_x0, d.bbox_y1, d.bbox_x1], "max_score": round(d.max_score, 4), "rle": d.rle}
                for d in defects
            ],
        })
    return record, ImageSource.of(image_set, image)


# --- lots ------------------------------------------------------------------------------------------------------------


def _lot_aggregates():
    # labelled like inspection_daily's columns, so raw and rollup rows line up in one union
    images = func.count(Inspection.id).label("images")
    failed = func.sum(case((Inspection.verdict == "fail", 1), else_=0)).label("failed")
    errors = func.sum(case((Inspection.verdict == "error", 1), else_=0)).label("errors")
    defects = func.sum(Inspection.n_defects).label("defects")
    return images, failed, errors, defects, func.min(Image.acquired_at).label("first_at"), func.max(Image.acquired_at).label("last_at")


def failed_share(images: int, failed: int, errors: int) -> float:
    """The share of failed images among those judged: images in error are neither pass nor fail.

    The one definition behind `defect_rate` in `defectscan lots` and the hold rule of lots and reports.
    """
    judged = images - errors
    return failed / judged if judged > 0 else 0.0


# Images in error a released lot may have: none, so that unjudged parts block a release.
MAX_ERRORS = 0


def hold_rules(hold_above: float | None = None, max_errors: int = MAX_ERRORS) -> tuple[float, int]:
    """The hold rules checked; `hold_above` defaults to the qa.hold_above setting of configs/defaults.yaml."""
    hold_above = shipped_defaults().qa.hold_above if hold_above is None else hold_above
    if not 0 <= hold_above <= 1:  # written so that NaN, which compares false, is refused too
        raise DataError(f"--hold-above {hold_above}: expected a share between 0 and 1")
    if max_errors < 0:
        raise DataError(f"--max-errors {max_errors}: expected 0 or more")
    return hold_above, max_errors


def hold_reasons(images: int, failed: int, errors: int, hold_above: float, max_errors: int = MAX_ERRORS) -> list[str]:
    """Why `lot_disposition` holds a lot with these counts; empty when it releases it (or finds it incomplete)."""
    share = failed_share(images, failed, errors)
    reasons = []
    if share > hold_above:
        reasons.append(f"failed {100 * share:.1f} % > {100 * hold_above:g} %")
    if errors > max_errors:
        reasons.append(f"{errors} image{'s' if errors != 1 else ''} in error > {max_errors}")
    return reasons


def lot_disposition(images: int, failed: int, errors: int, hold_above: float, max_errors: int = MAX_ERRORS) -> str:
    """"incomplete", "hold" or "release": the one definition for `defectscan lots` and the QA report.

    A lot is held when its failed share is above `hold_above` or more than `max_errors` of its
    images are in error. One with images in error and none judged is "incomplete" whatever
    `max_errors` allows: its failed share of zero judged images says nothing, and a release would
    ship parts nobody looked at.
    """
    if errors > 0 and images - errors <= 0:
        return "incomplete"
    return "hold" if hold_reasons(images, failed, errors, hold_above, max_errors) else "release"


@dataclass(frozen=True)
class WholeLot:
    """A lot as a whole for one model version, whatever the time or run a listing is cut to: the registered images of
    its sets that this version has results in or that no version has inspected yet (a lot shot by two cameras, each with
    its own model, is whole for each when its camera's sets are), within the filters on place, and the results on them."""

    registered: int
    images: int
    failed: int
    errors: int

    def disposition(self, hold_above: float, max_errors: int = MAX_ERRORS) -> tuple[str, list[str]]:
        """The lot's disposition, and the reason when images without a result make it incomplete: a release would
        ship parts nobody looked at (a machine failure leaves images pending, with no result at all)."""
        if self.images < self.registered:
            missing = [f"{self.registered - self.images} of {self.registered} images not inspected"]
            # Held whatever the images not inspected turn out to be (all of them passing): a hold, not "incomplete".
            certain = [reason.replace("failed ", "failed at least ", 1) for reason in
                       hold_reasons(self.registered, self.failed, self.errors, hold_above, max_errors)]
            return ("hold", certain + missing) if certain else ("incomplete", missing)
        disposition = lot_disposition(self.images, self.failed, self.errors, hold_above, max_errors)
        if disposition == "incomplete":
            return disposition, [f"no image judged: {self.errors} in error"]
        return disposition, hold_reasons(self.images, self.failed, self.errors, hold_above, max_errors)


def whole_lots(session: Session, filters: Filters, keys: list[tuple[str | None, int]]) -> dict[tuple[str | None, int], WholeLot]:
    """WholeLot per (lot, model id) of `keys` (a listing's rows), from the registrations and the per-day rollup: a
    few rows per image set and day, not every image."""
    lots = list(dict.fromkeys(lot for lot, _ in keys))
    model_ids = {model_id for _, model_id in keys}
    untouched: dict[str | None, int] = {}
    registered: dict[tuple[str | None, int], int] = {}
    by_key: dict[tuple[str | None, int], tuple[int, int, int]] = {}
    daily = InspectionDaily
    for start in range(0, len(lots), _LOTS_PER_QUERY):
        some = lots[start : start + _LOTS_PER_QUERY]
        named = [lot for lot in some if lot is not None]
        in_lots = ImageSet.lot.in_(named) | (ImageSet.lot.is_(None) if None in some else literal(False))
        scope = [in_lots, *set_scope(filters)]
        untouched.update(session.execute(select(ImageSet.lot, func.sum(ImageSet.n_images))
                                         .where(*scope, ~select(daily.image_set_id).where(daily.image_set_id == ImageSet.id).exists())
                                         .group_by(ImageSet.lot)).all())
        # This chunk's sets only: unrestricted, each chunk summed the rollup of every set of these models again.
        per_set = (select(daily.image_set_id, daily.model_id, func.sum(daily.images).label("images"), func.sum(daily.failed).label("failed"),
                          func.sum(daily.errors).label("errors"))
                   .where(daily.model_id.in_(model_ids), daily.image_set_id.in_(select(ImageSet.id).where(*scope)))
                   .group_by(daily.image_set_id, daily.model_id).subquery())
        rows = session.execute(
            select(ImageSet.lot, per_set.c.model_id, func.sum(ImageSet.n_images), func.sum(per_set.c.images), func.sum(per_set.c.failed),
                   func.sum(per_set.c.errors))
            .join(per_set, per_set.c.image_set_id == ImageSet.id).where(*scope).group_by(ImageSet.lot, per_set.c.model_id)
        ).all()
        for lot, model_id, n_registered, n, f, e in rows:
            registered[(lot, model_id)] = int(n_registered or 0)
            by_key[(lot, model_id)] = (int(n or 0), int(f or 0), int(e or 0))
    return {key: WholeLot(registered.get(key, 0) + int(untouched.get(key[0]) or 0), *by_key.get(key, (0, 0, 0))) for key in keys}


# Lots per look-up: a report over a year of lots stays far below the databases' bound-parameter limits.
_LOTS_PER_QUERY = 1000


def _with_whole_lots(session: Session, filters: Filters, rows: list[dict[str, Any]], rules: tuple[float, int]) -> None:
    """Each row's verdict (disposition) from its whole lot (WholeLot), in place; its counts stay those of the listing's scope."""
    whole = whole_lots(session, filters, [(row["lot"], row["model_id"]) for row in rows])
    for row in rows:
        row["verdict"] = whole[(row["lot"], row["model_id"])].disposition(*rules)[0]


def _uninspected_lots(session: Session, filters: Filters, listing: Select) -> list[dict[str, Any]]:
    """Lots with image sets within the filters (a set's capture time for since/until) that no model has a result on, and
    no row in the inspected `listing`: incomplete. (A lot of the listing has its whole-lot disposition there.)"""
    conditions = set_scope(filters)
    if filters.since is not None:
        conditions.append(ImageSet.acquired_at >= filters.since)
    if filters.until is not None:
        conditions.append(ImageSet.acquired_at < filters.until)
    untouched = ~select(InspectionDaily.image_set_id).where(InspectionDaily.image_set_id == ImageSet.id).exists()
    lots = (select(ImageSet.lot, func.min(ImageSet.acquired_at), func.max(ImageSet.acquired_at))
            .where(*conditions, ImageSet.lot.is_not(None), untouched)
            .group_by(ImageSet.lot).order_by(func.max(ImageSet.acquired_at).desc().nulls_last(), ImageSet.lot))
    found = session.execute(lots).all()
    if not found:
        return []
    listed = set(session.scalars(select(listing.subquery().c.lot).distinct()))
    return [dict(zip(LOT_COLUMNS, (lot, None, 0, 0, 0, 0, None, iso_utc(first), iso_utc(last), "incomplete"), strict=True))
            for lot, first, last in found if lot not in listed]


def _lot_row(row, rules: tuple[float, int]) -> dict[str, Any]:
    lot, model_id, name, version, images, failed, errors, defects, first, last = row
    # PostgreSQL's sum() of the union's counts is numeric: plain ints for JSON and the rate
    images, failed, errors, defects = (int(v or 0) for v in (images, failed, errors, defects))
    # No image judged (all in error): no rate, not 0.0, which a script filtering on defect_rate took for a perfect lot.
    rate = round(failed_share(images, failed, errors), 4) if images - errors > 0 else None
    record = dict(zip(LOT_COLUMNS, (
        lot, _model_label(name, version), images, failed, errors, defects, rate,
        iso_utc(first), iso_utc(last), lot_disposition(images, failed, errors, *rules),
    ), strict=True))
    record["model_id"] = model_id
    return record


# Filters the rollup `inspection_daily` can answer exactly; any other one needs the raw rows.
_ROLLUP_FILTERS = {*provenance.LABELS, "model", "since", "until"}


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.timezone.utc)


def rollup_window(filters: Filters) -> tuple[dt.date | None, dt.date | None, list[tuple[dt.datetime | None, dt.datetime | None]]] | None:
    """Whole UTC days [first_day, end_day) for the rollup and the partial-day edges for the raw rows.

    None when the filters need the raw rows anyway, or the window holds no whole day.
    """
    if not set(filters.given()) <= _ROLLUP_FILTERS:
        return None
    first_day = end_day = None
    edges = []
    if filters.since is not None:
        since = filters.since.astimezone(dt.timezone.utc)
        first_day = since.date() if since == _midnight(since.date()) else since.date() + dt.timedelta(days=1)
        if since < _midnight(first_day):
            edges.append((since, _midnight(first_day)))
    if filters.until is not None:
        until = filters.until.astimezone(dt.timezone.utc)
        end_day = until.date()
        if _midnight(end_day) < until:
            edges.append((_midnight(end_day), until))
    if first_day is not None and end_day is not None and first_day >= end_day:
        return None
    return first_day, end_day, edges


def _lots_raw(session: Session, filters: Filters) -> Select:
    return apply_filters(session, (
        select(ImageSet.lot, Inspection.model_id, *_lot_aggregates())
        .select_from(Inspection)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
        .group_by(ImageSet.lot, Inspection.model_id)
    ), filters, defects=False)


def _lots_rollup(session: Session, filters: Filters, first_day: dt.date | None, end_day: dt.date | None) -> Select:
    daily = InspectionDaily
    query = (
        select(ImageSet.lot, daily.model_id, func.sum(daily.images).label("images"), func.sum(daily.failed).label("failed"),
               func.sum(daily.errors).label("errors"), func.sum(daily.defects).label("defects"),
               func.min(daily.first_at).label("first_at"), func.max(daily.last_at).label("last_at"))
        .select_from(daily)
        .join(ImageSet, daily.image_set_id == ImageSet.id)
        .group_by(ImageSet.lot, daily.model_id)
    )
    conditions = rollup_conditions(session, filters, daily, first_day, end_day)
    return query.where(*conditions) if conditions else query


def rollup_conditions(session: Session, filters: Filters, daily, first_day: dt.date | None, end_day: dt.date | None) -> list:
    """The filters as conditions on a per-day rollup (inspection_daily, review_daily) joined to image_sets."""
    conditions = set_scope(filters)
    if filters.model is not None:
        conditions.append(daily.model_id.in_(matching_ids(session, filters.model)))
    if first_day is not None or end_day is not None:
        # a time filter leaves out images without a capture time, as `acquired_at >= since` does
        conditions.append(daily.day != NO_DAY)
    if first_day is not None:
        conditions.append(daily.day >= first_day)
    if end_day is not None:
        conditions.append(daily.day < end_day)
    return conditions


def _lots_query(session: Session, filters: Filters, *, rollup: bool = True) -> Select:
    """Per lot and model: lot, model id, name, version, images, failed, errors, defects, first_at, last_at.

    Whole days come from the rollup and the partial days at the window's edges from the raw rows,
    added together, so the result equals the raw query (`rollup=False`, and any filter the
    rollup does not hold) while reading a few rows per lot and day instead of every inspection.
    """
    window = rollup_window(filters) if rollup else None
    if window is None:
        parts = [_lots_raw(session, filters)]
    else:
        first_day, end_day, edges = window
        parts = [_lots_rollup(session, filters, first_day, end_day)]
        parts += [_lots_raw(session, Filters(**{**filters.given(), "since": a, "until": b})) for a, b in edges]
    part = union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    c = part.c
    return (
        select(c["lot"].label("lot"), Model.id, Model.name, Model.version, func.sum(c["images"]), func.sum(c["failed"]),
               func.sum(c["errors"]), func.sum(c["defects"]), func.min(c["first_at"]), func.max(c["last_at"]).label("last_at"))
        .join_from(part, Model, Model.id == c["model_id"])
        .group_by(c["lot"], Model.id, Model.name, Model.version)
    )


def list_lots(
    session: Session, filters: Filters = Filters(), *, hold_above: float | None = None, max_errors: int = MAX_ERRORS,
    limit: int = 50, offset: int = 0,
) -> Page:
    """One row per lot and model version: images, failed, errors, defects, failed share, verdict; newest lots first.

    Its verdict is `lot_disposition` under `hold_rules(hold_above, max_errors)`. Lots without a
    capture time come last on both backends.
    """
    rules = hold_rules(hold_above, max_errors)
    check_filters(session, filters)
    query = _lots_query(session, filters)
    query = query.order_by(query.selected_columns.last_at.desc().nulls_last(), query.selected_columns.lot, Model.id)
    page = _page(session, query, limit, offset, lambda row: _lot_row(row, rules))
    _with_whole_lots(session, filters, page.rows, rules)
    for row in page.rows:
        row.pop("model_id")
    if not page.more and set(filters.given()) <= {*provenance.LABELS, "since", "until"}:
        # After the inspected lots (a night that inspected nothing left a lot out of the listing), paged with them.
        inspected = offset + len(page.rows) if page.rows else session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
        tail = _uninspected_lots(session, filters, query)[max(0, offset - inspected):]
        room = limit - len(page.rows)
        page = Page([*page.rows, *tail[:room]], more=len(tail) > room, offset=offset)
    return page


def latest_lot(session: Session) -> str:
    """The lot of the most recently acquired image set that has inspection results."""
    inspected = (
        select(literal(1)).select_from(Image).join(Inspection, Inspection.image_id == Image.id)
        .where(Image.image_set_id == ImageSet.id).exists()
    )
    # Two plain orders rather than one NULLS LAST order: each reads ix_image_sets_acquired_at
    # (or the primary key) backwards and stops at the first inspected set.
    lot = session.scalar(
        select(ImageSet.lot).where(ImageSet.lot.is_not(None), ImageSet.acquired_at.is_not(None), inspected)
        .order_by(ImageSet.acquired_at.desc(), ImageSet.id.desc()).limit(1)
    ) or session.scalar(select(ImageSet.lot).where(ImageSet.lot.is_not(None), inspected).order_by(ImageSet.id.desc()).limit(1))
    if lot is None:
        raise DataError("no inspected lots yet: run `defectscan inspect` on a registered image set that has a lot")
    return lot


def lot_summary(
    session: Session, lot: str, filters: Filters = Filters(), *, hold_above: float | None = None, max_errors: int = MAX_ERRORS,
    top: int = 5,
) -> dict[str, Any]:
    """A lot per model version, with its most frequent defect classes; verdicts as in `list_lots`."""
    hold_above, max_errors = rules = hold_rules(hold_above, max_errors)
    filters = Filters(**{**filters.given(), "lot": lot})
    n_sets, n_images = session.execute(
        select(func.count(distinct(ImageSet.id)), func.count(Image.id))
        .select_from(ImageSet).outerjoin(Image, Image.image_set_id == ImageSet.id).where(ImageSet.lot == lot)
    ).one()
    if not n_sets:
        check_filters(session, filters)  # names the unknown lot, with suggestions
    if filters.model is not None:
        matching_ids(session, filters.model)
    summaries = [_lot_row(row, rules) for row in session.execute(_lots_query(session, filters).order_by(Model.id))]
    _with_whole_lots(session, filters, summaries, rules)
    labels = {s["model_id"]: s["model"] for s in summaries}
    classes = (
        select(Inspection.model_id, Defect.class_name, func.count(Defect.id), func.avg(Defect.area), func.max(Defect.max_score))
        .select_from(Defect)
        .join(Inspection, Defect.inspection_id == Inspection.id)
        .join(Image, Inspection.image_id == Image.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
        .group_by(Inspection.model_id, Defect.class_name)
    )
    by_model: dict[str, list[dict[str, Any]]] = {}
    found = session.execute(apply_filters(session, classes, filters, defects=True)).all()
    for model_id, cls, n, mean_area, peak in sorted(found, key=lambda r: (r[0], -r[2], r[1])):
        entries = by_model.setdefault(labels.get(model_id, str(model_id)), [])
        if len(entries) < top:
            entries.append(dict(zip(CLASS_COLUMNS, (cls, n, round(float(mean_area), 1), round(peak, 4)), strict=True)))
    for summary in summaries:
        summary.pop("model_id")
        summary["top_classes"] = by_model.get(summary["model"], [])
    return {"lot": lot, "image_sets": n_sets, "registered_images": n_images, "hold_above": hold_above, "max_errors": max_errors,
            "models": summaries}


# --- job runs --------------------------------------------------------------------------------------------------------------

JOB_RUN_COLUMNS = (
    "id", "job", "model", "status", "started_at", "finished_at", "n_images", "n_inspected", "n_skipped", "n_errors",
    "n_defects", "images_per_second", "error",
)


def list_job_runs(
    session: Session, *, job: str | None = None, status: str | None = None, since: dt.datetime | None = None,
    limit: int = 50, offset: int = 0,
) -> Page:
    """Job runs, newest first (for the jobs history view and `--job-run` lookups)."""
    query = select(JobRun, Model.name, Model.version).outerjoin(Model, JobRun.model_id == Model.id)
    if job is not None:
        query = query.where(JobRun.job == job)
    if status is not None:
        query = query.where(JobRun.status == status)
    if since is not None:
        query = query.where(JobRun.started_at >= since)

    def row(found) -> dict[str, Any]:
        run, name, version = found
        return dict(zip(JOB_RUN_COLUMNS, (
            run.id, run.job, _model_label(name, version) if name else None, run.status, iso_utc(run.started_at), iso_utc(run.finished_at),
            run.n_images, run.n_inspected, run.n_skipped, run.n_errors, run.n_defects,
            round(run.images_per_second, 2) if run.images_per_second is not None else None, run.error,
        ), strict=True))

    return _page(session, query.order_by(JobRun.started_at.desc(), JobRun.id.desc()), limit, offset, row)

"""The results database: one SQLAlchemy model per table. Alembic (migrations/) owns the DDL.

Tables follow the data path: models and image_sets/images are registered first, a job_run
inspects images with a model, each inspection holds per-image results and its defects.
Unique (image, model) on inspections is what makes a rerun of a job idempotent.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

VERDICTS = ("pass", "fail", "error")
RUN_STATUSES = ("running", "succeeded", "partial", "failed", "interrupted", "abandoned")
IMAGE_SET_KINDS = ("stack", "strip")
MODEL_STAGES = ("staging", "production", "archived")
# What a model version's workers compute in (model/precision.py); float32 is what every model is trained to.
PRECISIONS = ("float32", "bfloat16", "float16")
# QA's decisions: on one defect the model found, and on a whole image (the part passes or fails).
DEFECT_DECISIONS = ("confirmed", "false-call")
IMAGE_DECISIONS = ("pass", "fail")

# Row counts grow with images x defects: 64-bit keys on PostgreSQL, SQLite's rowid alias there.
BigId = BigInteger().with_variant(Integer, "sqlite")
# image_sets.attrs key: the set was registered with --no-chunk-check, its writer leaves out chunks equal to the fill
# value, and a chunk not stored is read as that value (else it is an image that is not there).
FILL_MISSING = "fill_missing_chunks"


def fills_missing_chunks(attrs: dict | None) -> bool:
    """Whether an image set's attrs say its missing chunks are the fill value (FILL_MISSING)."""
    return bool((attrs or {}).get(FILL_MISSING))


# The largest id a row can have (BIGINT, SQLite's INTEGER): a larger number names no row (the drivers raise OverflowError).
MAX_ROW_ID = 2**63 - 1


def as_row_id(text: str) -> int | None:
    """The row id `text` spells (digits, within MAX_ROW_ID), else None."""
    return int(text) if text.isascii() and text.isdigit() and int(text) <= MAX_ROW_ID else None
Json = JSON().with_variant(JSONB, "postgresql")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: defectscan stores timezone-aware UTC times")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=name)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    """A registered model version: its file, checksum, input spec, classes and metrics."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        _one_of("stage", MODEL_STAGES, "stage"),
        _one_of("precision", PRECISIONS, "precision"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    # e.g. {"channels": 1, "dtype": "uint8", "multiple_of": 16, "tile": [512, 512]}
    input_spec: Mapped[dict[str, Any]] = mapped_column(Json)
    # Class names in output-channel order.
    classes: Mapped[list[str]] = mapped_column(Json)
    threshold: Mapped[float] = mapped_column(Float)
    # The verdict rule chosen for this version (model/verdict.py: threshold, min_defect_area,
    # fail_score, per_class) and the held-out figures it was chosen on; `threshold` above repeats
    # its threshold for older readers.
    operating_point: Mapped[dict[str, Any] | None] = mapped_column(Json)
    training: Mapped[dict[str, Any] | None] = mapped_column(Json)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(Json)
    stage: Mapped[str] = mapped_column(String(16), default="staging")
    # The precision workers run this version in, and the parity check against float32 that admitted
    # it (model/precision.py: agreement, Dice in both, images, data, when); None for float32.
    precision: Mapped[str] = mapped_column(String(16), default="float32", server_default="float32")
    precision_check: Mapped[dict[str, Any] | None] = mapped_column(Json)
    description: Mapped[str | None] = mapped_column(Text)
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    inspections: Mapped[list[Inspection]] = relationship(back_populates="model")


class ImageSet(Base):
    """A Zarr image set: a stack (N, H, W) or one large strip (H, W), with its provenance."""

    __tablename__ = "image_sets"
    __table_args__ = (
        _one_of("kind", IMAGE_SET_KINDS, "kind"),
        Index(None, "lot"),
        Index(None, "line", "acquired_at"),
        Index(None, "product"),
        Index(None, "acquired_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024), unique=True)
    array_path: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    lot: Mapped[str | None] = mapped_column(String(128))
    line: Mapped[str | None] = mapped_column(String(128))
    product: Mapped[str | None] = mapped_column(String(128))
    camera: Mapped[str | None] = mapped_column(String(128))
    acquired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    shape: Mapped[list[int]] = mapped_column(Json)
    dtype: Mapped[str] = mapped_column(String(16))
    chunks: Mapped[list[int]] = mapped_column(Json)
    n_images: Mapped[int] = mapped_column(Integer)
    # Digest of shape, dtype, chunks and attributes at registration: a changed store is refused.
    checksum: Mapped[str] = mapped_column(String(64))
    attrs: Mapped[dict[str, Any] | None] = mapped_column(Json)
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="image_set", cascade="all, delete-orphan", order_by="Image.position")


class Image(Base):
    """One image of a set: position in the stack (0 for a strip), its key and capture time."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("image_set_id", "position"),
        Index(None, "key"),
        Index(None, "acquired_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_set_id: Mapped[int] = mapped_column(ForeignKey("image_sets.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    # Serial number or source file name.
    key: Mapped[str] = mapped_column(String(512))
    acquired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)

    image_set: Mapped[ImageSet] = relationship(back_populates="images")
    inspections: Mapped[list[Inspection]] = relationship(back_populates="image", cascade="all, delete-orphan")


class JobRun(Base):
    """One run of a scheduled job (or of `defectscan inspect`): status, counts, throughput."""

    __tablename__ = "job_runs"
    __table_args__ = (
        _one_of("status", RUN_STATUSES, "status"),
        Index(None, "job", "started_at"),
        Index(None, "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any] | None] = mapped_column(Json)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    n_inspected: Mapped[int] = mapped_column(Integer, default=0)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    n_errors: Mapped[int] = mapped_column(Integer, default=0)
    n_defects: Mapped[int] = mapped_column(BigInteger, default=0)
    images_per_second: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict[str, Any] | None] = mapped_column(Json)
    error: Mapped[str | None] = mapped_column(Text)

    model: Mapped[Model | None] = relationship()


class JobLock(Base):
    """Who is running a job right now: one row per running job, so two triggers cannot both run it.

    Taken by inserting the row (the primary key refuses a second holder), kept alive by
    `heartbeat_at`, released by deleting it; a row whose heartbeat is stale belongs to a crashed
    runner and may be taken over.
    """

    __tablename__ = "job_locks"

    job: Mapped[str] = mapped_column(String(128), primary_key=True)
    job_run_id: Mapped[int | None] = mapped_column(ForeignKey("job_runs.id", ondelete="SET NULL"))
    owner: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Inspection(Base):
    """The result of one model on one image: verdict, defect pixels, where the mask is stored."""

    __tablename__ = "inspections"
    __table_args__ = (
        UniqueConstraint("image_id", "model_id"),
        _one_of("verdict", VERDICTS, "verdict"),
        Index(None, "model_id", "verdict"),
        Index(None, "job_run_id"),
        Index(None, "inspected_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    job_run_id: Mapped[int | None] = mapped_column(ForeignKey("job_runs.id", ondelete="SET NULL"))
    verdict: Mapped[str] = mapped_column(String(8))
    n_defects: Mapped[int] = mapped_column(Integer, default=0)
    defect_pixels: Mapped[int] = mapped_column(BigInteger, default=0)
    max_score: Mapped[float] = mapped_column(Float, default=0.0)
    # The probability map: Zarr store URI and array path; the image's position indexes it.
    mask_uri: Mapped[str | None] = mapped_column(String(1024))
    mask_array: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    inspected_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[Image] = relationship(back_populates="inspections")
    model: Mapped[Model] = relationship(back_populates="inspections")
    job_run: Mapped[JobRun | None] = relationship()
    defects: Mapped[list[Defect]] = relationship(back_populates="inspection", cascade="all, delete-orphan")


class Defect(Base):
    """One connected defect region: class, geometry, scores and its run-length encoded mask."""

    __tablename__ = "defects"
    __table_args__ = (
        Index(None, "inspection_id"),
        Index(None, "class_name", "area"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"))
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(64))
    # Bounding box in image pixels, half-open: rows y0..y1-1, columns x0..x1-1.
    bbox_y0: Mapped[int] = mapped_column(Integer)
    bbox_x0: Mapped[int] = mapped_column(Integer)
    bbox_y1: Mapped[int] = mapped_column(Integer)
    bbox_x1: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(Integer)
    centroid_y: Mapped[float] = mapped_column(Float)
    centroid_x: Mapped[float] = mapped_column(Float)
    orientation: Mapped[float] = mapped_column(Float)
    eccentricity: Mapped[float] = mapped_column(Float)
    mean_score: Mapped[float] = mapped_column(Float)
    max_score: Mapped[float] = mapped_column(Float)
    # Mask inside the bounding box, run-length encoded (format in model/rle.py).
    rle: Mapped[str] = mapped_column(Text)

    inspection: Mapped[Inspection] = relationship(back_populates="defects")


class ModelStageChange(Base):
    """One change of a model version's stage (promote, archive), with who, when and why: the version's history.
    The first row of a version is its registration stage."""

    __tablename__ = "model_stage_changes"
    __table_args__ = (
        _one_of("to_stage", MODEL_STAGES, "to_stage"),
        Index(None, "model_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    from_stage: Mapped[str | None] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    changed_by: Mapped[str] = mapped_column(String(128))
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    model: Mapped[Model] = relationship()


class ModelComparison(Base):
    """A shadow comparison: a candidate version inspected the same images as another version; the figures."""

    __tablename__ = "model_comparisons"
    __table_args__ = (Index(None, "candidate_id", "current_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    current_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    # The image sets compared (ids) and their lots, and the figures (db/comparisons.py).
    scope: Mapped[dict[str, Any]] = mapped_column(Json)
    figures: Mapped[dict[str, Any]] = mapped_column(Json)
    compared_by: Mapped[str] = mapped_column(String(128))
    compared_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class DefectReview(Base):
    """QA's decision on one defect the model found. Rows are only added: the newest row of a defect is
    its decision, the older ones its history; the model's recorded results are never changed."""

    __tablename__ = "defect_reviews"
    __table_args__ = (
        _one_of("decision", DEFECT_DECISIONS, "decision"),
        Index(None, "defect_id", "id"),
        Index(None, "image_id"),
        Index(None, "reviewed_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # SET NULL: a re-inspection (--force) replaces the defects; the decisions stay on record with their image, and each
    # goes to the matching new defect as a row of its own (pipeline/carried_reviews.py).
    defect_id: Mapped[int | None] = mapped_column(ForeignKey("defects.id", ondelete="SET NULL"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    decision: Mapped[str] = mapped_column(String(16))
    reviewer: Mapped[str] = mapped_column(String(128))
    reviewed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)


class ImageReview(Base):
    """QA's decision on a whole image (pass or fail), with an optional drawn mask and class for a defect
    the model missed. Only added, like DefectReview: the newest row of an image is its decision."""

    __tablename__ = "image_reviews"
    __table_args__ = (
        _one_of("decision", IMAGE_DECISIONS, "decision"),
        Index(None, "image_id", "id"),
        Index(None, "reviewed_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    # The inspection QA looked at (its verdict is what the decision agrees or disagrees with).
    inspection_id: Mapped[int | None] = mapped_column(ForeignKey("inspections.id", ondelete="SET NULL"))
    decision: Mapped[str] = mapped_column(String(8))
    class_name: Mapped[str | None] = mapped_column(String(64))
    # A drawn mask: its bounding box (half-open, image pixels) and the mask inside it (model/rle.py).
    bbox_y0: Mapped[int | None] = mapped_column(Integer)
    bbox_x0: Mapped[int | None] = mapped_column(Integer)
    bbox_y1: Mapped[int | None] = mapped_column(Integer)
    bbox_x1: Mapped[int | None] = mapped_column(Integer)
    rle: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(128))
    reviewed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)


# `inspection_daily.day` of images without a capture time: a real date that no capture has, so
# the key stays NULL-free; time-filtered queries leave this day out, as `acquired_at >= ...`
# leaves out NULL capture times.
NO_DAY = dt.date(1, 1, 1)


def capture_day(acquired_at: dt.datetime | None) -> dt.date:
    """The rollups' day of an image: the UTC date of its capture time, NO_DAY without one."""
    return acquired_at.astimezone(dt.timezone.utc).date() if acquired_at is not None else NO_DAY


class _PerDay:
    """The key of a per-day rollup: image set, model version, UTC capture day."""

    @declared_attr.directive
    def __table_args__(cls) -> tuple:
        return (Index(None, "day"),)

    image_set_id: Mapped[int] = mapped_column(ForeignKey("image_sets.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    # UTC date of images.acquired_at, NO_DAY when it is NULL (capture_day).
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)


class InspectionDaily(_PerDay, Base):
    """Inspection counts per image set, model and UTC capture day, kept by the pipeline as it records.

    The lots listing sums these few rows instead of joining every inspection to its image (the
    join is what made `lots list --since` slow at millions of images). pipeline/record.py keeps it
    equal to a recount of `inspections`, in the same transaction that writes them.
    """

    __tablename__ = "inspection_daily"

    images: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    defects: Mapped[int] = mapped_column(BigInteger)
    # Earliest and latest images.acquired_at of the bucket (for the listing's first_at/last_at).
    first_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class ReviewDaily(_PerDay, Base):
    """QA's figures per image set, model and UTC capture day (db/reviews.py), kept as decisions are recorded.

    The lots listing sums these rows for whole days instead of deciding every reviewed image of its
    lots again (at 10 % of a million images reviewed that was a second per page). db/reviews.py
    recomputes the rows of the image sets a decision or a re-inspection touches, in the same
    transaction, so they always equal a recount of the decisions.
    """

    __tablename__ = "review_daily"

    failed_reviewed: Mapped[int] = mapped_column(Integer)
    false_calls: Mapped[int] = mapped_column(Integer)
    passed_reviewed: Mapped[int] = mapped_column(Integer)
    escapes: Mapped[int] = mapped_column(Integer)
    defects_reviewed: Mapped[int] = mapped_column(Integer)
    defects_confirmed: Mapped[int] = mapped_column(Integer)


__all__ = [
    "Base",
    "Defect",
    "Image",
    "ImageSet",
    "Inspection",
    "InspectionDaily",
    "ReviewDaily",
    "JobLock",
    "JobRun",
    "Model",
    "IMAGE_SET_KINDS",
    "MODEL_STAGES",
    "NO_DAY",
    "RUN_STATUSES",
    "VERDICTS",
    "utcnow",
]

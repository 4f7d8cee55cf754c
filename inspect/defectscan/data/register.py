"""Record image sets in the database: adopt a store without copying it, look sets up, re-check them.

`register_store` validates a Zarr store (v2 or v3, local path or fsspec URL) against the layout
in data/imageset.py and writes one `image_sets` row and one `images` row per image. The row keeps
a checksum of the store's shape, dtype, chunks and attributes: registering the same unchanged
store again returns the existing row, a changed one is refused, and `validate_image_set` finds
both a changed store and chunks that have gone missing since.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from defectscan import provenance
from defectscan.data import imageset as layout
from defectscan.data.chunk_reads import UnreadableChunks, unreadable_chunks
from defectscan.data.problems import ProblemLog
from defectscan.db.schema import FILL_MISSING, Image, ImageSet, as_row_id, utcnow
from defectscan.errors import DataError

# Rows per INSERT batch: a 100,000-image set goes in without one giant statement.
_BATCH = 5000


@dataclass
class Registration:
    image_set: ImageSet
    # False when the store was already registered, unchanged: nothing was written.
    created: bool
    problems: ProblemLog = field(default_factory=ProblemLog)
    # Images of an already registered set whose chunks were not stored then and are now: rows added by this call.
    arrived: int = 0


# attrs key: the capture time was given at registration (--acquired-at), over the store's own.
TIME_GIVEN = "acquired_at_given"
# attrs key: positions left out at registration because their chunks were not stored. An acquisition store can be
# found while its camera still writes; they get rows once their chunks are there (see `_register_arrived`).
MISSING_IMAGES = "missing_images"


def register_store(
    session: Session,
    location: str,
    array_path: str = layout.IMAGES,
    *,
    lot: str | None = None,
    line: str | None = None,
    product: str | None = None,
    camera: str | None = None,
    acquired_at: dt.datetime | None = None,
    bit_depth: int | None = None,
    check_chunks: bool = True,
    strict: bool = False,
) -> Registration:
    """Register the image array `array_path` of the store at `location`; idempotent for an unchanged store.

    Options given here override the store's own provenance attributes in the database row (the
    store itself is never written). Images whose chunks are not stored are reported in
    `problems` and get no row; a strip with missing tiles is refused. Registering the store again
    gives rows to those whose chunks have been written since, and reports the others again.
    """
    uri = layout.resolve_uri(location)
    group = layout.open_group(uri)
    array_path = layout.root_array_path(group, array_path)
    info = layout.describe(group, uri, array_path)
    check_bit_depth(uri, info.dtype, bit_depth)
    problems = ProblemLog(strict=strict)
    labels = {"lot": lot, "line": line, "product": product, "camera": camera}

    existing = session.scalar(select(ImageSet).where(ImageSet.uri == uri))
    if existing is not None:
        _check_same_registration(existing, info, labels, acquired_at, bit_depth)
        arrived = _register_arrived(session, existing, group, info, acquired_at) if check_chunks else 0
        return Registration(existing, created=False, problems=_problems_left_out(existing, info, problems), arrived=arrived)

    missing = layout.missing_chunks(group[array_path]) if check_chunks else layout.MissingChunks([], [])
    if missing and info.kind == "strip":
        raise DataError(f"{uri}: the strip '{array_path}' is incomplete: {missing.describe()}")
    origin = {**info.provenance(), **{name: value for name, value in labels.items() if value is not None}}
    try:
        set_time = acquired_at or layout.parse_time(origin.get(provenance.TIME))
    except DataError as exc:
        raise DataError(f"{uri}: group attribute {exc}; pass --acquired-at to give the time") from None
    rows = _image_rows(group, info, missing, problems, set_time=set_time, override_time=acquired_at is not None)
    skipped = list(info.meta.get("skipped", [])) + [{"path": p.path, "reason": p.reason} for p in problems]
    image_set = ImageSet(
        uri=uri,
        array_path=array_path,
        kind=info.kind,
        **{name: _text(origin.get(name)) for name in provenance.LABELS},
        acquired_at=set_time or min((row["acquired_at"] for row in rows if row["acquired_at"] is not None), default=None),
        shape=list(info.shape),
        dtype=info.dtype,
        chunks=list(info.chunks),
        n_images=len(rows),
        checksum=info.checksum,
        attrs={**_recorded_attrs(info, skipped), **({"bit_depth": bit_depth} if bit_depth is not None else {}),
               **({FILL_MISSING: True} if not check_chunks else {}),
               **({MISSING_IMAGES: sorted(set(missing.images))} if missing.images else {}),
               **({TIME_GIVEN: True} if acquired_at is not None else {})},
    )
    try:
        _insert(session, image_set, rows)
    except IntegrityError:
        # Another process registered the same store between our look-up and insert.
        session.rollback()
        existing = session.scalar(select(ImageSet).where(ImageSet.uri == uri))
        if existing is None:
            raise
        _check_unchanged(existing, info)
        return Registration(existing, created=False, problems=problems)
    return Registration(image_set, created=True, problems=problems)


def _check_same_registration(
    existing: ImageSet, info: layout.ImageSetInfo, labels: dict[str, str | None], acquired_at: dt.datetime | None, bit_depth: int | None,
) -> None:
    """Registering a store again is a no-op only for the same store with the same options."""
    _check_unchanged(existing, info)
    conflicts = [f"{name} {getattr(existing, name)!r} (given {value!r})" for name, value in labels.items() if value is not None and value != getattr(existing, name)]
    if bit_depth is not None and (existing.attrs or {}).get("bit_depth") != bit_depth:
        conflicts.append(f"bit depth {(existing.attrs or {}).get('bit_depth')!r} (given {bit_depth!r})")
    if acquired_at is not None and existing.acquired_at != acquired_at:
        conflicts.append(f"acquired_at {existing.acquired_at.isoformat() if existing.acquired_at else None!r} (given {acquired_at.isoformat()!r})")
    if conflicts:
        raise DataError(f"{info.uri}: already registered as image set {existing.id} with {', '.join(conflicts)}")


def _problems_left_out(existing: ImageSet, info: layout.ImageSetInfo, problems: ProblemLog) -> ProblemLog:
    """Images left out when the set was registered are still left out; files an ingest skipped are
    the ingest's report, not this registration's."""
    from_ingest = info.meta.get("skipped", [])
    for problem in (existing.attrs or {}).get("skipped", []):
        if problem not in from_ingest:
            problems.add(problem["path"], problem["reason"])
    return problems


def _image_rows(group, info: layout.ImageSetInfo, missing: layout.MissingChunks, problems: ProblemLog, *,
                set_time: dt.datetime | None, override_time: bool) -> list[dict[str, Any]]:
    """One `images` row per image whose chunks are stored (the others go to `problems`)."""
    n = info.n_images
    keys = _read_keys(group, info)
    for position in missing.images:
        problems.add(_missing_path(info, position, keys[position]), MISSING_REASON)
    if len(set(missing.images)) == n:
        raise DataError(f"{info.uri}: every image of '{info.array_path}' has missing chunks: {missing.describe()}")
    skipped = set(missing.images)
    return _rows_at(group, info, keys, [i for i in range(n) if i not in skipped], set_time=set_time, override_time=override_time)


MISSING_REASON = "chunk not stored (would read as blank pixels)"


def _missing_path(info: layout.ImageSetInfo, position: int, key: str) -> str:
    return f"{info.uri} [{info.array_path} image {position}, key {key}]"


def _read_keys(group, info: layout.ImageSetInfo) -> list[str]:
    try:
        return layout.read_keys(group, info.n_images)
    except DataError as exc:
        raise DataError(f"{info.uri}: {exc}") from None


def _rows_at(group, info: layout.ImageSetInfo, keys: list[str], positions: list[int], *, set_time: dt.datetime | None,
             override_time: bool) -> list[dict[str, Any]]:
    """The `images` rows of these positions: key, capture time (the store's, else `set_time`) and size."""
    n = info.n_images
    try:
        times = [set_time] * n if override_time else layout.read_times(group, n, default=set_time)
        sizes = layout.read_sizes(group, info.shape)
    except DataError as exc:
        raise DataError(f"{info.uri}: {exc}") from None
    return [{"position": i, "key": keys[i], "acquired_at": times[i], "height": sizes[i][0], "width": sizes[i][1]} for i in positions]


_MISSING_AT = re.compile(r" \[.* image (\d+), key .*\]$")


def waiting_images(attrs: dict | None) -> list[int]:
    """Positions of a registered set left out because their chunks were not stored; for a set registered before
    MISSING_IMAGES was recorded, read back from its `skipped` list."""
    attrs = attrs or {}
    if MISSING_IMAGES in attrs:
        return list(attrs[MISSING_IMAGES])
    found = (_MISSING_AT.search(p.get("path", "")) for p in attrs.get("skipped", []) if p.get("reason") == MISSING_REASON)
    return sorted({int(match[1]) for match in found if match})


def _locked_attrs(session: Session, image_set: ImageSet) -> dict:
    """The set's attrs read afresh under a write lock on its row (a no-op update: SQLite's write lock, PostgreSQL's row
    lock) that lasts until commit: two read-change-write of the attrs (a job finding images, give-up-missing) would
    otherwise each write back what they read, undoing the other."""
    session.execute(update(ImageSet).where(ImageSet.id == image_set.id).values(n_images=ImageSet.n_images))
    return dict(session.scalar(select(ImageSet.attrs).where(ImageSet.id == image_set.id)) or {})


def give_up_missing(session: Session, ident: str | int, reason: str, by: str | None = None) -> list[int]:
    """Stop waiting for the images of a set whose chunks were never written (a frame the camera dropped): jobs then
    stop reporting them, and the run is no longer partial for them. Returns their positions; the skipped list keeps
    them, with who gave up, when and why."""
    from defectscan.users import user_name

    if not reason or not reason.strip():
        raise DataError("give --reason: why these images will not come (kept with the image set)")
    image_set = get_image_set(session, ident)
    attrs = _locked_attrs(session, image_set)
    waiting = waiting_images(attrs)
    if not waiting:
        session.rollback()
        raise DataError(f"image set {image_set.id} ({image_set.uri}) waits for no image: nothing to give up")
    attrs[MISSING_IMAGES] = []
    attrs["missing_given_up"] = [*attrs.get("missing_given_up", []),
                                 {"positions": waiting, "by": user_name(by), "at": utcnow().isoformat(), "reason": reason.strip()}]
    session.execute(update(ImageSet).where(ImageSet.id == image_set.id).values(attrs=attrs))
    session.commit()
    return waiting


def look_for_arrived(session: Session, image_sets: list[ImageSet]) -> list[str]:
    """Before `inspect` plans a run, as a job does: rows for each set's waiting images whose chunks are written now,
    and one line per set for those still waiting (the run is then partial: they are not inspected, and an exit 0
    would tell a cron that every frame was judged). A set whose store cannot be read is left to the run to refuse."""
    lines = []
    for image_set in image_sets:
        if not waiting_images(image_set.attrs):
            continue
        try:
            register_store(session, image_set.uri, image_set.array_path)
        except DataError:
            session.rollback()
        session.refresh(image_set)
        still = waiting_images(image_set.attrs)
        if still:
            shown = ", ".join(map(str, still[:5])) + (", ..." if len(still) > 5 else "")
            lines.append(f"image set {image_set.id} ({image_set.uri}): {len(still)} image(s) not written yet (positions {shown}) "
                         f"are not inspected; rerun once they are, or `defectscan imagesets give-up-missing {image_set.id} --reason TEXT`")
    return lines


def _register_arrived(session: Session, image_set: ImageSet, group, info: layout.ImageSetInfo, acquired_at: dt.datetime | None) -> int:
    """Rows for the images left out at registration whose chunks are stored now; returns how many. The ones
    still missing stay in the set's `skipped` list, and so are reported again by every registration."""
    if not waiting_images(image_set.attrs):
        return 0
    attrs = _locked_attrs(session, image_set)  # as it is now: a give-up-missing or another run may have changed it
    waiting = set(waiting_images(attrs))
    if not waiting:
        session.rollback()
        return 0
    array = group[info.array_path]
    # Only the waiting images' chunks are asked for: a whole listing each night of a large store is not needed.
    inner = int(array.chunks[0])
    still = layout.missing_chunks(array, {(p // inner, *([0] * (array.ndim - 1))) for p in waiting}).images
    arrived = sorted(waiting - set(still))
    if not arrived:
        session.rollback()
        return 0
    keys = _read_keys(group, info)
    # A time given at registration (--acquired-at) holds for the images added since too.
    given = acquired_at or (image_set.acquired_at if (image_set.attrs or {}).get(TIME_GIVEN) else None)
    rows = _rows_at(group, info, keys, arrived, set_time=given or image_set.acquired_at, override_time=given is not None)
    resolved = {_missing_path(info, i, keys[i]) for i in arrived}
    attrs["skipped"] = [p for p in attrs.get("skipped", []) if not (p.get("path") in resolved and p.get("reason") == MISSING_REASON)]
    attrs[MISSING_IMAGES] = sorted(waiting - set(arrived))
    try:
        session.execute(insert(Image), [{**row, "image_set_id": image_set.id} for row in rows])
        session.execute(update(ImageSet).where(ImageSet.id == image_set.id).values(n_images=ImageSet.n_images + len(rows), attrs=attrs))
        session.commit()
    except IntegrityError:
        session.rollback()  # another registration added them first
        return 0
    session.refresh(image_set)
    return len(rows)


def _insert(session: Session, image_set: ImageSet, rows: list[dict[str, Any]]) -> None:
    session.add(image_set)
    session.flush()
    for start in range(0, len(rows), _BATCH):
        batch = [{**row, "image_set_id": image_set.id} for row in rows[start : start + _BATCH]]
        session.execute(insert(Image), batch)
    session.commit()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def check_bit_depth(uri: str, dtype: str, bit_depth: int | None) -> None:
    """A bit depth only means something for uint16 data of 9 to 16 significant bits."""
    if bit_depth is None:
        return
    if dtype != "uint16" or not 9 <= bit_depth <= 16:
        raise DataError(f"{uri}: bit depth {bit_depth} does not fit {dtype} images; give 9..16 for uint16 data (e.g. 12 for a 12-bit camera), none for uint8")


def _recorded_attrs(info: layout.ImageSetInfo, skipped: list[dict[str, str]]) -> dict[str, Any]:
    """What the row keeps besides its columns: enough to say later what changed in the store."""
    return {
        "group": info.group_attrs,
        "array": info.array_attrs,
        "zarr_format": info.zarr_format,
        "shards": list(info.shards) if info.shards else None,
        "labels": info.has_labels,
        "classes": info.classes,
        "skipped": skipped,
    }


def recorded_layout(image_set: ImageSet) -> dict[str, Any]:
    attrs = image_set.attrs or {}
    return {
        "array_path": image_set.array_path,
        "zarr_format": attrs.get("zarr_format"),
        "shape": list(image_set.shape),
        "dtype": image_set.dtype,
        "chunks": list(image_set.chunks),
        "shards": attrs.get("shards"),
        "group_attrs": attrs.get("group", {}),
        "array_attrs": attrs.get("array", {}),
    }


def _check_unchanged(existing: ImageSet, info: layout.ImageSetInfo) -> None:
    if existing.array_path != info.array_path:
        raise DataError(
            f"{info.uri}: already registered as image set {existing.id} with array '{existing.array_path}', not '{info.array_path}'"
        )
    changes = store_changes(existing, info)
    if changes:
        raise DataError(f"{info.uri}: {changes}")


def store_changes(image_set: ImageSet, info: layout.ImageSetInfo) -> str | None:
    """None if the store matches its registration, else one message saying what changed."""
    if info.checksum == image_set.checksum:
        return None
    changes = layout.layout_changes(recorded_layout(image_set), info.layout()) or ["checksum differs"]
    return (
        f"changed since it was registered as image set {image_set.id} "
        f"({image_set.registered_at:%Y-%m-%d %H:%M} UTC): {'; '.join(changes)}; refusing it. "
        "Write changed data to a new store and register that"
    )


# ---- the read side ---------------------------------------------------------------------------------


def find_image_set(session: Session, ident: str | int) -> ImageSet | None:
    """By id (digits) or by store URI/path."""
    text = str(ident)
    if text.isascii() and text.isdigit():
        return session.get(ImageSet, as_row_id(text) or 0)
    return session.scalar(select(ImageSet).where(ImageSet.uri == layout.resolve_uri(text)))


def get_image_set(session: Session, ident: str | int) -> ImageSet:
    image_set = find_image_set(session, ident)
    if image_set is None:
        raise DataError(f"no image set {ident!r} is registered (see `defectscan imagesets list`)")
    return image_set


def list_image_sets(
    session: Session,
    *,
    lot: str | None = None,
    line: str | None = None,
    product: str | None = None,
    limit: int | None = None,
) -> list[ImageSet]:
    query = select(ImageSet).order_by(ImageSet.acquired_at.desc(), ImageSet.id.desc())
    for column, value in ((ImageSet.lot, lot), (ImageSet.line, line), (ImageSet.product, product)):
        if value is not None:
            query = query.where(column == value)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_images(session: Session, image_set: ImageSet) -> int:
    return session.scalar(select(func.count()).select_from(Image).where(Image.image_set_id == image_set.id)) or 0


@dataclass
class Validation:
    uri: str
    image_set: ImageSet | None
    info: layout.ImageSetInfo
    # Why the store no longer matches its registration (None: it matches, or it is not registered).
    changed: str | None
    missing: layout.MissingChunks
    # Stored chunks that do not decode; None when they were not read (the quick check).
    unreadable: UnreadableChunks | None = None

    @property
    def ok(self) -> bool:
        return self.changed is None and not self.missing and not self.unreadable


def validate_image_set(session: Session, ident: str | int, array_path: str | None = None, *, deep: bool = False) -> Validation:
    """Re-check a registered set (by id or URI), or any store by path: layout, checksum, every chunk present.

    `deep` also reads and decodes every chunk. A store that cannot be opened or fails the layout
    raises DataError; a changed checksum, missing and unreadable chunks are reported in the result, all of them.
    """
    image_set = find_image_set(session, ident)
    if image_set is None and str(ident).isascii() and str(ident).isdigit():
        raise DataError(f"no image set {ident!r} is registered (see `defectscan imagesets list`)")
    uri = image_set.uri if image_set is not None else layout.resolve_uri(str(ident))
    if image_set is not None and array_path not in (None, image_set.array_path):
        raise DataError(f"{uri}: registered as image set {image_set.id} with array '{image_set.array_path}', not '{array_path}'")
    array_path = image_set.array_path if image_set is not None else array_path or layout.IMAGES
    group = layout.open_group(uri)
    array_path = layout.root_array_path(group, array_path)
    info = layout.describe(group, uri, array_path)
    changed = store_changes(image_set, info) if image_set is not None else None
    missing = layout.missing_chunks(group[array_path])
    unreadable = unreadable_chunks(group[array_path]) if deep else None
    return Validation(uri, image_set, info, changed, missing, unreadable)

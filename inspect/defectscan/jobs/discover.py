"""Find a job's image sets: register the stores its glob matches, pick those with work left.

A store that is still being written (marked incomplete by its writer) is left for a later run;
a store that cannot be registered is reported and the others go on; probability-map stores
written by the pipeline itself (*.masks.zarr) are never taken for inputs.
"""

from __future__ import annotations

import glob as globbing
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from defectscan.data import imageset as layout
from defectscan.data.register import register_store, waiting_images
from defectscan.db.schema import Image, ImageSet, Inspection, Model
from defectscan import interrupts
from defectscan.errors import DataError
from defectscan.jobs.spec import JobSpec, resolve_glob, since_time
from defectscan.pipeline.outputs import SUFFIX as MASKS_SUFFIX

log = logging.getLogger(__name__)


@dataclass
class Discovery:
    # Stores the glob matches, as image_sets.uri.
    matched: list[str] = field(default_factory=list)
    # Registered by this run.
    new: list[str] = field(default_factory=list)
    # Left for a later run: their writer has not finished them.
    incomplete: list[str] = field(default_factory=list)
    # "uri: reason" for stores that could not be registered, and images still left out of registered ones.
    problems: list[str] = field(default_factory=list)
    # Images of stores registered before whose chunks were written since: rows added by this run.
    arrived: int = 0

    def as_record(self) -> dict:
        return {"matched": len(self.matched), "new": self.new, "incomplete": self.incomplete, "problems": self.problems,
                "arrived": self.arrived}


def match_stores(spec: JobSpec, spec_file: Path) -> list[str]:
    """URIs of the Zarr stores the source glob matches now (sorted; mask stores left out)."""
    if spec.source.glob is None:
        return []
    pattern = resolve_glob(spec_file, spec.source.glob)
    if "://" in pattern:
        import fsspec

        fs, _, _ = fsspec.core.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0]
        found = [f"{protocol}://{p}" for p in fs.glob(pattern.split("://", 1)[1])]
    else:
        # `**` spans folders, as fsspec's glob does for a URL.
        found = [p for p in globbing.glob(pattern, recursive=True) if Path(p).is_dir()]
    uris = {layout.resolve_uri(p) for p in found}
    return sorted(u for u in uris if not u.rstrip("/").endswith(MASKS_SUFFIX))


def missing_glob_folder(spec: JobSpec, spec_file: Path) -> None:
    """Refuse a local glob whose fixed folder (the part before any wildcard) does not exist: an unmounted share
    or a misspelt path would otherwise pass every night as "nothing to inspect"."""
    pattern = resolve_glob(spec_file, spec.source.glob)
    if "://" in pattern:
        return
    fixed = Path(pattern).parts
    folder = Path(*fixed[: next((i for i, part in enumerate(fixed) if any(c in part for c in "*?[")), len(fixed))])
    if not folder.is_dir():
        raise DataError(f"source glob {pattern}: its folder {folder} does not exist (an unmounted share, a misspelt path?)")


def _is_incomplete(uri: str) -> bool:
    try:
        group = layout.open_group(uri)
        meta = dict(group.attrs).get(layout.META_ATTR)
    except Exception:
        return False  # registration then says what is wrong with it
    return isinstance(meta, dict) and meta.get("complete") is False


def discover(session: Session, spec: JobSpec, spec_file: Path) -> Discovery:
    """Register every matched store not registered yet. A registered one is left as it is, unless images were
    left out of it because their chunks were not stored yet (a camera still writing): those are looked for again."""
    found = Discovery(matched=match_stores(spec, spec_file))
    if not found.matched:
        return found
    known = {uri: bool(waiting_images(attrs)) for uri, attrs in session.execute(select(ImageSet.uri, ImageSet.attrs).where(ImageSet.uri.in_(found.matched)))}
    for uri in found.matched:
        interrupts.check()  # between stores: each registration is whole or absent
        if uri in known and not known[uri]:
            continue
        if uri not in known and _is_incomplete(uri):
            found.incomplete.append(uri)
            continue
        try:
            registration = register_store(session, uri, spec.source.array)
        except DataError as exc:
            session.rollback()
            found.problems.append(str(exc))
            log.warning("job '%s': %s", spec.name, exc)
            continue
        except Exception as exc:
            # Whatever one store does (a codec missing, a reader's bug), the job's other stores still run.
            session.rollback()
            found.problems.append(f"{uri}: cannot be registered: {type(exc).__name__}: {exc}")
            log.exception("job '%s': %s cannot be registered", spec.name, uri)
            continue
        for problem in registration.problems:
            found.problems.append(f"{problem.path}: {problem.reason}")
        if registration.created:
            found.new.append(uri)
        found.arrived += registration.arrived
    return found


def image_sets_with_work(session: Session, spec: JobSpec, model: Model, matched: list[str]) -> list[ImageSet]:
    """The job's registered image sets that have images this model has not inspected, oldest first."""
    query = _in_scope(select(ImageSet).where(_has_work(model)), spec, matched)
    return [] if query is None else list(session.scalars(query.order_by(ImageSet.acquired_at, ImageSet.id)))


def images_done(session: Session, spec: JobSpec, model: Model, matched: list[str]) -> int:
    """The images of the job's image sets that have no work left: what a run counts as already done besides
    the done images of the sets it inspects (a night with nothing new said "0 already done")."""
    query = _in_scope(select(func.coalesce(func.sum(ImageSet.n_images), 0)).where(~_has_work(model)), spec, matched)
    return 0 if query is None else int(session.scalar(query))


def _has_work(model: Model):
    return exists().where(
        Image.image_set_id == ImageSet.id,
        ~exists().where(and_(Inspection.image_id == Image.id, Inspection.model_id == model.id)),
    )


def _in_scope(query, spec: JobSpec, matched: list[str]):
    """`query` narrowed to the job's image sets (None when its glob matched no store)."""
    source = spec.source
    if source.glob is not None:
        if not matched:
            return None
        query = query.where(ImageSet.uri.in_(matched))
    for column, value in ((ImageSet.lot, source.lot), (ImageSet.line, source.line), (ImageSet.product, source.product)):
        if value is not None:
            query = query.where(column == value)
    if source.since is not None:
        # A set without a capture time counts from its registration: left out, it was never inspected nor reported.
        query = query.where(func.coalesce(ImageSet.acquired_at, ImageSet.registered_at) >= since_time(source.since))
    return query

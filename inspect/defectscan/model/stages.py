"""A model version's life: staging -> production -> archived, each change recorded with who, when and why.

One version of a name is in production at a time: promoting a version archives the one that was.
Jobs and `inspect` reach it as NAME:production (db/model_refs.py), so a newly registered version
(staging) runs nowhere until someone promotes it. Promoting over a version in production asks for
a recorded shadow comparison of the two (`models compare`, pipeline/shadow.py), or
`without_comparison`, so that no untested version goes live by accident. While none is in
production, the comparison is against the version that was last: archiving the production version
first is no way round the evidence.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from defectscan.db import model_refs
from defectscan.db.comparisons import last_comparison
from defectscan.db.schema import Model, ModelStageChange, utcnow
from defectscan.errors import ModelError
from defectscan.times import iso_utc
from defectscan.users import user_name

# The reason of the rows migration 0004 wrote for versions registered before stage changes were recorded.
BEFORE_HISTORY = "registered (before stage history)"
REPLACED = "replaced in production by"
# In a production timeline: a time before the stage history, whose version in production is not known.
# (A colon: no version name reads like it.)
UNKNOWN = "unknown: before the stage history"

HISTORY_COLUMNS = ("model", "from_stage", "to_stage", "changed_at", "changed_by", "reason")


def _reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise ModelError("give --reason: why the stage changes (kept in the version's history)")
    return reason.strip()


def _lock_name(session: Session, name: str) -> list[Model]:
    """The name's versions, locked for the rest of this transaction and read afresh, so that two promotions of
    one name serialise. A no-op write to their rows takes the lock: SQLite's write lock (a SELECT ... FOR UPDATE
    locked nothing there, and two promotions at once left two versions in production) and PostgreSQL's row locks."""
    session.execute(update(Model).where(Model.name == name).values(stage=Model.stage))
    return list(session.scalars(select(Model).where(Model.name == name).order_by(Model.id).execution_options(populate_existing=True)))


def _change(session: Session, row: Model, stage: str, reason: str, by: str, at: dt.datetime | None = None) -> None:
    session.add(ModelStageChange(model_id=row.id, from_stage=row.stage, to_stage=stage, reason=reason, changed_by=by, changed_at=at or utcnow()))
    session.execute(update(Model).where(Model.id == row.id).values(stage=stage))


def promote(session: Session, reference: str, *, reason: str | None, by: str | None = None, without_comparison: bool = False) -> tuple[Model, Model | None]:
    """Put a version into production; the version there before goes to `archived`. Returns (promoted, archived or None)."""
    reason, by = _reason(reason), user_name(by)
    target = model_refs.resolve(session, reference)
    versions = _lock_name(session, target.name)  # `target` read afresh with them: another promotion may have moved it
    if target.stage == "production":
        session.rollback()
        raise ModelError(f"model {target.name}:{target.version} is already in production")
    current = next((m for m in versions if m.stage == "production" and m.id != target.id), None)
    baseline = current or last_in_production(session, target.name)
    if baseline is not None and baseline.id == target.id:
        baseline = None  # back into production after an archive: nothing to prove against itself
    compared = last_comparison(session, target, baseline) if baseline is not None else None
    evidence = bool(compared and compared["figures"].get("images"))  # a comparison over judged images
    if baseline is not None and not without_comparison and not evidence:
        session.rollback()
        where = "is in production" if baseline is current else f"was the last version of {baseline.name} in production (none is now)"
        raise ModelError(
            f"model {baseline.name}:{baseline.version} {where} and {target.name}:{target.version} was never compared "
            f"against it on judged images of the plant: run `defectscan models compare {target.name}:{target.version} --against "
            f"{baseline.name}:{baseline.version} --lot LOT`, or give --without-comparison to promote anyway"
        )
    now = utcnow()  # one moment: no time without a version in production between the two rows
    if current is not None:
        _change(session, current, "archived", f"{REPLACED} {target.version}: {reason}", by, now)
    if baseline is not None and not evidence:
        # The history is the audit trail: a promotion without the evidence says which version it skipped.
        reason = f"{reason} (--without-comparison against {baseline.name}:{baseline.version})"
    _change(session, target, "production", reason, by, now)
    session.commit()
    session.refresh(target)
    if current is not None:
        session.refresh(current)
    return target, current


def last_in_production(session: Session, name: str) -> Model | None:
    """The version of `name` most recently put into production (the one there now, if any); None if none ever was."""
    return session.scalar(
        select(Model).join(ModelStageChange, ModelStageChange.model_id == Model.id)
        .where(Model.name == name, ModelStageChange.to_stage == "production").order_by(ModelStageChange.id.desc()).limit(1)
    )


def archive(session: Session, reference: str, *, reason: str | None, by: str | None = None) -> Model:
    """Take a version out of use (jobs on NAME:production find none until another is promoted, if it was there)."""
    reason, by = _reason(reason), user_name(by)
    target = model_refs.resolve(session, reference)
    _lock_name(session, target.name)
    if target.stage == "archived":
        session.rollback()
        raise ModelError(f"model {target.name}:{target.version} is already archived")
    _change(session, target, "archived", reason, by)
    session.commit()
    session.refresh(target)
    return target


def stage_history(session: Session, name: str) -> list[dict]:
    """Every stage change of the name's versions, oldest first."""
    name = model_refs.model_name(name)
    rows = session.execute(
        select(ModelStageChange, Model.version).join(Model, ModelStageChange.model_id == Model.id).where(Model.name == name)
        .order_by(ModelStageChange.id)
    ).all()
    if not rows:
        model_refs.resolve(session, name)  # names an unknown model, with the known ones
    return [
        dict(zip(HISTORY_COLUMNS, (f"{name}:{version}", c.from_stage, c.to_stage, iso_utc(c.changed_at), c.changed_by, c.reason), strict=True))
        for c, version in rows
    ]


def production_timeline(session: Session, name: str) -> list[tuple[dt.datetime, str | None]]:
    """When the version in production of `name` changed, oldest first: (from when, version, or None while none
    was). Where the history starts at migration 0004, before which only each version's stage then is known, it
    starts with UNKNOWN, and the version then in production counts from its registration."""
    rows = session.execute(
        select(ModelStageChange.changed_at, ModelStageChange.from_stage, ModelStageChange.to_stage, ModelStageChange.reason, Model.version)
        .join(Model, ModelStageChange.model_id == Model.id).where(Model.name == name).order_by(ModelStageChange.id)
    ).all()
    timeline: list[tuple[dt.datetime, str | None]] = []
    if any(reason == BEFORE_HISTORY for *_, reason, _ in rows):
        timeline.append((dt.datetime.min.replace(tzinfo=dt.UTC), UNKNOWN))
    current = None
    for at, before, after, reason, version in rows:
        if after == "production":
            current = version
        elif before == "production" and current == version and not reason.startswith(REPLACED):
            current = None
        else:
            continue  # (the archive half of a promotion: the promoted version follows at once)
        timeline.append((at, current))
    return sorted(timeline, key=lambda entry: entry[0])


def in_production_between(timeline: list[tuple[dt.datetime, str | None]], first: dt.datetime, last: dt.datetime) -> list[str | None]:
    """The versions in production at some moment from `first` to `last` (None: a moment with none), in order."""
    versions: list[str | None] = []
    standing = None
    for at, version in timeline:
        if at > last:
            break
        if at > first and (not versions or versions[-1] != standing):
            versions.append(standing)
        standing = version
    if not versions or versions[-1] != standing:
        versions.append(standing)
    return versions

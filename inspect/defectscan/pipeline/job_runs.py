"""The one writer of `job_runs` rows: open a run, keep its heartbeat, close it, and close the runs of dead clients.

`defectscan inspect` and `jobs run` both go through here, so a row's life is the same whoever
started it: `running` with a heartbeat while its client works, then exactly one final status.
A client killed without a chance to close its row (SIGKILL, power loss, an evicted pod) stops
beating; the next run, or `jobs history`, closes that row as `abandoned`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from typing import Any

from sqlalchemy import Connection, func, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from defectscan.db.schema import JobRun, UTCDateTime, utcnow
from defectscan.errors import DefectscanError, first_line
from defectscan.pipeline.record import Retry, with_retries
from defectscan.secrets import mask_secrets

log = logging.getLogger(__name__)

ERROR_CHARS = 4000


def _error_text(errors: list[str]) -> str | None:
    """What `job_runs.error` keeps of a run's errors: joined, passwords masked, bounded."""
    return mask_secrets("; ".join(errors))[:ERROR_CHARS] or None


def open_run(factory: sessionmaker[Session], retry: Retry, *, job: str, spec: dict[str, Any] | None, model_id: int | None) -> int:
    """A new `running` row for this process; returns its id."""

    def write() -> int:
        with factory.begin() as session:
            run = JobRun(job=job, spec=spec, model_id=model_id, status="running", host=socket.gethostname(), pid=os.getpid(), heartbeat_at=utcnow())
            session.add(run)
            session.flush()
            return run.id

    return with_retries(write, retry, "starting the job run")


def beat(factory: sessionmaker[Session], run_id: int) -> None:
    """Refresh the run's heartbeat; a failed beat is only logged (staleness is many beats away)."""
    try:
        with factory.begin() as session:
            touch_run(session, run_id, utcnow())
    except SQLAlchemyError as exc:
        log.warning("job run %d: heartbeat not written: %s", run_id, first_line(exc))


def close_run(factory: sessionmaker[Session], retry: Retry, run_id: int, *, status: str, errors: list[str], **values: Any) -> bool:
    """Write the run's final status, error text and any other columns; False (logged) when the database refused."""
    error = _error_text(errors)

    def write() -> None:
        with factory.begin() as session:
            session.execute(update(JobRun).where(JobRun.id == run_id).values(status=status, finished_at=utcnow(), error=error, **values))

    try:
        with_retries(write, Retry(attempts=min(retry.attempts, 3), backoff_s=retry.backoff_s), f"closing job run {run_id}")
    except DefectscanError as exc:
        log.error("%s (the run stays 'running' until a later run finds it abandoned)", exc)
        return False
    return True


def record_closed_run(factory: sessionmaker[Session], *, job: str, spec: dict[str, Any] | None, status: str, errors: list[str],
                      started_at: dt.datetime, seconds: float, already_done: int = 0) -> int | None:
    """A row for a trigger that ended before a run was opened (nothing to do, or a failure first); `already_done`:
    the images of its scope that were judged before."""
    try:
        with factory.begin() as session:
            run = JobRun(job=job, spec=spec, status=status, started_at=started_at, finished_at=utcnow(), heartbeat_at=utcnow(),
                         host=socket.gethostname(), pid=os.getpid(), error=_error_text(errors),
                         timings={"seconds": round(seconds, 3)}, n_images=already_done, n_skipped=already_done)
            session.add(run)
            session.flush()
            return run.id
    except SQLAlchemyError as exc:  # the database is gone: the exit status still tells the scheduler
        log.error("job '%s': could not record the run: %s", job, first_line(exc))
        return None


def abandon_run(connection: Connection | Session, run_id: int, reason: str) -> None:
    """Close one `running` row whose client is known to be gone (its job lock was taken over); inside the caller's transaction."""
    connection.execute(
        update(JobRun).where(JobRun.id == run_id, JobRun.status == "running")
        .values(status="abandoned", finished_at=utcnow(), error=f"abandoned: {reason}")
    )


def touch_run(connection: Connection | Session, run_id: int, now: dt.datetime) -> None:
    """The heartbeat write itself, inside the caller's transaction (the job lock refreshes both at once)."""
    connection.execute(update(JobRun).where(JobRun.id == run_id, JobRun.status == "running").values(heartbeat_at=now))


def abandon_stale_runs(session: Session, stale_after_s: float) -> list[int]:
    """Close as `abandoned` every `running` row without a heartbeat for `stale_after_s`; their ids.

    The caller commits. The UPDATE re-checks the heartbeat, so a run that beats meanwhile is left alone.
    """
    cutoff = utcnow() - dt.timedelta(seconds=stale_after_s)
    last_sign = func.coalesce(JobRun.heartbeat_at, JobRun.started_at, type_=UTCDateTime)
    stale = session.execute(
        update(JobRun)
        .where(JobRun.status == "running", last_sign < cutoff)
        .values(status="abandoned", finished_at=last_sign,
                error=f"abandoned: no heartbeat for over {stale_after_s:g} s (its client stopped without closing the run); "
                      "a later run inspects the images it left")
        .returning(JobRun.id)
    ).scalars().all()
    if stale:
        log.warning("closed %d job runs whose clients stopped without a word as 'abandoned': %s", len(stale), ", ".join(map(str, stale)))
    return sorted(stale)


def abandon_stale_runs_if_writable(factory: sessionmaker[Session], stale_after_s: float) -> list[int]:
    """`abandon_stale_runs` for read-side commands: on a database they cannot write, nothing is closed."""
    try:
        with factory.begin() as session:
            return abandon_stale_runs(session, stale_after_s)
    except SQLAlchemyError as exc:
        log.debug("stale runs not closed: %s", exc)
        return []

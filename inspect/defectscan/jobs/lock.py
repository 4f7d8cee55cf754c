"""One runner per job at a time: a row in `job_locks`, on SQLite and PostgreSQL alike.

Taking the lock is an INSERT (the primary key on `job` lets exactly one of two racing
runners in); the holder refreshes `heartbeat_at` while it works and DELETEs the row when it
stops. A runner that crashed leaves its row behind: once the heartbeat is older than
`stale_after`, or at once when the holder was a process on this machine that no longer
exists, the next runner takes it over with a compare-and-swap UPDATE, so two runners that
find the same stale row cannot both win; the dead runner's run is closed as `abandoned`. Times are the runners' clocks (keep hosts on NTP;
`stale_after` is minutes, clock skew is not).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from defectscan.db.schema import JobLock, utcnow
from defectscan.errors import DefectscanError
from defectscan.pipeline.job_runs import abandon_run, touch_run

log = logging.getLogger(__name__)


class AlreadyRunning(DefectscanError):
    """Another runner holds the job's lock and is alive."""

    def __init__(self, job: str, holder: LockRow):
        self.job = job
        self.holder = holder
        age = (utcnow() - holder.heartbeat_at).total_seconds()
        run = f" (job run {holder.job_run_id})" if holder.job_run_id else ""
        super().__init__(
            f"job '{job}' is already running{run}: held by {holder.owner} since {holder.acquired_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"last heartbeat {age:.0f} s ago"
        )


@dataclass(frozen=True)
class LockRow:
    job: str
    owner: str
    job_run_id: int | None
    acquired_at: dt.datetime
    heartbeat_at: dt.datetime


def _pid_namespace() -> str:
    # Two containers may share a host name; a pid only means something inside its pid namespace.
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def owner_id() -> str:
    """host/pid-namespace:pid:token -- the token tells a reused pid from the runner that held it."""
    return f"{socket.gethostname()}/{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead(owner: str) -> bool:
    """True only when the holder ran on this machine, in this pid namespace, and its process is gone."""
    try:
        place, pid, _token = owner.rsplit(":", 2)
        host, namespace = place.rsplit("/", 1)
        pid_number = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "-":
        return False
    if pid_number == os.getpid():
        return False
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def read_lock(engine: Engine, job: str) -> LockRow | None:
    with engine.connect() as connection:
        row = connection.execute(select(JobLock.job, JobLock.owner, JobLock.job_run_id, JobLock.acquired_at, JobLock.heartbeat_at).where(JobLock.job == job)).first()
    return LockRow(*row) if row is not None else None


class JobLockHandle:
    """A held lock: `heartbeat()` keeps it, `release()` gives it back; a context manager does both."""

    def __init__(self, engine: Engine, job: str, owner: str, taken_over: LockRow | None):
        self.engine = engine
        self.job = job
        self.owner = owner
        # The row of the crashed runner this one replaced, if any.
        self.taken_over = taken_over
        self.lost = False

    def heartbeat(self, job_run_id: int | None = None) -> bool:
        """Refresh the lock (and the run's heartbeat); False when another runner has taken it over."""
        now = utcnow()
        values = {"heartbeat_at": now}
        if job_run_id is not None:
            values["job_run_id"] = job_run_id
        with self.engine.begin() as connection:
            held = connection.execute(update(JobLock).where(JobLock.job == self.job, JobLock.owner == self.owner).values(**values)).rowcount == 1
            if held and job_run_id is not None:
                touch_run(connection, job_run_id, now)
        if not held:
            self.lost = True
        return held

    def release(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(JobLock).where(JobLock.job == self.job, JobLock.owner == self.owner))

    def __enter__(self) -> JobLockHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held_by_live_runner(lock, stale_after: float, now) -> bool:
    """Whether a lock row's runner is alive: a heartbeat younger than `stale_after` and, on this machine, its process there."""
    return (now - lock.heartbeat_at).total_seconds() < stale_after and not holder_is_dead(lock.owner)


def acquire(engine: Engine, job: str, *, stale_after: float, owner: str | None = None) -> JobLockHandle:
    """Take the job's lock, taking over a stale one; AlreadyRunning when a live runner holds it."""
    owner = owner or owner_id()
    now = utcnow()
    try:
        with engine.begin() as connection:
            connection.execute(insert(JobLock).values(job=job, owner=owner, job_run_id=None, acquired_at=now, heartbeat_at=now))
        return JobLockHandle(engine, job, owner, None)
    except IntegrityError:
        pass
    holder = read_lock(engine, job)
    if holder is None:
        # Released between our insert and our read: try once more, from the start.
        return acquire(engine, job, stale_after=stale_after, owner=owner)
    checked = utcnow()
    if held_by_live_runner(holder, stale_after, checked):
        raise AlreadyRunning(job, holder)
    age = (checked - holder.heartbeat_at).total_seconds()
    now = utcnow()
    with engine.begin() as connection:
        swapped = connection.execute(
            update(JobLock)
            .where(JobLock.job == job, JobLock.owner == holder.owner, JobLock.heartbeat_at == holder.heartbeat_at)
            .values(owner=owner, job_run_id=None, acquired_at=now, heartbeat_at=now)
        ).rowcount
    if swapped != 1:
        current = read_lock(engine, job)
        if current is None:
            return acquire(engine, job, stale_after=stale_after, owner=owner)
        raise AlreadyRunning(job, current)
    reason = "its process is gone" if age < stale_after else f"no heartbeat for {age:.0f} s"
    log.warning("job '%s': took over the lock of %s (%s)", job, holder.owner, reason)
    if holder.job_run_id is not None:
        with engine.begin() as connection:
            abandon_run(connection, holder.job_run_id, f"runner {holder.owner} stopped ({reason}); lock taken over by {owner}")
    return JobLockHandle(engine, job, owner, holder)


class Heartbeat:
    """A daemon thread that refreshes the lock every `interval` seconds; calls `on_lost` if it is taken over."""

    def __init__(self, handle: JobLockHandle, interval: float, on_lost: Callable[[], None]):
        self.handle = handle
        self.interval = interval
        self.on_lost = on_lost
        self.job_run_id: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{handle.job}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                held = self.handle.heartbeat(self.job_run_id)
            except Exception as exc:  # a database hiccup: the next beat tries again, staleness is minutes away
                log.warning("job '%s': heartbeat failed: %s", self.handle.job, exc)
                continue
            if not held:
                log.error("job '%s': the lock was taken over by another runner; stopping this run", self.handle.job)
                self.on_lost()
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

"""The job lock (job_locks) between real processes, on SQLite and PostgreSQL: one runner wins, stale locks are taken over."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket

import pytest
from defectscan.db.schema import JobLock, JobRun, utcnow
from defectscan.db.session import make_engine
from defectscan.jobs.lock import (
    AlreadyRunning,
    acquire,
    holder_is_dead,
    owner_id,
    read_lock,
)
from jobs_helpers import defectscan, hold_lock_process, race, write_spec
from sqlalchemy import insert, select


@pytest.fixture
def engine(migrated_url):
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


def test_a_second_trigger_exits_already_running_while_another_process_holds_the_job(migrated_url, engine, tmp_path):
    write_spec(tmp_path, "line-a", source={"glob": "incoming/*.zarr"}, model="demo")
    holder = hold_lock_process(migrated_url, "line-a")
    try:
        second = defectscan(migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 75, err
        assert err.startswith(f"job 'line-a' is already running: held by {socket.gethostname()}/")
        assert "this trigger does nothing" in err
        # The trigger that lost did nothing: no run recorded, the lock still the holder's.
        with engine.connect() as connection:
            assert connection.scalar(select(JobRun.id)) is None
        assert read_lock(engine, "line-a").owner.split(":")[1] == str(holder.pid)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert read_lock(engine, "line-a") is None


def test_of_racing_processes_exactly_one_takes_the_lock(migrated_url, tmp_path):
    assert sorted(race(migrated_url, "line-a", 3, tmp_path / "start")) == ["busy", "busy", "won"]


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_and_its_run_marked_abandoned(engine):
    holder = hold_lock_process(engine.url.render_as_string(hide_password=False), "line-a")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    dead = read_lock(engine, "line-a")
    assert dead is not None and holder_is_dead(dead.owner)
    with engine.begin() as connection:
        run_id = connection.execute(insert(JobRun).values(job="line-a", status="running", started_at=utcnow()).returning(JobRun.id)).scalar_one()
        connection.execute(JobLock.__table__.update().values(job_run_id=run_id))

    # Its heartbeat is fresh, but its process is gone: taken over at once.
    handle = acquire(engine, "line-a", stale_after=300)
    assert handle.taken_over.owner == dead.owner
    assert read_lock(engine, "line-a").owner == handle.owner
    with engine.connect() as connection:
        status, error = connection.execute(select(JobRun.status, JobRun.error).where(JobRun.id == run_id)).one()
    assert status == "abandoned" and f"runner {dead.owner} stopped (its process is gone)" in error
    handle.release()
    assert read_lock(engine, "line-a") is None


def _foreign_lock(engine, age_s: float) -> str:
    owner = "line-pc-7/4026531836:4242:0badc0de"
    beat = utcnow() - dt.timedelta(seconds=age_s)
    with engine.begin() as connection:
        connection.execute(insert(JobLock).values(job="line-a", owner=owner, acquired_at=beat, heartbeat_at=beat))
    return owner


def test_a_live_lock_of_another_host_is_respected(engine):
    owner = _foreign_lock(engine, age_s=10)
    assert not holder_is_dead(owner)
    with pytest.raises(AlreadyRunning, match=f"job 'line-a' is already running: held by {owner} since .* last heartbeat 1[0-9] s ago"):
        acquire(engine, "line-a", stale_after=60)
    assert read_lock(engine, "line-a").owner == owner


def test_a_stale_lock_of_another_host_is_taken_over_and_the_old_holder_loses_it(engine):
    owner = _foreign_lock(engine, age_s=120)
    handle = acquire(engine, "line-a", stale_after=60)
    assert handle.taken_over.owner == owner
    assert handle.heartbeat() is True

    # The old holder wakes up: its heartbeat finds the lock gone and says so.
    from defectscan.jobs.lock import JobLockHandle

    old = JobLockHandle(engine, "line-a", owner, None)
    assert old.heartbeat() is False and old.lost
    old.release()  # releases nothing of the new holder's
    assert read_lock(engine, "line-a").owner == handle.owner
    handle.release()


def test_owner_ids_name_host_and_pid_and_differ_per_call():
    a, b = owner_id(), owner_id()
    assert a != b
    assert a.startswith(f"{socket.gethostname()}/") and a.split(":")[1] == str(os.getpid())
    assert not holder_is_dead(a)
    assert not holder_is_dead("not an owner id")

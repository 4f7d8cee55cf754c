"""The read side of scheduled jobs: last runs, a job's history, one run in full (secrets masked)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from defectscan.db.schema import JobLock, JobRun, Model
from defectscan.errors import DefectscanError
from defectscan.secrets import mask_secrets_in


def last_runs(session: Session, jobs: list[str]) -> dict[str, JobRun]:
    """The most recent run of each job that has one."""
    if not jobs:
        return {}
    latest = select(JobRun.job, func.max(JobRun.id).label("id")).where(JobRun.job.in_(jobs)).group_by(JobRun.job).subquery()
    rows = session.scalars(select(JobRun).join(latest, JobRun.id == latest.c.id))
    return {row.job: row for row in rows}


def running(session: Session, jobs: list[str]) -> dict[str, JobLock]:
    if not jobs:
        return {}
    return {row.job: row for row in session.scalars(select(JobLock).where(JobLock.job.in_(jobs)))}


def job_history(session: Session, job: str, limit: int = 20) -> list[JobRun]:
    return list(session.scalars(select(JobRun).where(JobRun.job == job).order_by(JobRun.id.desc()).limit(limit)))


def get_run(session: Session, run_id: int) -> JobRun:
    run = session.get(JobRun, run_id)
    if run is None:
        raise DefectscanError(f"no job run {run_id} (see `defectscan jobs history NAME`)")
    return run


def duration_s(run: JobRun) -> float | None:
    if run.finished_at is None:
        return None
    return (run.finished_at - run.started_at).total_seconds()


def describe_run(session: Session, run: JobRun) -> dict[str, Any]:
    """The run as plain data, every text with passwords masked (what `jobs show` prints)."""
    model = session.get(Model, run.model_id) if run.model_id is not None else None
    data = {
        "id": run.id,
        "job": run.job,
        "status": run.status,
        "model": f"{model.name}:{model.version}" if model else None,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "duration_s": duration_s(run),
        "host": run.host,
        "pid": run.pid,
        "n_images": run.n_images,
        "n_inspected": run.n_inspected,
        "n_skipped": run.n_skipped,
        "n_errors": run.n_errors,
        "n_defects": run.n_defects,
        "images_per_second": run.images_per_second,
        "timings": run.timings,
        "error": run.error,
        "spec": run.spec,
    }
    # Every string masked, in the spec and the error alike, so a password anywhere in them never gets out.
    return mask_secrets_in(json.loads(json.dumps(data, default=str)))

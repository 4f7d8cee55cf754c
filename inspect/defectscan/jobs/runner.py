"""`jobs run NAME`: lock -> discover -> register -> inspect what is new -> record, with exit codes a scheduler can act on.

Every trigger leaves a `job_runs` row, including one that found nothing to do and one that
failed before the pipeline started, so `jobs history` shows what the scheduler did. SIGTERM
(what cron's, systemd's and Kubernetes' stop sends) marks the run `interrupted` and releases
the lock; the next run resumes where it stopped, because finished images are never redone.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from defectscan import interrupts
from defectscan.config import Settings
from defectscan.db.schema import JobRun, Model, utcnow
from defectscan.errors import DefectscanError
from defectscan.exitcodes import EXIT_ALREADY_RUNNING
from defectscan.interrupts import Interrupted
from defectscan.pipeline.job_runs import close_run, record_closed_run
from defectscan.pipeline.record import Retry
from defectscan.pipeline.run import run_exit_code
from defectscan.jobs.discover import Discovery, discover, image_sets_with_work, images_done, missing_glob_folder
from defectscan.jobs.lock import AlreadyRunning, Heartbeat, acquire
from defectscan.jobs.spec import JobSpec, describe_spec

log = logging.getLogger(__name__)

LOCK_LOST = "the lock was taken over by another runner during this run: stopped"


@dataclass
class JobOutcome:
    job: str
    status: str
    job_run_id: int | None
    discovery: Discovery = field(default_factory=Discovery)
    n_image_sets: int = 0
    n_images: int = 0
    n_inspected: int = 0
    n_skipped: int = 0
    n_errors: int = 0
    n_defects: int = 0
    n_pending: int = 0
    # Images of the job's sets that were judged before this run (counted in n_images and n_skipped).
    already_done: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        return run_exit_code(self.status, pending=self.n_pending, signal=self.signal)


def resolve_model(session: Session, spec: JobSpec) -> Model:
    from defectscan.model.registry import model_to_run

    return model_to_run(session, spec.model.reference)


def run_job(
    engine: Engine,
    spec: JobSpec,
    spec_file: Path,
    settings: Settings,
    *,
    echo: Callable[[str], None] = print,
    on_started: Callable[[int], None] | None = None,
) -> JobOutcome:
    """Run the job once. Raises AlreadyRunning when another runner holds its lock; otherwise records a run."""
    from defectscan.db.session import session_factory

    factory = session_factory(engine)
    began = time.perf_counter()
    started_at = utcnow()
    outcome = JobOutcome(job=spec.name, status="failed", job_run_id=None)
    with interrupts.stop_on_signals(settings.inspection.stop_within_s):
        handle = acquire(engine, spec.name, stale_after=spec.lock.stale_after_s)
        if handle.taken_over is not None:
            echo(f"took over the lock of a runner that stopped: {handle.taken_over.owner}")
        heartbeat = Heartbeat(handle, interval=spec.lock.stale_after_s / 5, on_lost=lambda: interrupts.request_stop(signal.SIGTERM))
        try:
            with heartbeat:
                try:
                    _run(factory, spec, spec_file, settings, outcome, heartbeat=heartbeat, echo=echo, on_started=on_started)
                except Interrupted as exc:
                    outcome.status, outcome.signal = "interrupted", exc.signum
                    # The heartbeat stops a run that lost its lock as SIGTERM would; the row says which it was.
                    outcome.errors.append(LOCK_LOST if handle.lost else f"interrupted by {exc}")
                except (KeyboardInterrupt, SystemExit) as exc:
                    outcome.status = "interrupted"
                    outcome.errors.append(f"interrupted ({exc or type(exc).__name__})")
                except DefectscanError as exc:
                    outcome.status = "failed"
                    outcome.errors.append(str(exc))
                except Exception as exc:
                    log.exception("job '%s' failed", spec.name)
                    outcome.status = "failed"
                    outcome.errors.append(f"{type(exc).__name__}: {exc}")
                outcome.seconds = time.perf_counter() - began
                if handle.lost and LOCK_LOST not in outcome.errors:
                    outcome.errors.append(LOCK_LOST)
                _close_record(factory, spec, spec_file, outcome, started_at)
        finally:
            handle.release()
    return outcome


def _run(factory: sessionmaker[Session], spec: JobSpec, spec_file: Path, settings: Settings, outcome: JobOutcome, *,
         heartbeat: Heartbeat, echo: Callable[[str], None], on_started: Callable[[int], None] | None) -> None:
    from defectscan.pipeline.run import check_store_unchanged, inspect_image_sets

    with factory() as session:
        found = discover(session, spec, spec_file)
        outcome.discovery = found
        arrived = f", {found.arrived} images written since into stores registered before" if found.arrived else ""
        echo(f"discovered {len(found.matched)} stores: {len(found.new)} new, {len(found.incomplete)} still being written, "
             f"{len(found.problems)} refused{arrived}")
        # Resolved before anything else: a model that cannot run fails the job on a night without data too.
        model = resolve_model(session, spec)
        if spec.source.glob is not None and not found.matched:
            missing_glob_folder(spec, spec_file)
            echo("nothing to inspect: the source glob matches no store")
            outcome.status = "succeeded"
            return
        candidates = image_sets_with_work(session, spec, model, found.matched)
        done = images_done(session, spec, model, found.matched)

    interrupts.check()
    image_sets = []
    for image_set in candidates:
        try:
            check_store_unchanged(image_set)
        except DefectscanError as exc:
            found.problems.append(str(exc))
            continue
        except Exception as exc:
            log.exception("job '%s': %s cannot be checked", spec.name, image_set.uri)
            found.problems.append(f"{image_set.uri}: cannot be checked against its registration: {type(exc).__name__}: {exc}")
            continue
        image_sets.append(image_set)
    outcome.errors.extend(found.problems[:20])
    outcome.n_image_sets = len(image_sets)
    outcome.n_images = outcome.n_skipped = outcome.already_done = done
    if not image_sets:
        echo("nothing new to inspect")
        outcome.status = "partial" if found.problems else "succeeded"
        return

    from defectscan.pipeline.cluster import connect

    record = _spec_record(spec, spec_file, found)
    interrupts.check()
    with connect(settings.cluster, runtime=settings.inspection.runtime) as (client, info):
        interrupts.check()
        echo(f"Dask: {info.n_workers} worker{'s' if info.n_workers != 1 else ''}{' (GPU)' if info.gpu else ''}; {len(image_sets)} image sets with work")
        for warning in info.warnings:
            echo(f"warning: {warning}")
        in_flight = spec.max_in_flight or info.n_workers * settings.cluster.shards_in_flight_per_worker

        def started(run_id: int) -> None:
            outcome.job_run_id = heartbeat.job_run_id = run_id
            if on_started:
                on_started(run_id)

        summary = inspect_image_sets(
            factory, client, model, image_sets, settings.inspection, max_in_flight=in_flight, gpu=info.gpu,
            job=spec.name, spec=record, retry=Retry(spec.retries.attempts, spec.retries.backoff_s), on_started=started,
        )
    outcome.job_run_id = summary.job_run_id
    outcome.status = "partial" if summary.status == "succeeded" and found.problems else summary.status
    outcome.n_images += summary.n_images
    outcome.n_skipped += summary.n_skipped
    outcome.n_inspected = summary.counts.inspected
    outcome.n_errors = summary.counts.errors
    outcome.n_defects = summary.counts.defects
    outcome.n_pending = summary.counts.pending
    outcome.errors.extend(summary.errors)


def _spec_record(spec: JobSpec, spec_file: Path, found: Discovery) -> dict[str, Any]:
    return {"file": str(spec_file), "job": describe_spec(spec), "discovery": found.as_record()}


def _close_record(factory: sessionmaker[Session], spec: JobSpec, spec_file: Path, outcome: JobOutcome, started_at) -> None:
    """Every trigger leaves a row: the pipeline's row gets the job's final status; otherwise one is written here."""
    record = _spec_record(spec, spec_file, outcome.discovery)
    if outcome.job_run_id is not None:
        # The pipeline's row counts the sets it inspected; the ones with nothing left were counted by `jobs run` alone.
        done = outcome.already_done
        close_run(factory, Retry(spec.retries.attempts, spec.retries.backoff_s), outcome.job_run_id,
                  status=outcome.status, errors=outcome.errors, spec=record,
                  n_images=JobRun.n_images + done, n_skipped=JobRun.n_skipped + done)
    else:
        outcome.job_run_id = record_closed_run(factory, job=spec.name, spec=record, status=outcome.status, errors=outcome.errors,
                                               started_at=started_at, seconds=outcome.seconds, already_done=outcome.already_done)


__all__ = ["EXIT_ALREADY_RUNNING", "AlreadyRunning", "JobOutcome", "run_job"]

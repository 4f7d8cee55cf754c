"""`defectscan inspect` as a library call: plan, submit with a bounded number in flight, record.

The client holds at most `max_in_flight` shards at once and writes each finished shard in one
transaction, so its memory does not grow with the size of the job and an interrupted run loses
at most the shards in flight: a rerun skips every image already recorded for the model version.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from defectscan.config import InspectionSettings
from defectscan.db.schema import Image, ImageSet, Inspection, JobRun, Model, utcnow
from defectscan.errors import DataError, DefectscanError
from defectscan.pipeline.outputs import prepare_output
from defectscan.pipeline.plan import plan_stack, plan_strip
from defectscan.model.verdict import RULE_FIELDS, ImageResult, VerdictRules
from defectscan.pipeline.record import Counts, Retry, record_shard, with_retries
from defectscan.pipeline.worker import ArrayRef, ModelRef, ShardResult, inspect_stack_shard, inspect_tiles, judge_strip, verify_model_file

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    job_run_id: int
    status: str
    n_images: int = 0
    n_skipped: int = 0
    counts: Counts = field(default_factory=Counts)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    # Seconds spent on the workers, summed over shards: read, predict, write, postprocess.
    worker_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        done = self.counts.inspected + self.counts.errors
        return done / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Task:
    """One submission: its future, and what to record when it fails."""

    image_set_id: int
    positions: tuple[int, ...]
    output: ArrayRef
    strip_tiles: bool = False


def model_ref(model: Model, batch_size: int) -> ModelRef:
    return ModelRef(uri=model.uri, sha256=model.sha256, classes=tuple(model.classes), batch_size=batch_size)


def verdict_rules(model: Model, settings: InspectionSettings) -> VerdictRules:
    """The model version's operating point, with what the settings (or the job) set explicitly over it."""
    from defectscan.model.registry import operating_rules

    recorded = operating_rules(model)
    overrides = {f: getattr(settings, f) for f in RULE_FIELDS if getattr(settings, f) is not None}
    return replace(recorded, **overrides) if overrides else recorded


def pending_positions(session: Session, image_set: ImageSet, model: Model, force: bool) -> tuple[np.ndarray, int]:
    """Positions that need results (images with a row, not yet inspected by this model), and how many are skipped."""
    positions = select(Image.position).where(Image.image_set_id == image_set.id)
    if not force:
        positions = positions.where(Image.id.not_in(select(Inspection.image_id).where(Inspection.model_id == model.id)))
    # Streamed in blocks: a million-image set never sits in client memory as a million Python rows.
    rows = session.scalars(positions.order_by(Image.position), execution_options={"yield_per": 50_000})
    todo = np.fromiter(rows, dtype=np.int64)
    total = session.scalar(select(func.count()).select_from(Image).where(Image.image_set_id == image_set.id))
    return todo, total - len(todo)


def check_store_unchanged(image_set: ImageSet) -> None:
    from defectscan.data import imageset as layout
    from defectscan.data.register import store_changes

    info = layout.describe(layout.open_group(image_set.uri), image_set.uri, image_set.array_path)
    changes = store_changes(image_set, info)
    if changes:
        raise DataError(f"{image_set.uri}: the store changed since it was registered ({changes}); refusing to inspect it")


def inspect_image_sets(
    factory: sessionmaker[Session],
    client,
    model: Model,
    image_sets: list[ImageSet],
    settings: InspectionSettings,
    *,
    max_in_flight: int,
    force: bool = False,
    gpu: bool = False,
    job: str = "inspect",
    spec: dict[str, Any] | None = None,
    retry: Retry = Retry(),
    on_progress: Callable[[int, int], None] | None = None,
    on_started: Callable[[int], None] | None = None,
) -> RunSummary:
    """Inspect every pending image of `image_sets` with `model` on the Dask `client`; returns the run's summary.

    Refuses before any work when the model file does not match its recorded sha256 or a store
    changed since registration. `on_started(job_run_id)` is called once the run's row exists,
    `on_progress(done, total)` as shards finish.
    """
    ref = model_ref(model, settings.batch_size)
    verify_model_file(ref)
    for image_set in image_sets:
        check_store_unchanged(image_set)
    rules = verdict_rules(model, settings)

    def start_run() -> JobRun:
        with factory.begin() as session:
            run = JobRun(job=job, spec=spec, model_id=model.id, status="running", host=socket.gethostname(), pid=os.getpid(), heartbeat_at=utcnow())
            session.add(run)
            session.flush()
            return run

    run = with_retries(start_run, retry, "starting the job run")
    summary = RunSummary(job_run_id=run.id, status="running")
    if on_started:
        on_started(run.id)
    began = time.perf_counter()
    try:
        plans = []
        with factory() as session:
            for image_set in image_sets:
                todo, skipped = pending_positions(session, image_set, model, force)
                summary.n_images += len(todo) + skipped
                summary.n_skipped += skipped
                if len(todo):
                    plans.append((image_set, todo))
        with factory.begin() as session:
            session.execute(update(JobRun).where(JobRun.id == run.id).values(n_images=summary.n_images, n_skipped=summary.n_skipped))
        total = summary.n_images - summary.n_skipped
        if on_progress:
            on_progress(0, total)
        done = _run_tasks(factory, client, model, ref, rules, settings, plans, max_in_flight, force, gpu, run.id, retry, summary, on_progress, total)
        summary.status = "partial" if summary.counts.errors else "succeeded"
        log.info("job run %d: %d images recorded", run.id, done)
    except (KeyboardInterrupt, SystemExit):
        summary.status = "interrupted"
        summary.errors.append("interrupted")
        raise
    except DefectscanError as exc:
        summary.status = "failed"
        summary.errors.append(str(exc))
        raise
    except Exception as exc:
        summary.status = "failed"
        summary.errors.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary.seconds = time.perf_counter() - began
        _finish_run(factory, retry, summary)
    return summary


def _finish_run(factory: sessionmaker[Session], retry: Retry, summary: RunSummary) -> None:
    def write() -> None:
        with factory.begin() as session:
            session.execute(
                update(JobRun)
                .where(JobRun.id == summary.job_run_id)
                .values(
                    status=summary.status,
                    finished_at=utcnow(),
                    images_per_second=summary.images_per_second,
                    timings={"seconds": round(summary.seconds, 3), "workers": {k: round(v, 3) for k, v in summary.worker_seconds.items()}},
                    error="; ".join(summary.errors)[:4000] or None,
                )
            )

    try:
        with_retries(write, Retry(attempts=min(retry.attempts, 3), backoff_s=retry.backoff_s), f"closing job run {summary.job_run_id}")
    except DefectscanError as exc:
        log.error("%s (the run stays 'running' in the database)", exc)


def _tasks(client, model: Model, ref: ModelRef, rules: VerdictRules, settings: InspectionSettings, plans, gpu: bool, run_id: int) -> Iterator[tuple[object, _Task]]:
    """Futures in submission order, created lazily so only the in-flight ones exist."""
    resources = {"GPU": 1} if gpu else None
    for image_set, todo in plans:
        source = ArrayRef(image_set.uri, image_set.array_path)
        attributes = {
            "model": {"name": model.name, "version": model.version, "sha256": model.sha256, "classes": list(model.classes)},
            "source": {"uri": image_set.uri, "array": image_set.array_path},
            "scores": "uint8: probability x 255",
        }
        output = prepare_output(
            image_set.uri, image_set.kind, tuple(image_set.shape), len(model.classes), model.name, model.version,
            images_per_file=settings.batch_size, images_per_shard=settings.images_per_shard,
            tile_size=settings.tile_size, output_dir=settings.output_dir, attributes=attributes,
        )
        if image_set.kind == "stack":
            for shard in plan_stack(image_set.id, image_set.shape[0], settings.images_per_shard, todo):
                future = client.submit(
                    inspect_stack_shard, shard, source, output, ref, rules,
                    key=f"inspect-{run_id}-{image_set.id}-{shard.start}", resources=resources, pure=False,
                )
                yield future, _Task(image_set.id, shard.todo, output)
        else:
            height, width = image_set.shape
            tile_ref = replace(ref, batch_size=settings.tile_batch_size)
            tiles = [
                client.submit(
                    inspect_tiles, shard, source, output, tile_ref,
                    key=f"tiles-{run_id}-{image_set.id}-{i}", resources=resources, pure=False,
                )
                for i, shard in enumerate(plan_strip(image_set.id, height, width, settings.tile_size, settings.halo, settings.batch_size))
            ]
            future = client.submit(judge_strip, image_set.id, output, ref, rules, *tiles, key=f"strip-{run_id}-{image_set.id}", pure=False)
            yield future, _Task(image_set.id, (0,), output, strip_tiles=True)


def _run_tasks(factory, client, model, ref, rules, settings, plans, max_in_flight, force, gpu, run_id, retry, summary, on_progress, total) -> int:
    from distributed import as_completed

    pending: dict[str, tuple[object, _Task]] = {}
    tasks = _tasks(client, model, ref, rules, settings, plans, gpu, run_id)
    window = as_completed()

    def submit_next() -> bool:
        item = next(tasks, None)
        if item is None:
            return False
        future, task = item
        pending[future.key] = (future, task)
        window.add(future)
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    done = 0
    try:
        for future in window:
            _, task = pending.pop(future.key)
            try:
                result: ShardResult = future.result()
                results = result.results
                for name, seconds in result.timings.items():
                    summary.worker_seconds[name] = summary.worker_seconds.get(name, 0.0) + seconds
            except Exception as exc:  # the shard failed on the worker: its images are recorded as errors
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("image set %d, positions %d..%d: %s", task.image_set_id, task.positions[0], task.positions[-1], reason)
                if len(summary.errors) < 20:
                    summary.errors.append(reason)
                results = [ImageResult(position=p, verdict="error", error=reason) for p in task.positions]
            counts = record_shard(
                factory, retry, job_run_id=run_id, model_id=model.id, image_set_id=task.image_set_id,
                results=results, mask_uri=task.output.uri, mask_array=task.output.path, replace=force,
            )
            summary.counts.add(counts)
            done += len(results)
            future.release()
            if on_progress:
                on_progress(done, total)
            submit_next()
    finally:
        # Interrupted or failed: nothing more should run for this run.
        if pending:
            client.cancel([future for future, _ in pending.values()])
    return done

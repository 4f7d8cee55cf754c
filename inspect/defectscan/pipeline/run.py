"""`defectscan inspect` as a library call: plan, submit with a bounded number in flight, record.

The client holds at most `max_in_flight` shards at once and writes each finished shard in one
transaction, so its memory does not grow with the size of the job and an interrupted run loses
at most the shards in flight: a rerun skips every image already recorded for the model version.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from defectscan import interrupts
from defectscan.config import InspectionSettings
from defectscan.db.schema import Image, ImageSet, Inspection, JobRun, Model, fills_missing_chunks
from defectscan.errors import ConfigError, DataError, DefectscanError, StorageError, first_line
from defectscan.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_PENDING
from defectscan.interrupts import Interrupted
from defectscan.pipeline.job_runs import abandon_stale_runs, beat, close_run, open_run
from defectscan.pipeline.outputs import prepare_output
from defectscan.pipeline.plan import plan_stack, plan_strip
from defectscan.model.preprocess import InputContract
from defectscan.model.verdict import RULE_FIELDS, VerdictRules, per_class_without
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
    # The precision asked of the workers: the version's recorded one, or inspection.precision's float32.
    precision: str = "float32"
    # Images recorded per precision their workers ran ("bfloat16", or "bfloat16+float32" for a tiled image
    # whose tiles ran on different hardware): the recorded precision is what was asked for.
    precisions_run: dict[str, int] = field(default_factory=dict)
    # The signal that stopped the run, when one did.
    signal: int | None = None
    # Of the images skipped as done, those whose recorded result is an error (a plain rerun does not read them again).
    still_in_error: int = 0

    @property
    def images_per_second(self) -> float:
        done = self.counts.inspected + self.counts.errors
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return run_exit_code(self.status, pending=self.counts.pending, signal=self.signal)


def run_exit_code(status: str, *, pending: int = 0, signal: int | None = None) -> int:
    """The documented exit status of a run (defectscan.exitcodes): what happened, and what a scheduler should do."""
    if status == "interrupted":
        return Interrupted(signal).exit_code if signal is not None else EXIT_INTERRUPTED
    if pending and status in ("partial", "failed"):
        return EXIT_PENDING
    return {"succeeded": EXIT_OK, "partial": EXIT_PARTIAL}.get(status, EXIT_FAILED)


def final_status(counts: Counts) -> str:
    """succeeded: every image judged; partial: some in error or left pending; failed: pending and none judged."""
    if counts.pending:
        return "partial" if counts.inspected + counts.errors + counts.meanwhile else "failed"
    return "partial" if counts.errors else "succeeded"


@dataclass(frozen=True)
class _Task:
    """One submission: its future, and what to record when it fails."""

    image_set_id: int
    positions: tuple[int, ...]
    output: ArrayRef
    strip_tiles: bool = False
    # A strip's tile shards, which its future waits for: it is given a timeout per round of them (one shard's timeout
    # cancelled large strips every night), and they go when it is cancelled.
    parts: tuple = ()


def model_ref(model: Model, batch_size: int, runtime: str = "tensorflow", precision: str = "recorded", max_batch_pixels: int | None = None) -> ModelRef:
    """What workers need of a version; `precision` "recorded" (inspection.precision) runs the version's own, "float32" overrides it."""
    return ModelRef(uri=model.uri, sha256=model.sha256, classes=tuple(model.classes), batch_size=batch_size,
                    contract=InputContract.from_dict(model.input_spec), runtime=runtime,
                    precision=(model.precision or "float32") if precision == "recorded" else precision, max_batch_pixels=max_batch_pixels)


def check_tiling(model: Model, contract: InputContract, settings: InspectionSettings, image_sets: list[ImageSet]) -> None:
    """Strips are inspected in tiles: their size and halo must suit this model version's input contract."""
    strips = [image_set for image_set in image_sets if image_set.kind == "strip"]
    problem = contract.tiling_problem(settings.tile_size, settings.halo) if strips else None
    if problem:
        raise ConfigError(f"inspection.tile_size/halo for model {model.name}:{model.version} on image set {strips[0].id}: {problem}")


def verdict_rules(model: Model, settings: InspectionSettings) -> VerdictRules:
    """The model version's operating point, with what the settings (or the job) set explicitly over it."""
    from defectscan.model.registry import operating_rules

    recorded = operating_rules(model)
    overrides = {f: getattr(settings, f) for f in RULE_FIELDS if getattr(settings, f) is not None}
    if not overrides:
        return recorded
    return replace(recorded, **overrides, per_class=per_class_without(recorded.per_class, overrides))


def pending_positions(session: Session, image_set: ImageSet, model: Model, redo: str = "none") -> tuple[np.ndarray, int]:
    """Positions that need results under `redo` (see record_results), and how many are skipped as done."""
    positions = select(Image.position).where(Image.image_set_id == image_set.id)
    if redo != "all":
        done = select(Inspection.image_id).where(Inspection.model_id == model.id)
        if redo == "errors":
            done = done.where(Inspection.verdict != "error")
        positions = positions.where(Image.id.not_in(done))
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
        raise DataError(f"{image_set.uri}: {changes}")


@dataclass(frozen=True)
class RunContext:
    """What every shard of one run shares."""

    factory: sessionmaker[Session]
    client: Any
    model: Model
    ref: ModelRef
    rules: VerdictRules
    settings: InspectionSettings
    run_id: int
    retry: Retry
    redo: str
    gpu: bool
    # Dask keys must be unique on the scheduler: run and image set ids are numbered per database, and two
    # databases (staging and production) sharing one scheduler would get each other's results.
    key: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


def inspect_image_sets(
    factory: sessionmaker[Session],
    client,
    model: Model,
    image_sets: list[ImageSet],
    settings: InspectionSettings,
    *,
    max_in_flight: int,
    force: bool = False,
    retry_errors: bool = False,
    gpu: bool = False,
    job: str = "inspect",
    spec: dict[str, Any] | None = None,
    retry: Retry = Retry(),
    on_progress: Callable[[int, int], None] | None = None,
    on_started: Callable[[int], None] | None = None,
    waiting: list[str] | tuple[str, ...] = (),
) -> RunSummary:
    """Inspect every pending image of `image_sets` with `model` on the Dask `client`; returns the run's summary.

    Refuses before any work when the model file does not match its recorded sha256 or a store
    changed since registration. `force` redoes every image, `retry_errors` only those recorded
    as errors. A shard the machinery lost (worker killed past the retry budget, disk full) is
    not a verdict: its images stay pending for the next run. `on_started(job_run_id)` is called
    once the run's row exists, `on_progress(done, total)` as shards finish. SIGTERM/SIGINT
    (under `interrupts.stop_on_signals`) stop it at the next checkpoint, recorded `interrupted`.
    `waiting` names images not written yet (data.register.look_for_arrived): the run is partial for them.
    """
    # A set named twice (by id and by path) would be planned twice: its images inspected twice, counted twice.
    image_sets = list({image_set.id: image_set for image_set in image_sets}.values())
    ref = model_ref(model, settings.batch_size, settings.runtime, settings.precision, settings.max_batch_pixels)
    verify_model_file(ref)
    for image_set in image_sets:
        check_store_unchanged(image_set)
    check_tiling(model, ref.contract, settings, image_sets)
    rules = verdict_rules(model, settings)

    def close_abandoned() -> None:
        with factory.begin() as session:
            abandon_stale_runs(session, settings.stale_run_after_s)

    with_retries(close_abandoned, retry, "closing runs whose clients died")
    interrupts.check()
    run_id = open_run(factory, retry, job=job, spec=spec, model_id=model.id)
    summary = RunSummary(job_run_id=run_id, status="running", precision=ref.precision, errors=list(waiting))
    if on_started:
        on_started(run_id)
    redo = "all" if force else "errors" if retry_errors else "none"
    context = RunContext(factory, client, model, ref, rules, settings, run_id, retry, redo, gpu)
    began = time.perf_counter()
    try:
        plans = _plan(context, image_sets, summary)
        interrupts.check()
        if on_progress:
            on_progress(0, summary.n_images - summary.n_skipped)
        _run_tasks(context, plans, summary, max_in_flight=max_in_flight, on_progress=on_progress)
        summary.status = "partial" if waiting and final_status(summary.counts) == "succeeded" else final_status(summary.counts)
        log.info("job run %d: %s", run_id, summary.status)
    except Interrupted as exc:
        summary.status, summary.signal = "interrupted", exc.signum
        summary.errors.append(f"interrupted by {exc}")
        raise
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
        close_run(factory, retry, run_id, status=summary.status, errors=summary.errors, images_per_second=summary.images_per_second,
                  timings={"seconds": round(summary.seconds, 3), "precision": ref.precision, "precision_run": summary.precisions_run, "workers": {k: round(v, 3) for k, v in summary.worker_seconds.items()}})
    return summary


def _plan(context: RunContext, image_sets: list[ImageSet], summary: RunSummary) -> list[tuple[ImageSet, np.ndarray, ArrayRef | str]]:
    """The positions each image set needs, and its score array made ready before anything is submitted, or
    why it could not be (a storage fault: that set is left pending, the others go on; a conflict, e.g.
    another set's scores in the way, fails the run before any work). Counts go to the summary and the run's row."""
    plans = []
    with context.factory() as session:
        for image_set in image_sets:
            todo, skipped = pending_positions(session, image_set, context.model, context.redo)
            summary.n_images += len(todo) + skipped
            summary.n_skipped += skipped
            if context.redo == "none" and skipped:
                summary.still_in_error += session.scalar(
                    select(func.count()).select_from(Inspection).join(Image, Inspection.image_id == Image.id)
                    .where(Image.image_set_id == image_set.id, Inspection.model_id == context.model.id, Inspection.verdict == "error")) or 0
            if len(todo):
                plans.append((image_set, todo))
    with context.factory.begin() as session:
        session.execute(update(JobRun).where(JobRun.id == context.run_id).values(n_images=summary.n_images, n_skipped=summary.n_skipped))
    return [(image_set, todo, _prepare(context, image_set)) for image_set, todo in plans]


def _prepare(context: RunContext, image_set: ImageSet) -> ArrayRef | str:
    model, settings = context.model, context.settings
    attributes = {
        "model": {"name": model.name, "version": model.version, "sha256": model.sha256, "classes": list(model.classes)},
        "source": {"uri": image_set.uri, "array": image_set.array_path},
        "scores": "uint8: probability x 255",
    }
    try:
        return prepare_output(
            image_set.uri, image_set.kind, tuple(image_set.shape), len(model.classes), model.name, model.version,
            images_per_file=settings.batch_size, images_per_shard=settings.images_per_shard,
            tile_size=settings.tile_size, output_dir=settings.output_dir, attributes=attributes,
        )
    except StorageError as exc:
        return str(exc)


def _tasks(context: RunContext, plans, set_aside: Callable[[_Task, str], None]) -> Iterator[tuple[object, _Task]]:
    """Futures in submission order, created lazily so only the in-flight ones exist; an image set whose score
    array could not be made ready is `set_aside`, left pending with the reason."""
    client, settings, ref, run_id = context.client, context.settings, context.ref, context.run_id
    resources = {"GPU": 1} if context.gpu else None
    for image_set, todo, output in plans:
        attrs = image_set.attrs or {}
        source = ArrayRef(image_set.uri, image_set.array_path, bit_depth=attrs.get("bit_depth"), fill_missing=fills_missing_chunks(attrs))
        if isinstance(output, str):
            set_aside(_Task(image_set.id, tuple(int(p) for p in todo) if image_set.kind == "stack" else (0,), source), output)
            continue
        if image_set.kind == "stack":
            for shard in plan_stack(image_set.id, image_set.shape[0], settings.images_per_shard, todo):
                future = client.submit(
                    inspect_stack_shard, shard, source, output, ref, context.rules,
                    key=f"inspect-{run_id}-{context.key}-{image_set.id}-{shard.start}", resources=resources, pure=False,
                )
                yield future, _Task(image_set.id, shard.todo, output)
        else:
            height, width = image_set.shape
            tile_ref = replace(ref, batch_size=settings.tile_batch_size)
            tiles = [
                client.submit(
                    inspect_tiles, shard, source, output, tile_ref,
                    key=f"tiles-{run_id}-{context.key}-{image_set.id}-{i}", resources=resources, pure=False,
                )
                for i, shard in enumerate(plan_strip(image_set.id, height, width, settings.tile_size, settings.halo,
                                                     tiles_per_shard=settings.batch_size, contract=ref.contract))
            ]
            future = client.submit(judge_strip, image_set.id, output, ref, context.rules, *tiles, key=f"strip-{run_id}-{context.key}-{image_set.id}", pure=False)
            yield future, _Task(image_set.id, (0,), output, strip_tiles=True, parts=tuple(tiles))


# How long the run loop waits for a shard before it looks at the stop flag and the heartbeat again.
POLL_S = 0.5


def _run_tasks(context: RunContext, plans, summary: RunSummary, *, max_in_flight: int,
               on_progress: Callable[[int, int], None] | None) -> None:
    """Keep `max_in_flight` shards submitted and record each as it finishes; stop at once when asked to."""
    from distributed import wait

    total = summary.n_images - summary.n_skipped
    pending: dict[str, tuple[object, _Task, float]] = {}
    lost = _LostShards()
    done = 0

    def set_aside(task: _Task, reason: str) -> None:
        nonlocal done
        done += _left_pending(task, reason, summary, lost)
        if on_progress:
            on_progress(done, total)

    tasks = _tasks(context, plans, set_aside)

    def submit_next() -> None:
        item = next(tasks, None)
        if item is not None:
            pending[item[0].key] = (*item, time.monotonic())

    for _ in range(max_in_flight):
        submit_next()
    last_beat = time.monotonic()
    try:
        while pending:
            interrupts.check()
            try:
                finished = wait([future for future, _, _ in pending.values()], timeout=POLL_S, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                finished = set()
            overdue = _overdue(pending, finished, context.settings.shard_timeout_s, in_flight=max_in_flight)
            lost.timed_out.update(future.key for future in overdue)
            for future in [*finished, *overdue]:
                _, task, _ = pending.pop(future.key)
                done += _record_task(context, future, task, summary, lost)
                future.release()
                if on_progress:
                    on_progress(done, total)
                submit_next()
            if time.monotonic() - last_beat > context.settings.heartbeat_s:
                beat(context.factory, context.run_id)
                last_beat = time.monotonic()
    finally:
        # Interrupted or failed: nothing more should run for this run.
        if pending:
            context.client.cancel([part for future, task, _ in pending.values() for part in (future, *task.parts)])
    # First: why images were left pending is what a rerun needs, and the per-image errors can be many.
    summary.errors[:0] = lost.reasons()


class ShardTimeout(Exception):
    """A shard ran past inspection.shard_timeout_s: a hung worker or device, not a property of the images."""


def _overdue(pending: dict, finished, timeout_s: float | None, *, in_flight: int = 1) -> list:
    """Futures in flight for longer than `timeout_s` (counted from submission): cancelled, to be counted pending. A strip
    waits for its tile shards, `in_flight` of them at a time at most: it has one timeout per such round, and one more."""
    if timeout_s is None:
        return []
    now, late = time.monotonic(), []
    for future, task, submitted in pending.values():
        rounds = 1 + -(-len(task.parts) // max(1, in_flight)) if task.parts else 1
        if future not in finished and now - submitted > timeout_s * rounds:
            for part in (future, *task.parts):
                part.cancel()
            late.append(future)
    return late


def _record_task(context: RunContext, future, task: _Task, summary: RunSummary, lost: _LostShards) -> int:
    """Record one finished shard; a shard the machinery lost is counted pending, not recorded."""
    try:
        if future.key in lost.timed_out:
            raise ShardTimeout(f"a shard did not finish within inspection.shard_timeout_s ({context.settings.shard_timeout_s:g} s)")
        result: ShardResult = future.result()
    except Exception as exc:
        return _left_pending(task, _reason(exc), summary, lost)
    if result.failure is not None:
        return _left_pending(task, result.failure, summary, lost)
    for name, seconds in result.timings.items():
        summary.worker_seconds[name] = summary.worker_seconds.get(name, 0.0) + seconds
    if result.precisions:
        ran = "+".join(result.precisions)
        summary.precisions_run[ran] = summary.precisions_run.get(ran, 0) + len(result.results)
    counts = record_shard(
        context.factory, context.retry, job_run_id=context.run_id, model_id=context.model.id, image_set_id=task.image_set_id,
        results=result.results, mask_uri=task.output.uri, mask_array=task.output.path, redo=context.redo,
    )
    summary.counts.add(counts)
    for result_ in result.results:
        if result_.verdict == "error" and len(summary.errors) < 20:
            summary.errors.append(result_.error)
    return len(result.results)


def _left_pending(task: _Task, reason: str, summary: RunSummary, lost: _LostShards) -> int:
    lost.add(task, reason)
    summary.counts.pending += len(task.positions)
    log.warning("image set %d, positions %d..%d left pending: %s", task.image_set_id, task.positions[0], task.positions[-1], reason)
    return len(task.positions)


def _reason(exc: BaseException) -> str:
    if type(exc).__name__ == "KilledWorker":
        return "worker lost: the workers running it died more often than distributed.scheduler.allowed-failures allows"
    text = first_line(exc)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, DefectscanError) else text


class _LostShards:
    """Shards the machinery failed, grouped by reason, for one line each in the run's error."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[int]] = {}
        # Keys of the futures this run cancelled for running past inspection.shard_timeout_s.
        self.timed_out: set[str] = set()

    def add(self, task: _Task, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(len(task.positions))

    def reasons(self) -> list[str]:
        return [
            f"{sum(sizes)} images ({len(sizes)} shards) left pending, the next run inspects them: {reason}"
            for reason, sizes in self.by_reason.items()
        ]

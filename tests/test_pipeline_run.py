"""`inspect_image_sets` on a real LocalCluster (separate worker processes), real Zarr, SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr
from sqlalchemy import func, select

from defectscan.config import load_settings
from defectscan.db.schema import Defect, Image, Inspection, JobRun
from defectscan.errors import DataError, ModelError
from defectscan.exitcodes import EXIT_PENDING
from defectscan.model import rle
from defectscan.pipeline.outputs import scores_uri
from defectscan.pipeline.run import inspect_image_sets

from pipeline_helpers import add_model, corrupt_chunk, register, restore_chunk, save_threshold_model, square_images, write_stack, write_strip

DEFECTS = {1: (10, 10, 6), 5: (30, 40, 8), 17: (0, 0, 5)}


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8",
                                  "DEFECTSCAN_INSPECTION__TILE_SIZE": "128", "DEFECTSCAN_INSPECTION__HALO": "16"}).inspection


@pytest.fixture
def model_path(tmp_path):
    return save_threshold_model(tmp_path / "threshold.keras")


def _run(factory, cluster, model, image_sets, settings, **kwargs):
    return inspect_image_sets(factory, cluster, model, image_sets, settings, max_in_flight=2, **kwargs)


def _table(factory):
    with factory() as session:
        rows = session.execute(
            select(Image.image_set_id, Image.position, Inspection.verdict, Inspection.n_defects, Inspection.defect_pixels,
                   Inspection.max_score, Inspection.error)
            .join(Inspection, Inspection.image_id == Image.id).order_by(Image.image_set_id, Image.position)
        ).all()
        defects = session.execute(
            select(Image.position, Defect.class_name, Defect.bbox_y0, Defect.bbox_x0, Defect.bbox_y1, Defect.bbox_x1, Defect.area, Defect.rle)
            .join(Inspection, Defect.inspection_id == Inspection.id).join(Image, Inspection.image_id == Image.id)
            .order_by(Image.image_set_id, Image.position, Defect.bbox_y0)
        ).all()
    return [tuple(r) for r in rows], [tuple(d) for d in defects]


def test_stack_and_strip_are_inspected_recorded_and_rerun_safely(factory, cluster, settings, model_path, tmp_path):
    stack_path = write_stack(tmp_path / "L1.zarr", square_images(20, defects=DEFECTS))
    strip = square_images(1, size=512, seed=9)[0][:300, :500].copy()
    strip[100:110, 60:400] = 250  # a bar across three 128-pixel tiles
    strip_path = write_strip(tmp_path / "S1.zarr", strip)
    image_sets = [register(factory, stack_path), register(factory, strip_path)]
    model = add_model(factory, model_path)

    summary = _run(factory, cluster, model, image_sets, settings)
    assert summary.status == "succeeded"
    assert (summary.n_images, summary.n_skipped, summary.counts.inspected, summary.counts.errors) == (21, 0, 21, 0)

    rows, defects = _table(factory)
    stack_rows = [r for r in rows if r[0] == image_sets[0].id]
    assert [r[1] for r in stack_rows] == list(range(20))
    failed = {r[1]: r for r in stack_rows if r[2] == "fail"}
    assert sorted(failed) == sorted(DEFECTS)
    for position, (y, x, side) in DEFECTS.items():
        assert failed[position][3:5] == (1, side * side)
        assert failed[position][5] > 0.9
    assert all(r[3] == 0 and r[5] < 0.5 for r in stack_rows if r[1] not in DEFECTS)

    strip_defects = [d for d in defects if d[0] == 0 and d[2] == 100 and d[3] == 60]
    assert strip_defects == [(0, "defect", 100, 60, 110, 400, 3400, "0 3400")]
    assert rle.decode(strip_defects[0][7], (10, 340)).all()

    # probability maps next to the image set, one array per model version
    scores = zarr.open_array(scores_uri(str(stack_path), None), path="threshold/1", mode="r")
    assert scores.shape == (20, 1, 64, 64)
    y, x, side = DEFECTS[5]
    assert scores[5, 0, y : y + side, x : x + side].min() > 230
    assert scores[4].max() < 128

    with factory() as session:
        run = session.get(JobRun, summary.job_run_id)
        assert (run.status, run.n_images, run.n_inspected, run.n_errors, run.n_defects) == ("succeeded", 21, 21, 0, 4)
        assert run.finished_at is not None and run.images_per_second > 0

    again = _run(factory, cluster, model, image_sets, settings)
    assert (again.status, again.n_images, again.n_skipped, again.counts.inspected) == ("succeeded", 21, 21, 0)
    assert _table(factory) == (rows, defects)

    with factory() as session:
        first_ids = set(session.scalars(select(Inspection.id)))
    forced = _run(factory, cluster, model, image_sets, settings, force=True)
    assert (forced.n_skipped, forced.counts.inspected) == (0, 21)
    assert _table(factory) == (rows, defects)
    with factory() as session:
        assert not first_ids & set(session.scalars(select(Inspection.id)))
        assert session.scalar(select(func.count()).select_from(Inspection)) == 21


def test_model_file_that_does_not_match_is_refused_before_any_work(factory, cluster, settings, model_path, tmp_path):
    image_set = register(factory, write_stack(tmp_path / "L2.zarr", square_images(4)))
    model = add_model(factory, model_path)
    with model_path.open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelError, match="does not match its registered checksum"):
        _run(factory, cluster, model, [image_set], settings)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(JobRun)) == 0
        assert session.scalar(select(func.count()).select_from(Inspection)) == 0


def test_unreadable_chunk_is_an_error_row_and_the_run_partial(factory, cluster, settings, model_path, tmp_path):
    path = write_stack(tmp_path / "L3.zarr", square_images(12, defects={3: (5, 5, 6)}))
    image_set = register(factory, path)
    model = add_model(factory, model_path)
    good = corrupt_chunk(path, 7)

    summary = _run(factory, cluster, model, [image_set], settings)
    assert (summary.status, summary.counts.inspected, summary.counts.errors) == ("partial", 11, 1)
    rows, _ = _table(factory)
    errors = [r for r in rows if r[2] == "error"]
    assert [r[1] for r in errors] == [7]
    assert "cannot read image 7" in errors[0][6]
    assert [r[1] for r in rows if r[2] == "fail"] == [3]
    with factory() as session:
        assert session.get(JobRun, summary.job_run_id).status == "partial"

    # Redoing image 7 writes its map only: image 6's, in the same shard and recorded, stays as it was.
    scores = zarr.open_array(scores_uri(str(path), None), path="threshold/1", mode="r+")
    scores[6] = 77
    restore_chunk(path, 7, good)
    retried = _run(factory, cluster, model, [image_set], settings, retry_errors=True)
    assert (retried.status, retried.counts.inspected) == ("succeeded", 1)
    assert (scores[6] == 77).all() and not (scores[7] == 77).any()


def test_a_strip_with_a_corrupt_chunk_is_an_error_row_not_left_pending(factory, cluster, settings, model_path, tmp_path):
    path = write_strip(tmp_path / "S2.zarr", square_images(1, size=512, seed=3)[0][:300, :500].copy())
    image_set = register(factory, path)
    model = add_model(factory, model_path)
    (path / "images" / "c" / "1" / "2").write_bytes(b"not zstd at all")

    summary = _run(factory, cluster, model, [image_set], settings)
    assert (summary.status, summary.counts.inspected, summary.counts.errors, summary.counts.pending) == ("partial", 0, 1, 0)
    rows, _ = _table(factory)
    assert [(r[1], r[2]) for r in rows] == [(0, "error")]
    assert f"cannot read {path}: RuntimeError" in rows[0][6]


def test_a_chunk_gone_since_registration_is_an_error_row_never_a_verdict_on_a_blank_image(factory, cluster, settings, model_path, tmp_path):
    """Zarr reads a chunk that is not stored as zeros: judged, a deleted image would pass as a blank one."""
    path = write_stack(tmp_path / "L6.zarr", square_images(12, defects={3: (5, 5, 6)}))
    image_set = register(factory, path)
    model = add_model(factory, model_path)
    deleted, folder = path / "images" / "c" / "5" / "0" / "0", path / "images" / "c" / "9" / "0" / "0"
    kept = {deleted: deleted.read_bytes(), folder: folder.read_bytes()}
    deleted.unlink()
    folder.unlink()
    folder.mkdir()  # its path now a folder: zarr's local store reads that as missing too

    summary = _run(factory, cluster, model, [image_set], settings)
    assert (summary.status, summary.counts.inspected, summary.counts.errors) == ("partial", 10, 2)
    rows, _ = _table(factory)
    errors = {r[1]: r[6] for r in rows if r[2] == "error"}
    assert sorted(errors) == [5, 9]
    assert errors[5] == f"image 5 of file://{path}/images: 1 chunk(s) missing: (5, 0, 0), stored when the set was registered"
    assert [r[1] for r in rows if r[2] == "fail"] == [3]

    folder.rmdir()
    for chunk, good in kept.items():
        chunk.write_bytes(good)
    retried = _run(factory, cluster, model, [image_set], settings, retry_errors=True)
    assert (retried.status, retried.counts.inspected, retried.counts.errors) == ("succeeded", 2, 0)


def test_a_store_registered_without_the_chunk_check_reads_chunks_it_never_stored_as_fill(factory, cluster, settings, model_path, tmp_path):
    """--no-chunk-check: its writer leaves out chunks equal to the fill value, a black image has none; it is judged."""
    import zarr

    from defectscan.data.register import register_store

    images = square_images(6)
    images[2] = 0
    path = tmp_path / "W.zarr"
    group = zarr.open_group(path, mode="w")
    group.create_array("images", shape=images.shape, chunks=(1, *images.shape[1:]), dtype=images.dtype, fill_value=0,
                       config={"write_empty_chunks": False})[...] = images
    assert not (path / "images" / "c" / "2" / "0" / "0").exists()
    with factory() as session:
        image_set = register_store(session, str(path), check_chunks=False).image_set
    summary = _run(factory, cluster, add_model(factory, model_path), [image_set], settings)
    assert (summary.status, summary.counts.inspected, summary.counts.errors) == ("succeeded", 6, 0), summary.errors


def test_a_strip_tile_gone_since_registration_is_an_error_row(factory, cluster, settings, model_path, tmp_path):
    path = write_strip(tmp_path / "S3.zarr", square_images(1, size=512, seed=3)[0][:300, :500].copy())
    image_set = register(factory, path)
    model = add_model(factory, model_path)
    (path / "images" / "c" / "1" / "2").unlink()

    summary = _run(factory, cluster, model, [image_set], settings)
    assert (summary.status, summary.counts.inspected, summary.counts.errors, summary.counts.pending) == ("partial", 0, 1, 0)
    rows, _ = _table(factory)
    assert [(r[1], r[2]) for r in rows] == [(0, "error")]
    assert "1 chunk(s) missing: (1, 2), stored when the strip was registered" in rows[0][6]


def test_a_set_whose_score_store_cannot_be_made_is_left_pending_and_the_others_are_inspected(factory, cluster, settings, model_path, tmp_path):
    """One set's storage fault used to fail the run: the other sets' shards in flight were cancelled, later sets never ran."""
    first = register(factory, write_stack(tmp_path / "A.zarr", square_images(6)))
    corrupt_chunk(tmp_path / "A.zarr", 2)  # an image error too: the pending reason must not be hidden behind such lines
    blocked = register(factory, write_stack(tmp_path / "B.zarr", square_images(5)))
    last = register(factory, write_stack(tmp_path / "C.zarr", square_images(4)))
    model = add_model(factory, model_path)
    in_the_way = Path(scores_uri(str(tmp_path / "B.zarr"), None))
    in_the_way.write_text("a file where the score store goes")

    summary = _run(factory, cluster, model, [first, blocked, last], settings)
    assert (summary.status, summary.counts.inspected, summary.counts.errors, summary.counts.pending, summary.exit_code) == ("partial", 9, 1, 5, EXIT_PENDING)
    assert summary.errors[0].startswith(f"5 images (1 shards) left pending, the next run inspects them: {in_the_way}: cannot create the score array"), summary.errors
    assert len(summary.errors) == 2 and "image 2 of" in summary.errors[1]
    rows, _ = _table(factory)
    assert sorted({r[0] for r in rows}) == [first.id, last.id]

    in_the_way.unlink()
    rerun = _run(factory, cluster, model, [first, blocked, last], settings)
    assert (rerun.status, rerun.counts.inspected, rerun.n_skipped) == ("succeeded", 5, 10)


def test_a_set_named_twice_is_inspected_once(factory, cluster, settings, model_path, tmp_path):
    image_set = register(factory, write_stack(tmp_path / "D.zarr", square_images(5, defects={1: (5, 5, 6)})))
    model = add_model(factory, model_path)
    summary = _run(factory, cluster, model, [image_set, image_set], settings)
    assert (summary.n_images, summary.counts.inspected, summary.counts.meanwhile) == (5, 5, 0)
    forced = _run(factory, cluster, model, [image_set, image_set], settings, force=True)
    assert (forced.n_images, forced.counts.inspected, forced.counts.defects) == (5, 5, 1)


def test_a_run_does_not_take_a_result_another_database_left_on_a_shared_scheduler(factory, cluster, settings, model_path, tmp_path):
    """Run and image set ids are numbered per database: staging's run 1 on its set 1 held the key production's run 1 asked for."""
    from functools import partial

    from defectscan.pipeline.worker import ShardResult

    image_set = register(factory, write_stack(tmp_path / "E.zarr", square_images(4)))
    model = add_model(factory, model_path)
    other = cluster.submit(partial(ShardResult, image_set.id, [], failure="a shard of another database"), key=f"inspect-1-{image_set.id}-0", pure=False)
    other.result()
    try:
        summary = _run(factory, cluster, model, [image_set], settings)
        assert summary.job_run_id == 1
        assert (summary.status, summary.counts.inspected, summary.counts.pending) == ("succeeded", 4, 0), summary.errors
    finally:
        other.release()


def test_changed_store_is_refused(factory, cluster, settings, model_path, tmp_path):
    path = write_stack(tmp_path / "L4.zarr", square_images(4))
    image_set = register(factory, path)
    model = add_model(factory, model_path)
    zarr.open_group(path, mode="a").attrs["lot"] = "L4-renamed"
    with pytest.raises(DataError, match="changed since it was registered"):
        _run(factory, cluster, model, [image_set], settings)


def test_a_threshold_setting_overrides_the_registered_one(factory, cluster, settings, model_path, tmp_path):
    # pixels of 236 score about 0.89 with the threshold model: a defect at threshold 0.5, none at 0.95
    images = square_images(4, defects={1: (10, 10, 6)})
    images[1, 10:16, 10:16] = 236
    image_set = register(factory, write_stack(tmp_path / "L5.zarr", images))
    model = add_model(factory, model_path, threshold=0.5)
    strict = settings.model_copy(update={"threshold": 0.95})
    summary = _run(factory, cluster, model, [image_set], strict)
    assert (summary.status, summary.counts.defects) == ("succeeded", 0)
    forced = _run(factory, cluster, model, [image_set], settings, force=True)
    assert forced.counts.defects == 1


def test_a_lot_whose_every_image_is_in_error_is_incomplete_never_released(factory, cluster, settings, model_path, tmp_path):
    """lots list, lots show and the QA report share one disposition: no judged image, no release."""
    from defectscan.db.queries import Filters, list_lots, lot_disposition, lot_summary
    from defectscan.report.build import HoldRules, ReportOptions, Scope, collect

    path = write_stack(tmp_path / "LE.zarr", square_images(3), lot="LE")
    image_set = register(factory, path)
    model = add_model(factory, model_path)
    for position in range(3):
        (path / "images" / "c" / str(position) / "0" / "0").write_bytes(b"not zstd at all")
    summary = _run(factory, cluster, model, [image_set], settings)
    assert summary.counts.errors == 3 and summary.counts.inspected == 0
    with factory() as session:
        assert [(r["lot"], r["errors"], r["verdict"], r["defect_rate"]) for r in list_lots(session, Filters(lot="LE")).rows] == [
            ("LE", 3, "incomplete", None)]  # no rate of no judged image (0.0 read as a perfect lot)
        assert [m["verdict"] for m in lot_summary(session, "LE")["models"]] == ["incomplete"]
        # even with errors allowed by the report's own rule, a lot nobody judged is not released
        context = collect(session, Scope(lot="LE"), ReportOptions(rules=HoldRules(max_errors=10)))
    assert [(lot["label"], lot["disposition"]) for lot in context["lots"]] == [("LE", "incomplete")]
    assert context["held"] == 1
    assert (lot_disposition(3, 0, 2, 0.05), lot_disposition(3, 0, 2, 0.05, max_errors=2), lot_disposition(3, 1, 0, 0.05),
            lot_disposition(40, 1, 0, 0.05)) == ("hold", "release", "hold", "release")


def test_a_strip_is_given_the_timeout_of_each_of_its_tile_shards_and_goes_with_them(monkeypatch):
    """The strip's one future waits for all its tile shards: one shard's timeout cancelled large strips every night."""
    from defectscan.pipeline import run as run_module
    from defectscan.pipeline.worker import ArrayRef

    class Future:
        def __init__(self):
            self.cancelled = False

        def cancel(self):
            self.cancelled = True

    tiles = tuple(Future() for _ in range(3))
    strip, shard = Future(), Future()
    output = ArrayRef("s.zarr", "scores")
    pending = {"strip": (strip, run_module._Task(1, (0,), output, strip_tiles=True, parts=tiles), 100.0),
               "shard": (shard, run_module._Task(2, (0, 1), output), 100.0)}
    monkeypatch.setattr(run_module.time, "monotonic", lambda: 102.5)
    assert run_module._overdue(pending, set(), 1.0, in_flight=2) == [shard]  # 2.5 s: past one shard's 1 s, within the strip's (1 + 2 rounds) x 1 s
    assert not strip.cancelled
    monkeypatch.setattr(run_module.time, "monotonic", lambda: 103.5)
    assert run_module._overdue({"strip": pending["strip"]}, set(), 1.0, in_flight=2) == [strip]
    assert strip.cancelled and all(tile.cancelled for tile in tiles)

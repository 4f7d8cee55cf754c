"""The per-day rollup `inspection_daily`: kept equal to a recount by the real pipeline, and read by the lots queries.

One real LocalCluster run per backend on a stack whose capture times cross a UTC midnight (with
an unreadable image) and a stack without capture times, then a rerun, then a forced rerun.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from defectscan.config import load_settings
from defectscan.db.queries import Filters, _lot_row, _lots_query, list_lots
from defectscan.db.schema import NO_DAY, Image, Inspection, InspectionDaily
from defectscan.pipeline.run import inspect_image_sets
from pipeline_helpers import add_model, register, save_threshold_model, square_images, write_stack
from queries_helpers import add_keys_and_times

UTC = dt.timezone.utc
# Twelve images a minute apart from 23:55: five on March 1st, seven on March 2nd (UTC).
START = dt.datetime(2026, 3, 1, 23, 55, tzinfo=UTC)


def _run(factory, client, model, image_sets, **kwargs):
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8",
                                      "DEFECTSCAN_INSPECTION__TILE_SIZE": "128", "DEFECTSCAN_INSPECTION__HALO": "16"}).inspection
    return inspect_image_sets(factory, client, model, image_sets, settings, max_in_flight=2, **kwargs)


def _recount(factory) -> dict:
    """inspection_daily as it should be, counted from the raw rows (days computed here, not in SQL)."""
    expected: dict = {}
    with factory() as session:
        rows = session.execute(
            select(Image.image_set_id, Inspection.model_id, Image.acquired_at, Inspection.verdict, Inspection.n_defects)
            .join(Inspection, Inspection.image_id == Image.id)
        ).all()
    for image_set_id, model_id, when, verdict, n_defects in rows:
        day = when.astimezone(UTC).date() if when else NO_DAY
        images, failed, errors, defects, first, last = expected.get((image_set_id, model_id, day), (0, 0, 0, 0, None, None))
        times = [t for t in (first, when) if t], [t for t in (last, when) if t]
        expected[(image_set_id, model_id, day)] = (
            images + 1, failed + (verdict == "fail"), errors + (verdict == "error"), defects + n_defects,
            min(times[0], default=None), max(times[1], default=None),
        )
    return expected


def _rollup(factory) -> dict:
    with factory() as session:
        return {(r.image_set_id, r.model_id, r.day): (r.images, r.failed, r.errors, r.defects, r.first_at, r.last_at)
                for r in session.scalars(select(InspectionDaily))}


@pytest.fixture
def inspected(factory, cluster, tmp_path):
    timed = write_stack(tmp_path / "T1.zarr", square_images(12, defects={3: (5, 5, 6), 6: (10, 10, 4), 9: (0, 0, 5)}), lot="T1")
    add_keys_and_times(timed, [f"T1-{i:02d}" for i in range(12)], [START + dt.timedelta(minutes=i) for i in range(12)])
    chunk = timed / "images" / "c" / "7" / "0" / "0"
    good_chunk = chunk.read_bytes()
    chunk.write_bytes(b"not zstd at all")
    untimed = write_stack(tmp_path / "U1.zarr", square_images(4, defects={2: (5, 5, 6)}, seed=3), lot="U1")
    image_sets = [register(factory, timed), register(factory, untimed)]
    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    summary = _run(factory, cluster, model, image_sets)
    assert (summary.status, summary.counts.errors) == ("partial", 1)
    return image_sets, model, chunk, good_chunk


def test_rollup_equals_a_recount_after_run_rerun_and_force(factory, cluster, inspected):
    image_sets, model, chunk, good_chunk = inspected
    after_run = _rollup(factory)
    assert after_run == _recount(factory)
    days = {day: counts[:4] for (_, _, day), counts in after_run.items()}
    # images 0-4 on March 1st, 5-11 on March 2nd (7 unreadable, 9 and 6 failed), the untimed set on NO_DAY
    assert days == {dt.date(2026, 3, 1): (5, 1, 0, 1), dt.date(2026, 3, 2): (7, 2, 1, 2), NO_DAY: (4, 1, 0, 1)}

    again = _run(factory, cluster, model, image_sets)
    assert again.n_skipped == 16
    assert _rollup(factory) == after_run

    chunk.write_bytes(good_chunk)  # image 7 readable again: the forced run turns its error into a pass
    forced = _run(factory, cluster, model, image_sets, force=True)
    assert (forced.status, forced.counts.inspected, forced.counts.errors) == ("succeeded", 16, 0)
    after_force = _rollup(factory)
    assert after_force == _recount(factory)
    assert after_force[(image_sets[0].id, model.id, dt.date(2026, 3, 2))][:4] == (7, 2, 0, 2)


# (filters, whether the rollup can serve them)
WINDOWS = [
    ({}, True),
    ({"since": START + dt.timedelta(minutes=3)}, True),  # mid-day start: an edge, then March 2nd from the rollup
    ({"until": START + dt.timedelta(minutes=8)}, True),  # mid-day end: March 1st from the rollup, then an edge
    ({"since": dt.datetime(2026, 2, 28, 12, tzinfo=UTC), "until": START + dt.timedelta(minutes=8)}, True),
    ({"since": START + dt.timedelta(minutes=3), "until": dt.datetime(2026, 3, 3, tzinfo=UTC)}, True),
    ({"since": dt.datetime(2026, 3, 2, tzinfo=UTC)}, True),  # at midnight: no edge
    ({"since": dt.datetime(2026, 3, 1, 5, tzinfo=dt.timezone(dt.timedelta(hours=5))), "lot": "T1", "model": "threshold:1"}, True),
    ({"until": dt.datetime(2026, 3, 2, 23, tzinfo=UTC), "line": "A", "product": "P", "camera": "C1"}, True),
    ({"since": START + dt.timedelta(minutes=3), "until": START + dt.timedelta(minutes=8)}, False),  # no whole day
    ({"since": START, "verdict": "fail"}, False),  # a filter the rollup does not hold
]


def test_lots_from_the_rollup_equal_the_raw_query(factory, inspected):
    for window, rollup in WINDOWS:
        filters = Filters(**window)
        with factory() as session:
            query = _lots_query(session, filters)
            assert ("inspection_daily" in str(query)) == rollup, window
            raw = session.execute(_lots_query(session, filters, rollup=False)).all()
            assert sorted(session.execute(query).all()) == sorted(raw), window
            listed = list_lots(session, filters, limit=10).rows
        expected = [_lot_row(r, (0.05, 0)) for r in raw]
        for row in expected:
            row.pop("model_id")
        assert sorted(listed, key=lambda r: r["lot"]) == sorted(expected, key=lambda r: r["lot"]), window
        assert sum(r["images"] for r in listed) > 0, window
        # images without a capture time (lot U1) count only when no time filter is given
        assert ("U1" in {r["lot"] for r in listed}) == (not {"since", "until"} & set(window)), window

"""The report's SQL aggregations on rows written by the real pipeline, on SQLite and PostgreSQL.

Expected values come from how the test data was built (report_helpers.LOTS) or from plain SQL
over the stored rows, never from the code under test.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from defectscan.db import queries_report as q
from defectscan.db.queries import Filters
from defectscan.errors import DataError
from defectscan.model import rle
from db_helpers import query
from report_helpers import ERROR_LOT, ERROR_POSITION, LOTS, N_IMAGES, NOT_INSPECTED_LOT, SCRIPT_LOT, SIZE, session_for

ALL = Filters(line="A")


@pytest.fixture
def session(report_db):
    factory, close = session_for(report_db.url)
    with factory() as session:
        yield session
    close()


def _areas():
    return [side * side for defects in LOTS.values() for _, _, side in defects.values()]


def test_totals_count_images_verdicts_and_defects(session):
    totals = q.totals(session, ALL)
    n_failed = sum(len(d) for d in LOTS.values())
    assert totals == {
        "images": N_IMAGES * len(LOTS), "passed": N_IMAGES * len(LOTS) - n_failed - 1, "failed": n_failed, "errors": 1,
        "defects": n_failed, "defect_pixels": sum(_areas()), "first_at": "2026-03-02T06:00:00Z", "last_at": "2026-03-06T09:00:00Z",
        "lots": len(LOTS),
    }
    assert q.totals(session, Filters(lot="L2"))["failed"] == 0


def test_lot_groups_count_each_lot_in_capture_order_and_limit_to_the_latest(session):
    groups, total = q.lot_groups(session, ALL, limit=100)
    assert total == len(LOTS)
    assert [g["label"] for g in groups] == list(LOTS)
    for g in groups:
        assert (g["images"], g["failed"], g["defects"]) == (N_IMAGES, len(LOTS[g["label"]]), len(LOTS[g["label"]]))
        assert g["errors"] == (1 if g["label"] == ERROR_LOT else 0)
    latest, total = q.lot_groups(session, ALL, limit=2)
    assert [g["label"] for g in latest] == ["L4", SCRIPT_LOT] and total == len(LOTS)


def test_hour_groups_bucket_capture_times_by_utc_hour(session):
    groups, total = q.hour_groups(session, Filters(lot="L1"), limit=100)
    # L1's twelve images are 15 minutes apart from 06:00; its one defect is image 2 (06:30)
    assert [(g["label"], g["images"], g["failed"]) for g in groups] == [
        ("2026-03-02 06:00", 4, 1), ("2026-03-02 07:00", 4, 0), ("2026-03-02 08:00", 4, 0)]
    assert total == 3
    assert [g["label"] for g in q.hour_groups(session, Filters(lot="L1"), limit=2)[0]] == ["2026-03-02 07:00", "2026-03-02 08:00"]


def test_area_bins_and_position_grid_match_the_drawn_squares(session):
    areas = _areas()
    edges = (16, 32, 64)
    assert q.area_counts(session, ALL, edges) == [sum(16 <= a < 32 for a in areas), sum(32 <= a < 64 for a in areas), sum(a >= 64 for a in areas)]
    # an area under the first edge falls in no bin
    assert sum(q.area_counts(session, ALL, (30, 50))) == sum(a >= 30 for a in areas)
    with pytest.raises(DataError, match="increasing"):
        q.area_counts(session, ALL, (8, 4))

    size = 4
    expected = Counter()
    for defects in LOTS.values():
        for y, x, side in defects.values():
            cy, cx = y + (side - 1) / 2, x + (side - 1) / 2
            expected[(math.floor(cy * size / SIZE), math.floor(cx * size / SIZE))] += 1
    grid = q.position_grid(session, ALL, size)
    assert {(r, c): n for r, row in enumerate(grid) for c, n in enumerate(row) if n} == dict(expected)


def test_class_counts_agree_with_plain_sql(session, report_db):
    stored = query(report_db.url, "SELECT class_name, count(*), sum(area) FROM defects GROUP BY class_name")
    assert [(c["class"], c["defects"], c["area"]) for c in q.class_counts(session, ALL)] == [(n, int(d), int(a)) for n, d, a in stored]


def test_worst_images_are_the_failed_ones_with_most_defect_pixels_with_decodable_masks(session):
    worst = q.worst_images(session, ALL, 3)
    ranked = sorted(((side * side, lot, pos) for lot, d in LOTS.items() for pos, (_, _, side) in d.items()), reverse=True)
    assert [(w["defect_pixels"], w["lot"], w["source"].position) for w in worst] == ranked[:3]
    for w in worst:
        y, x, side = LOTS[w["lot"]][w["source"].position]
        (defect,) = w["defects"]
        assert defect["bbox"] == [y, x, y + side, x + side]
        assert rle.decode(defect["rle"], (side, side)).all()
        assert w["source"].mask_uri and w["source"].mask_array
    assert q.worst_images(session, Filters(lot="L2"), 3) == []


def test_errors_unjudged_images_and_job_runs(session, report_db):
    (error,) = q.error_images(session, ALL, limit=10)
    assert (error["lot"], error["position"], error["job_run"]) == (ERROR_LOT, ERROR_POSITION, report_db.job_run_id)
    assert f"cannot read image {ERROR_POSITION}" in error["error"]
    model_id = q.scope_models(session, ALL)[0]["id"]
    count, listed = q.not_inspected(session, ALL, model_id, limit=5)
    assert count == N_IMAGES and len(listed) == 5 and {i["lot"] for i in listed} == {NOT_INSPECTED_LOT}
    assert q.not_inspected(session, Filters(lot="L1"), model_id, limit=5) == (0, [])
    (run,) = q.job_runs(session, ALL)
    assert (run["id"], run["status"], run["inspected"], run["errors"]) == (report_db.job_run_id, "partial", N_IMAGES * len(LOTS) - 1, 1)


def test_scope_models_and_model_info(session):
    (model,) = q.scope_models(session, ALL)
    assert (model["label"], model["inspections"]) == ("threshold:1", N_IMAGES * len(LOTS))
    info = q.model_info(session, "threshold:1")
    assert info["classes"] == ["defect"] and len(info["sha256"]) == 64
    assert q.scope_models(session, Filters(lot=NOT_INSPECTED_LOT)) == []


def test_two_class_results_group_by_class_and_hour_on_both_backends(results_db):
    factory, close = session_for(results_db.url)
    try:
        with factory() as session:
            stored = query(results_db.url, "SELECT class_name, count(*), count(DISTINCT inspection_id), sum(area) FROM defects "
                                           "GROUP BY class_name ORDER BY count(*) DESC, class_name")
            assert [(c["class"], c["defects"], c["images"], c["area"]) for c in q.class_counts(session, Filters())] == [
                (n, int(d), int(i), int(a)) for n, d, i, a in stored]
            # L042's six images are one minute apart from 08:00: one hour bucket
            groups, _ = q.hour_groups(session, Filters(lot="L042"), limit=10)
            failed = query(results_db.url, "SELECT count(*) FROM inspections i JOIN images m ON i.image_id = m.id JOIN image_sets s "
                                           "ON m.image_set_id = s.id WHERE s.lot = 'L042' AND i.verdict = 'fail'")[0][0]
            assert [(g["label"], g["images"], g["failed"]) for g in groups] == [("2026-03-01 08:00", 6, failed)]
    finally:
        close()

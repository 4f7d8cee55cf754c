"""db/queries.py and report/pixels.py as a library: parsing, validation, counts, pixel loading errors."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace

import pytest

from defectscan.db.queries import Filters, count_defects, get_defect, get_image, list_defects, list_lots, lot_summary, parse_when
from defectscan.db.session import make_engine, session_factory
from defectscan.errors import DataError
from defectscan.report.pixels import defect_masks, load_image, load_scores

from db_helpers import query
from queries_helpers import L042_START

UTC = dt.timezone.utc


@pytest.fixture
def session(results_db):
    engine = make_engine(results_db.url)
    with session_factory(engine)() as session:
        yield session
    engine.dispose()


@pytest.mark.parametrize(
    ("text", "end_of_day", "expected"),
    [
        ("2026-03-01", False, dt.datetime(2026, 3, 1, tzinfo=UTC)),
        ("2026-03-01", True, dt.datetime(2026, 3, 2, tzinfo=UTC)),
        ("2026-03-01T08:30:00Z", True, dt.datetime(2026, 3, 1, 8, 30, tzinfo=UTC)),
        ("2026-03-01T08:30:00+02:00", False, dt.datetime(2026, 3, 1, 6, 30, tzinfo=UTC)),
        ("2026-03-01 08:30", False, dt.datetime(2026, 3, 1, 8, 30, tzinfo=UTC)),
        # every spelling of a bare date is the whole day, not its first instant
        ("20260301", True, dt.datetime(2026, 3, 2, tzinfo=UTC)),
        ("20260301", False, dt.datetime(2026, 3, 1, tzinfo=UTC)),
        ("2026-03-01Z", True, dt.datetime(2026, 3, 2, tzinfo=UTC)),
        ("2026-W09-7", True, dt.datetime(2026, 3, 2, tzinfo=UTC)),
        # a day in a time zone is that day there (fromisoformat read the offset's sign as the date-time separator)
        ("2026-03-01-05:00", True, dt.datetime(2026, 3, 2, 5, tzinfo=UTC)),
        ("2026-03-02+02:00", False, dt.datetime(2026, 3, 1, 22, tzinfo=UTC)),
        ("20260301-0500", True, dt.datetime(2026, 3, 2, 5, tzinfo=UTC)),  # basic form, hour-only and week dates too
        ("2026-03-02+02", False, dt.datetime(2026, 3, 1, 22, tzinfo=UTC)),
        ("2026-W09-7+02:00", True, dt.datetime(2026, 3, 1, 22, tzinfo=UTC)),
        ("2026-W09-7Z", False, dt.datetime(2026, 3, 1, tzinfo=UTC)),
        ("2026-W09T08:00", False, dt.datetime(2026, 2, 23, 8, tzinfo=UTC)),
    ],
)
def test_parse_when(text, end_of_day, expected):
    assert parse_when(text, "--since", end_of_day=end_of_day) == expected


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01", "01/03/2026", "2026-03-01T25:00", "2026-03-01x08:00", "20260301_0800"])
def test_parse_when_refuses_what_is_not_iso(text):
    with pytest.raises(DataError, match=r"^--until .*: expected an ISO 8601 date or time"):
        parse_when(text, "--until")


def test_parse_when_refuses_the_day_after_the_last_one():
    with pytest.raises(DataError, match=r"^--until '9999-12-31': expected an ISO 8601 date or time"):
        parse_when("9999-12-31", "--until", end_of_day=True)


@pytest.mark.parametrize("name", ["min_score", "max_score"])
def test_filters_refuse_a_score_that_is_not_a_number(name):
    with pytest.raises(DataError, match=rf"^--{name.replace('_', '-')} nan: expected a score between 0 and 1$"):
        Filters(**{name: float("nan")})


def test_hold_rules_refuse_a_share_that_is_not_a_number(session):
    """NaN compares false with every share: taken as a rule, it would release every lot."""
    for call in (lambda: list_lots(session, hold_above=float("nan")), lambda: lot_summary(session, "L042", hold_above=float("nan"))):
        with pytest.raises(DataError, match=r"^--hold-above nan: expected a share between 0 and 1$"):
            call()


def test_filters_refuse_bad_verdicts_and_pages(session):
    with pytest.raises(DataError, match="verdict 'maybe': expected one of pass, fail, error"):
        Filters(verdict="maybe")
    with pytest.raises(DataError, match="--limit 0"):
        list_defects(session, limit=0)
    with pytest.raises(DataError, match="sort 'size': expected one of id, time, area, score, class"):
        list_defects(session, sort="size")


def test_counts_are_done_in_sql_and_agree_with_the_listing(session, results_db):
    for filters in (Filters(), Filters(lot="L042"), Filters(defect_class="dark"), Filters(since=L042_START + dt.timedelta(minutes=3))):
        assert count_defects(session, filters) == len(list_defects(session, filters, limit=1000).rows)
    assert count_defects(session) == query(results_db.url, "SELECT count(*) FROM defects")[0][0]


def test_lot_filter_sorts_its_rows_the_same_as_without_it(session):
    """The lot path orders by an expression instead of a column: same order as the plain path."""
    every = [r for r in list_defects(session, sort="area", descending=False, limit=100).rows if r["lot"] == "L042"]
    assert [r["id"] for r in list_defects(session, Filters(lot="L042"), sort="area", descending=False).rows] == [r["id"] for r in every]


def test_lots_and_summary_library_shapes(session):
    page = list_lots(session, limit=1)
    assert page.more and [r["lot"] for r in page.rows] == ["L043"] and "model_id" not in page.rows[0]
    # The lot nothing inspected yet (L044) comes after the inspected ones, paged with them.
    pages = [list_lots(session, limit=2, offset=offset) for offset in (0, 2, 3)]
    assert [([r["lot"] for r in p.rows], p.more) for p in pages] == [(["L043", "L042"], True), (["L044"], False), ([], False)]
    assert [r["lot"] for r in list_lots(session, limit=3).rows] == ["L043", "L042", "L044"]
    assert [r["lot"] for r in list_lots(session, Filters(model="twoclass")).rows] == ["L043", "L042"]
    summary = lot_summary(session, "L043", Filters(model="twoclass"))
    assert summary["image_sets"] == 2 and summary["registered_images"] == 5
    with pytest.raises(DataError, match="unknown lot 'nope'"):
        lot_summary(session, "nope")


def test_pixels_of_an_image_and_of_its_scores(session, results_db):
    (image_id,), = query(results_db.url, "SELECT i.id FROM images i JOIN image_sets s ON s.id = i.image_set_id WHERE s.lot = 'L042' AND i.position = 1")
    record, source = get_image(session, str(image_id))
    image = load_image(source)
    assert image.shape == (64, 64) and image[10:16, 10:16].min() == 250
    inspection = record["inspections"][0]
    scores = load_scores(replace(source, mask_uri=inspection["mask_uri"], mask_array=inspection["mask_array"]), (8, 8, 20, 20))
    assert scores.shape == (2, 12, 12) and scores[0, 2:8, 2:8].min() > 230 and scores[1].max() < 128
    (mask,) = defect_masks(inspection["defects"])
    assert mask.bbox == (10, 10, 16, 16) and mask.mask.all()
    assert load_scores(source) is None  # an image source without an inspection's map


def test_missing_stores_and_corrupt_masks_are_named(session, results_db, tmp_path):
    (defect_id,), = query(results_db.url, "SELECT min(id) FROM defects")
    record, source = get_defect(session, defect_id)
    gone = replace(source, uri=str(tmp_path / "gone.zarr"), mask_uri=str(tmp_path / "gone.masks.zarr"))
    with pytest.raises(DataError, match=r"gone\.zarr: cannot open the image array 'images'"):
        load_image(gone)
    with pytest.raises(DataError, match=r"gone\.masks\.zarr: cannot open the score array"):
        load_scores(gone)
    with pytest.raises(DataError, match=rf"defect {defect_id}: RLE .*runs go past"):
        defect_masks([{**record, "rle": "0 100000"}])
    with pytest.raises(DataError, match="no defect with id 0"):
        get_defect(session, 0)


def test_job_runs_history(session, results_db):
    from defectscan.db.queries import JOB_RUN_COLUMNS, list_job_runs

    (run_id, n_images), = query(results_db.url, "SELECT id, n_images FROM job_runs")
    page = list_job_runs(session, job="qa-test")
    assert [list(r) for r in page.rows] == [list(JOB_RUN_COLUMNS)]
    row = page.rows[0]
    assert (row["id"], row["model"], row["status"], row["n_images"], row["n_inspected"], row["n_defects"]) == (run_id, "twoclass:1", "succeeded", n_images, 11, 6)
    assert row["started_at"].endswith("Z") and not page.more
    assert list_job_runs(session, status="failed").rows == []
    assert list_job_runs(session, since=dt.datetime(2100, 1, 1, tzinfo=UTC)).rows == []


def test_latest_lot_needs_an_inspected_lot(migrated_url, cli):
    result = cli("--database-url", migrated_url, "lots", "show", "--latest")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no inspected lots yet: run `defectscan inspect` on a registered image set that has a lot"
    empty = cli("--database-url", migrated_url, "lots", "list", "--format", "table")
    assert empty.exit_code == 0 and empty.output.strip() == "no lots match"


# --- lots and reports on hand-made rows, recorded as the pipeline records them ------------------------------------------


@pytest.fixture
def record(factory, tmp_path):
    """record(lot, verdicts, times): an image set on line A with an image per verdict, inspected by one model.

    Written by the pipeline's own writer (record_shard), so the daily rollup agrees with the rows;
    the image stores do not exist (a report notes that instead of drawing overlays).
    """
    from defectscan.db.schema import Image, ImageSet
    from defectscan.model.verdict import ImageResult
    from defectscan.pipeline.job_runs import open_run
    from defectscan.pipeline.record import Retry, record_shard

    from pipeline_helpers import add_model

    weights = tmp_path / "weights.keras"
    weights.write_bytes(b"never loaded by these tests")
    model = add_model(factory, weights)
    written = []

    def write(lot: str | None, verdicts: list[str], times: list[dt.datetime | None] | None = None) -> None:
        with factory.begin() as session:
            image_set = ImageSet(uri=f"/nonexistent/set-{len(written)}.zarr", array_path="images", kind="stack", lot=lot, line="A",
                                 shape=[len(verdicts), 32, 32], dtype="uint8", chunks=[1, 32, 32], n_images=len(verdicts), checksum="-")
            session.add(image_set)
            session.flush()
            session.add_all(Image(image_set_id=image_set.id, position=i, key=f"{lot or 'set'}-{len(written)}-{i}", acquired_at=when,
                                  height=32, width=32) for i, when in enumerate(times or [None] * len(verdicts)))
            written.append(image_set.id)
        results = [ImageResult(i, verdict, max_score=0.9 if verdict == "fail" else 0.1, error="unreadable" if verdict == "error" else None)
                   for i, verdict in enumerate(verdicts)]
        run = open_run(factory, Retry(), job="hand-made", spec=None, model_id=model.id)
        record_shard(factory, Retry(), job_run_id=run, model_id=model.id, image_set_id=written[-1], results=results,
                     mask_uri="none.zarr", mask_array="scores")

    return write


def test_lots_and_the_report_give_a_lot_with_an_image_in_error_the_same_disposition(factory, record, cli, migrated_url, tmp_path):
    """Five passed images and one in error: every view holds it by default (no image in error allowed) and releases it
    when one is allowed."""
    from defectscan.report.build import HoldRules, ReportOptions, Scope, collect

    record("LE", ["pass"] * 5 + ["error"], [L042_START] * 6)
    with factory() as session:
        for allowed, expected in (({}, "hold"), ({"max_errors": 1}, "release")):
            listed = [r["verdict"] for r in list_lots(session, **allowed).rows]
            shown = [m["verdict"] for m in lot_summary(session, "LE", **allowed)["models"]]
            reported = [lot["disposition"] for lot in collect(session, Scope(lot="LE"), ReportOptions(rules=HoldRules(**allowed)))["lots"]]
            assert listed == shown == reported == [expected], allowed
    for args, expected in (((), "hold"), (("--max-errors", "1"), "release")):
        result = cli("--database-url", migrated_url, "lots", "list", "--format", "json", *args)
        assert [r["verdict"] for r in json.loads(result.stdout)] == [expected]
        report = cli("--database-url", migrated_url, "report", "--lot", "LE", "-o", str(tmp_path / "LE.html"), *args)
        assert f"{1 if expected == 'hold' else 0} of 1 lots on hold" in report.output


def test_a_line_with_one_lot_and_image_sets_without_one_is_charted_per_lot(factory, record):
    """The sets without a lot are a lot of their own in the lot table, so they count as one: two lots, a p-chart per lot."""
    from defectscan.db.queries_report import lot_groups, totals
    from defectscan.report.build import Scope, collect

    record("L1", ["pass", "fail", "pass"], [L042_START] * 3)
    record(None, ["pass", "pass"], [L042_START + dt.timedelta(hours=1)] * 2)
    with factory() as session:
        assert totals(session, Filters(line="A"))["lots"] == lot_groups(session, Filters(line="A"), limit=10)[1] == 2
        assert totals(session, Filters(lot="L1"))["lots"] == 1
        context = collect(session, Scope(line="A"))
    assert context["subgroup"] == "lot" and [lot["label"] for lot in context["lots"]] == ["L1", "(no lot)"]


def test_lots_and_images_without_a_capture_time_sort_the_same_on_both_backends(factory, record):
    """PostgreSQL sorts NULL above every time, SQLite below: newest first puts the ones without a time last on both."""
    from defectscan.db.queries import list_images
    from defectscan.db.queries_report import lot_groups

    record("OLD", ["pass"], [L042_START])
    record("NOTIME", ["pass"])
    record("NEW", ["pass"], [L042_START + dt.timedelta(days=1)])
    with factory() as session:
        assert [r["lot"] for r in list_lots(session).rows] == ["NEW", "OLD", "NOTIME"]
        assert [r["lot"] for r in list_images(session, sort="time").rows] == ["NEW", "OLD", "NOTIME"]
        assert [r["lot"] for r in list_images(session, Filters(line="A"), sort="time", descending=False).rows] == ["NOTIME", "OLD", "NEW"]
        assert [r["lot"] for r in list_images(session, Filters(lot="OLD"), sort="time").rows] == ["OLD"]  # the lot path's own order
        # the report's p-chart keeps the latest lots
        assert [g["label"] for g in lot_groups(session, Filters(line="A"), limit=2)[0]] == ["OLD", "NEW"]


def test_image_sets_without_a_lot_are_named_so_throughout_the_report(factory, record):
    from defectscan.report.build import Scope, build_report

    record(None, ["fail", "error", "pass"], [L042_START] * 3)
    with factory() as session:
        html = build_report(session, Scope(line="A")).html
    worst = html.split('<section id="worst">', 1)[1].split("</section>", 1)[0]
    errors = html.split('<section id="errors">', 1)[1].split("</section>", 1)[0]
    assert "· lot (no lot)</p>" in worst and "<td>(no lot)</td>" in errors
    assert "None" not in worst + errors

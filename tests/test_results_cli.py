"""`defectscan defects | images | lots` on rows written by the real pipeline, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image as PILImage

from defectscan.db.queries import DEFECT_COLUMNS, IMAGE_COLUMNS, LOT_COLUMNS
from defectscan.db.reviews import REVIEW_COLUMNS
from defectscan.model import rle
from defectscan.report.overlay import CROP_MARGIN, class_color, outline

from db_helpers import query
from queries_helpers import L042_DEFECTS, STRIP_DEFECT


@pytest.fixture
def run(results_db, cli):
    def invoke(*args: str):
        return cli("--database-url", results_db.url, *args)

    return invoke


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def _defects_of(lot_defects: dict) -> list[tuple[str, int]]:
    return sorted((cls, h * w) for marks in lot_defects.values() for cls, _, _, h, w in marks)


# --- defects list -----------------------------------------------------------------------------------------------------


def test_defects_list_returns_every_stored_defect_newest_first_with_stable_columns(run, results_db):
    stored = query(results_db.url, "SELECT id, class_name, area FROM defects ORDER BY id DESC")
    rows = _json(run("defects", "list", "--format", "json", "--limit", "100"))
    assert [list(r) for r in rows] == [list(DEFECT_COLUMNS)] * len(rows)
    assert [(r["id"], r["class"], r["area"]) for r in rows] == [tuple(s) for s in stored]
    assert len(rows) == 6
    assert all(r["acquired_at"].endswith("Z") and r["model"] == "twoclass:1" and r["verdict"] == "fail" for r in rows)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--lot", "L042"), _defects_of(L042_DEFECTS)),
        (("--class", "dark"), [("dark", 49), ("dark", 64)]),
        (("--lot", "L042", "--class", "bright", "--min-area", "30"), [("bright", 30), ("bright", 36)]),
        (("--max-area", "25"), [("bright", 25)]),
        (("--since", "2026-03-05"), [("bright", 900), ("dark", 49)]),
        (("--until", "2026-03-01"), _defects_of(L042_DEFECTS)),  # a bare --until date includes that day
        (("--until", "20260301"), _defects_of(L042_DEFECTS)),  # in any spelling
        (("--since", "2026-03-06T12:00:00+00:00", "--until", "2026-03-06T13:00:00Z"), [("bright", 900)]),
        (("--lot", "L042", "--since", "2026-03-01T08:03:00Z"), [("bright", 25), ("bright", 30), ("dark", 64)]),  # per-image times
        (("--lot", "L042", "--until", "2026-03-01T08:03:00"), [("bright", 36)]),
        (("--line", "C", "--camera", "C3", "--product", "P2"), [("bright", 900)]),
        (("--model", "twoclass", "--verdict", "fail", "--min-score", "0.9", "--max-score", "1"), None),
        (("--model", "twoclass:1", "--lot", "L043"), [("bright", 900), ("dark", 49)]),
    ],
)
def test_defects_list_filters(run, results_db, args, expected):
    rows = _json(run("defects", "list", "--format", "json", *args))
    if expected is None:
        expected = sorted((c, a) for c, a in query(results_db.url, "SELECT class_name, area FROM defects WHERE max_score >= 0.9"))
        assert len(expected) == 6
    assert sorted((r["class"], r["area"]) for r in rows) == expected


def test_defects_list_by_job_run_and_strip_geometry(run, results_db):
    (job_run,), = query(results_db.url, "SELECT id FROM job_runs")
    rows = _json(run("defects", "list", "--format", "json", "--job-run", str(job_run), "--line", "C"))
    cls, y, x, h, w = STRIP_DEFECT
    assert [(r["class"], r["bbox_y0"], r["bbox_x0"], r["bbox_y1"], r["bbox_x1"], r["job_run_id"]) for r in rows] == [(cls, y, x, y + h, x + w, job_run)]
    assert "unknown job run 999" in _error_line(run("defects", "list", "--job-run", "999"))


def test_defects_sorting_and_pages_cover_everything_once(run):
    by_area = _json(run("defects", "list", "--format", "json", "--sort", "area", "--asc"))
    assert [r["area"] for r in by_area] == sorted(r["area"] for r in by_area)
    pages = [_json(run("defects", "list", "--format", "json", "--limit", "4", "--offset", str(o))) for o in (0, 4, 8)]
    assert [len(p) for p in pages] == [4, 2, 0]
    ids = [r["id"] for p in pages for r in p]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6
    first = run("defects", "list", "--format", "json", "--limit", "4")
    assert "more rows follow: add --offset 4" in first.stderr
    assert "more rows follow" not in run("defects", "list", "--format", "json", "--limit", "6").output


def test_defects_csv_ndjson_and_table_formats(run):
    as_json = _json(run("defects", "list", "--format", "json"))
    as_csv = run("defects", "list", "--format", "csv")
    reader = csv.DictReader(io.StringIO(as_csv.stdout))
    assert reader.fieldnames == list(DEFECT_COLUMNS)
    assert [int(r["id"]) for r in reader] == [r["id"] for r in as_json]
    ndjson = run("defects", "list", "--format", "ndjson").stdout.splitlines()
    assert [json.loads(line) for line in ndjson] == as_json
    table = run("defects", "list", "--format", "table", "--limit", "2")
    header = table.stdout.splitlines()[0].split()
    assert header[:3] == ["id", "image_key", "lot"] and "max_score" in header
    assert str(as_json[0]["id"]) in table.stdout and "more rows follow: add --offset 2" in table.stdout
    # without --format, piped output is CSV
    assert run("defects", "list").stdout == as_csv.stdout


def test_empty_result_says_so_instead_of_printing_an_empty_table(run):
    result = run("defects", "list", "--lot", "L042", "--line", "B", "--format", "table")
    assert result.exit_code == 0
    assert result.output.strip() == "no defects match (lot='L042', line='B')"
    as_json = run("defects", "list", "--lot", "L042", "--line", "B", "--format", "json")
    assert json.loads(as_json.stdout) == [] and "no defects match" in as_json.stderr
    assert run("images", "list", "--lot", "L043", "--verdict", "error", "--format", "table").output.startswith("no images match")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lot", "L042' OR '1'='1"), "unknown lot \"L042' OR '1'='1\""),
        (("--lot", "L04"), "did you mean L04"),
        (("--class", "brigth"), "unknown defect class 'brigth': no registered model has it; did you mean bright?"),
        (("--class", "x'); DROP TABLE defects; --"), "unknown defect class"),
        (("--camera", "C9"), "unknown camera 'C9'"),
        (("--model", "twoclass:7"), "unknown model 'twoclass:7'"),
        (("--since", "yesterday"), "--since 'yesterday': expected an ISO 8601 date or time such as 2026-03-01"),
        (("--until", "2026-02-30"), "--until '2026-02-30': expected an ISO 8601 date"),
        (("--since", "2026-03-05", "--until", "2026-03-01"), "--since 2026-03-05T00:00:00Z is not before --until 2026-03-02T00:00:00Z"),
        (("--min-area", "50", "--max-area", "10"), "--min-area 50 is larger than --max-area 10"),
        (("--min-score", "0.9", "--max-score", "0.1"), "--min-score 0.9 is larger than --max-score 0.1"),
        (("--since", ""), "--since '': expected an ISO 8601 date or time"),
        (("--until", ""), "--until '': expected an ISO 8601 date or time"),
        (("--min-score", "nan"), "--min-score nan: expected a score between 0 and 1"),
        (("--max-score", "nan"), "--max-score nan: expected a score between 0 and 1"),
    ],
)
def test_bad_filters_give_one_clear_line_and_leave_the_database_alone(run, results_db, args, message):
    assert message in _error_line(run("defects", "list", *args))
    assert query(results_db.url, "SELECT count(*) FROM defects")[0][0] == 6


def test_sql_looking_values_are_plain_data(run, results_db):
    for ident in ("1; DROP TABLE defects; --", "' OR 1=1 --", 'x" OR "1"="1'):
        assert f"no image with key {ident!r}" in _error_line(run("images", "show", ident))
    # numbers past BIGINT name no row (the drivers raised OverflowError)
    assert "no image with id '99999999999999999999'" in _error_line(run("images", "show", "99999999999999999999"))
    assert "no image with key '²'" in _error_line(run("images", "show", "²"))  # a digit to str.isdigit: ValueError from int()
    too_big = run("images", "list", "--job-run", "99999999999999999999")
    assert too_big.exit_code == 2 and "is not in the range 1<=x<=9223372036854775807" in too_big.output
    for option in ("--limit", "--offset"):  # offset + limit + 1 past BIGINT was an OverflowError
        assert run("images", "list", option, "9223372036854775807").exit_code == 2
    for command in (("imagesets", "list"), ("jobs", "history", "x")):
        assert run(*command, "--limit", "9223372036854775807").exit_code == 2
    # known values that match nothing together: an ordinary no-match
    result = run("images", "list", "--lot", "L042", "--line", "A", "--verdict", "error", "--format", "json")
    assert json.loads(result.stdout) == []
    assert query(results_db.url, "SELECT count(*) FROM defects")[0][0] == 6


def test_table_shows_text_as_it_is_not_as_markup(capsys):
    from defectscan.cli.output import print_rows

    rows = [{"lot": "L[/x]42", "note": "glare [left edge]"}, {"lot": "L[b]042", "note": "[bold]x"}]
    print_rows(rows, ("lot", "note"), "table", empty="none")
    shown = capsys.readouterr().out
    for text in ("L[/x]42", "glare [left edge]", "L[b]042", "[bold]x"):
        assert text in shown


# --- defects show ------------------------------------------------------------------------------------------------------------


def test_defects_show_and_crop_draws_the_contour(run, results_db, tmp_path):
    (defect_id, rle_text, y0, x0, y1, x1), = query(
        results_db.url,
        "SELECT d.id, d.rle, d.bbox_y0, d.bbox_x0, d.bbox_y1, d.bbox_x1 FROM defects d WHERE d.class_name = 'dark' AND d.area = 64",
    )
    record = _json(run("defects", "show", str(defect_id), "--format", "json", "--crop", str(tmp_path / "crop.png")))
    assert (record["id"], record["class"], record["class_index"], record["lot"], record["area"]) == (defect_id, "dark", 1, "L042", 64)
    assert (record["bbox_y0"], record["bbox_x0"], record["bbox_y1"], record["bbox_x1"]) == (y0, x0, y1, x1) == (30, 40, 38, 48)
    crop = np.asarray(PILImage.open(record["crop"]).convert("RGB"))
    assert crop.shape == (8 + 2 * CROP_MARGIN, 8 + 2 * CROP_MARGIN, 3)
    ring = outline(rle.decode(rle_text, (y1 - y0, x1 - x0)))
    ys, xs = np.nonzero(ring)
    assert len(ys) == 28
    assert (crop[ys + CROP_MARGIN, xs + CROP_MARGIN] == class_color(1)).all()
    # the inside of the dark square stays dark (tinted red by its score, not drawn over)
    inside = crop[CROP_MARGIN + 3, CROP_MARGIN + 3]
    assert tuple(inside) != class_color(1) and inside[1] < 40

    table = run("defects", "show", str(defect_id), "--format", "table")
    assert table.exit_code == 0 and "class_index" in table.stdout and "dark" in table.stdout
    assert f"no defect with id {defect_id + 1000}" in _error_line(run("defects", "show", str(defect_id + 1000)))


# --- images -----------------------------------------------------------------------------------------------------------------------


def test_images_list_filters_and_columns(run, results_db):
    rows = _json(run("images", "list", "--format", "json", "--limit", "100"))
    assert len(rows) == query(results_db.url, "SELECT count(*) FROM inspections")[0][0] == 11
    assert list(rows[0]) == [*IMAGE_COLUMNS, "qa"]  # QA's decision last (none here)
    assert rows[0]["qa"] is None
    failed = _json(run("images", "list", "--format", "json", "--verdict", "fail"))
    assert sorted((r["lot"], r["position"]) for r in failed) == [("L042", 1), ("L042", 3), ("L042", 4), ("L043", 0), ("L043", 2)]
    dark = _json(run("images", "list", "--format", "json", "--class", "dark", "--lot", "L042"))
    assert [(r["position"], r["n_defects"], r["defect_pixels"]) for r in dark] == [(3, 2, 89)]
    big = _json(run("images", "list", "--format", "json", "--min-area", "40", "--sort", "defects"))
    assert sorted(r["defect_pixels"] for r in big) == [49, 89, 900]
    by_score = _json(run("images", "list", "--format", "json", "--sort", "score", "--asc", "--lot", "L042"))
    assert [r["max_score"] for r in by_score] == sorted(r["max_score"] for r in by_score)


def test_images_show_by_id_and_key_with_overlay(run, results_db, tmp_path):
    (image_id, key), = query(
        results_db.url, "SELECT i.id, i.key FROM images i JOIN image_sets s ON s.id = i.image_set_id WHERE s.lot = 'L042' AND i.position = 3"
    )
    out = tmp_path / "overlay.png"
    record = _json(run("images", "show", str(image_id), "--overlay", str(out), "--format", "json"))
    assert (record["image_id"], record["lot"], record["position"]) == (image_id, "L042", 3)
    (inspection,) = record["inspections"]
    assert (inspection["verdict"], inspection["n_defects"], inspection["model"]) == ("fail", 2, "twoclass:1")
    assert sorted((d["class"], d["bbox"]) for d in inspection["defects"]) == [("bright", [5, 50, 10, 55]), ("dark", [30, 40, 38, 48])]

    picture = np.asarray(PILImage.open(out).convert("RGB"))
    assert picture.shape == (64, 64, 3)
    stored = query(results_db.url, "SELECT class_index, rle, bbox_y0, bbox_x0, bbox_y1, bbox_x1 FROM defects d "
                                   "JOIN inspections n ON n.id = d.inspection_id WHERE n.image_id = :image", image=image_id)
    for class_index, text, y0, x0, y1, x1 in stored:
        ys, xs = np.nonzero(outline(rle.decode(text, (y1 - y0, x1 - x0))))
        assert (picture[ys + y0, xs + x0] == class_color(class_index)).all()
    # far from any defect: the gray image, untinted
    assert picture[62, 2, 0] == picture[62, 2, 1] == picture[62, 2, 2]

    assert key == "L042-003"
    by_key = _json(run("images", "show", key, "--format", "json"))
    assert by_key["image_id"] == image_id
    (digits_id,), = query(results_db.url, "SELECT i.id FROM images i JOIN image_sets s ON s.id = i.image_set_id WHERE s.line = 'B' AND i.key = '3'")
    assert _json(run("images", "show", "--key", "3", "--format", "json"))["image_id"] == digits_id
    assert "key '0' is used by several images: give the image id" in _error_line(run("images", "show", "--key", "0"))
    table = run("images", "show", str(image_id), "--format", "table")
    assert table.exit_code == 0 and "inspection" in table.stdout and "bright" in table.stdout and "dark" in table.stdout


def test_strip_overlay_and_unknown_image(run, results_db, tmp_path):
    (image_id,), = query(results_db.url, "SELECT i.id FROM images i JOIN image_sets s ON s.id = i.image_set_id WHERE s.line = 'C'")
    out = tmp_path / "strip.png"
    assert run("images", "show", str(image_id), "--overlay", str(out), "--format", "json").exit_code == 0
    picture = np.asarray(PILImage.open(out).convert("RGB"))
    _, y, x, h, w = STRIP_DEFECT
    assert picture.shape == (160, 200, 3)
    assert (picture[y, x : x + w] == class_color(0)).all() and (picture[y + h - 1, x : x + w] == class_color(0)).all()
    assert (picture[y : y + h, x] == class_color(0)).all()
    assert "no image with id '99999'" in _error_line(run("images", "show", "99999"))
    assert "unknown model 'nope'" in _error_line(run("images", "show", str(image_id), "--model", "nope"))


# --- lots ---------------------------------------------------------------------------------------------------------------------


def test_lots_list_counts_match_the_stored_rows(run, results_db, monkeypatch):
    rows = _json(run("lots", "list", "--format", "json"))
    assert [list(r) for r in rows] == [[*LOT_COLUMNS, *REVIEW_COLUMNS]] * 3  # QA's figures last (none here)
    assert all(r["false_call_rate"] is None and r["failed_reviewed"] == 0 for r in rows)
    assert [r["lot"] for r in rows] == ["L043", "L042", "L044"]  # most recent first; then the lots nothing inspected yet
    # L044 is registered and was never inspected: listed, incomplete (a night that inspected nothing left it out).
    uninspected = rows.pop()
    assert (uninspected["model"], uninspected["images"], uninspected["defect_rate"], uninspected["verdict"]) == (None, 0, None, "incomplete")
    stored = {
        lot: (n, failed, defects)
        for lot, n, failed, defects in query(
            results_db.url,
            "SELECT s.lot, count(*), sum(CASE WHEN n.verdict = 'fail' THEN 1 ELSE 0 END), sum(n.n_defects) "
            "FROM inspections n JOIN images i ON i.id = n.image_id JOIN image_sets s ON s.id = i.image_set_id GROUP BY s.lot",
        )
    }
    for row in rows:
        assert (row["images"], row["failed"], row["defects"]) == stored[row["lot"]]
        assert row["defect_rate"] == round(row["failed"] / (row["images"] - row["errors"]), 4)
        assert row["verdict"] == "hold"
    assert {r["lot"]: r["images"] for r in rows} == {"L042": 6, "L043": 5}
    relaxed = _json(run("lots", "list", "--format", "json", "--hold-above", "0.45"))
    assert {r["lot"]: r["verdict"] for r in relaxed} == {"L042": "hold", "L043": "release", "L044": "incomplete"}
    monkeypatch.setenv("DEFECTSCAN_QA__HOLD_ABOVE", "0.45")  # the setting is the default of --hold-above
    assert _json(run("lots", "list", "--format", "json")) == relaxed
    monkeypatch.delenv("DEFECTSCAN_QA__HOLD_ABOVE")
    only_b = _json(run("lots", "list", "--format", "json", "--line", "B"))
    assert [(r["lot"], r["images"], r["failed"]) for r in only_b][:1] == [("L043", 4, 1)]
    assert _json(run("lots", "list", "--format", "json", "--model", "twoclass"))[-1]["lot"] == "L042"  # a model named: its lots only
    table = run("lots", "list", "--format", "table")
    assert table.stdout.splitlines()[0].split() == [*LOT_COLUMNS, "false_call_rate", "escape_rate"]


def test_lots_refuse_a_hold_share_that_is_not_a_number(run):
    """click's FloatRange lets NaN through; as a rule it would release every lot and print JSON's invalid NaN."""
    for command in (("lots", "list"), ("lots", "show", "L042")):
        assert _error_line(run(*command, "--hold-above", "nan", "--format", "json")) == (
            "Error: --hold-above nan: expected a share between 0 and 1")


def test_a_page_past_the_last_row_says_so(run):
    assert run("lots", "list", "--offset", "10", "--format", "table").output.strip() == "no lots at offset 10: fewer lots match"
    past = run("defects", "list", "--lot", "L042", "--offset", "4", "--format", "json")
    assert json.loads(past.stdout) == [] and past.stderr.strip() == "no defects at offset 4: fewer defects match (lot='L042')"


def test_lots_show_top_classes_and_latest(run):
    summary = _json(run("lots", "show", "L042", "--format", "json"))
    assert (summary["lot"], summary["image_sets"], summary["registered_images"]) == ("L042", 1, 6)
    (model,) = summary["models"]
    assert (model["images"], model["failed"], model["defects"], model["verdict"]) == (6, 3, 4, "hold")
    assert [(c["class"], c["defects"], c["mean_area"]) for c in model["top_classes"]] == [("bright", 3, 30.3), ("dark", 1, 64.0)]
    assert _json(run("lots", "show", "--latest", "--format", "json"))["lot"] == "L043"
    top1 = _json(run("lots", "show", "L043", "--top", "1", "--format", "json"))
    assert len(top1["models"][0]["top_classes"]) == 1
    table = run("lots", "show", "L042", "--format", "table")
    assert table.exit_code == 0 and "top classes, twoclass:1" in table.stdout and "hold" in table.stdout
    assert "did you mean L042" in _error_line(run("lots", "show", "L420"))
    assert "give a LOT or --latest" in _error_line(run("lots", "show", "L042", "--latest"))
    assert "give a LOT or --latest" in _error_line(run("lots", "show"))


def test_a_lot_and_an_image_not_inspected_yet(run, results_db, tmp_path):
    assert {r["lot"]: r["verdict"] for r in _json(run("lots", "list", "--format", "json"))}["L044"] == "incomplete"  # listed, after the others
    summary = _json(run("lots", "show", "L044", "--format", "json"))
    assert (summary["image_sets"], summary["registered_images"], summary["models"]) == (1, 2, [])
    assert "no inspections of lot 'L044' yet" in run("lots", "show", "L044", "--format", "table").stdout
    assert run("defects", "list", "--lot", "L044", "--format", "table").output.strip() == "no defects match (lot='L044')"
    (image_id,), = query(results_db.url, "SELECT i.id FROM images i JOIN image_sets s ON s.id = i.image_set_id WHERE s.lot = 'L044' AND i.position = 0")
    shown = run("images", "show", str(image_id), "--format", "table")
    assert shown.exit_code == 0 and "not inspected yet" in shown.stdout
    assert f"image {image_id} has no inspection: nothing to draw" in _error_line(run("images", "show", str(image_id), "--overlay", str(tmp_path / "x.png")))
    assert not (tmp_path / "x.png").exists()


def test_crop_of_a_strip_defect(run, results_db, tmp_path):
    (defect_id,), = query(results_db.url, "SELECT d.id FROM defects d WHERE d.area = 900")
    record = _json(run("defects", "show", str(defect_id), "--crop", str(tmp_path / "strip-crop.png"), "--format", "json"))
    crop = np.asarray(PILImage.open(record["crop"]).convert("RGB"))
    _, y, x, h, w = STRIP_DEFECT
    assert crop.shape == (h + 2 * CROP_MARGIN, w + 2 * CROP_MARGIN, 3)
    ys, xs = np.nonzero(outline(np.ones((h, w), bool)))
    assert (crop[ys + CROP_MARGIN, xs + CROP_MARGIN] == class_color(0)).all()
    assert "rle" not in record and record["line"] == "C"

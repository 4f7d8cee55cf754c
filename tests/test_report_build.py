"""The HTML report built from pipeline rows: content, escaping, hold rules, empty scopes, failures, the CLI."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image as PILImage

from defectscan.errors import DataError
from defectscan.report.build import HoldRules, ReportOptions, Scope, build_report
from defectscan.report.overlay import class_color
from report_helpers import ERROR_LOT, LOTS, NOT_INSPECTED_LOT, SCRIPT_LOT, session_for

SECTIONS = ("kpis", "model", "p-chart", "defects", "worst", "disposition", "errors")


def _build(url: str, scope: Scope, options: ReportOptions | None = None):
    factory, close = session_for(url)
    try:
        with factory() as session:
            return build_report(session, scope, options or ReportOptions())
    finally:
        close()


@pytest.fixture(scope="module")
def line_report(sqlite_report_db):
    return _build(sqlite_report_db.url, Scope(line="A"))


def _dispositions(html: str) -> dict[str, tuple[str, str]]:
    section = html.split('id="disposition"', 1)[1].split("</section>", 1)[0]
    rows = re.findall(r"<tr><td>(.*?)</td>.*?<td class=\"(hold|release)\">\2</td><td>(.*?)</td></tr>", section, re.DOTALL)
    return {lot: (verdict, why) for lot, verdict, why in rows}


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_line_report_has_every_part_and_is_self_contained(line_report):
    html, summary = line_report.html, line_report.summary
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert html.count("<svg") == 4  # p-chart, Pareto, histogram, heatmap
    assert html.count('src="data:image/png;base64,') == ReportOptions().worst
    # nothing is fetched: every src/href is inline or an in-document reference
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html)
    assert "@import" not in html and not re.findall(r"url\((?!#)", html)
    assert "<script" not in html.lower()
    assert "@media print" in html and "@page" in html
    n_failed = sum(len(d) for d in LOTS.values())
    assert summary["images"] == 12 * len(LOTS) and summary["failed"] == n_failed and summary["errors"] == 1
    assert "threshold version 1" in html and "qa-report-test" in html and "Generated" in html
    assert "defect size class" in html  # a one-class model's Pareto is by size


def test_every_data_value_is_escaped(line_report):
    html = line_report.html
    assert "<script>alert(1)</script>" not in html
    assert "L5&lt;script&gt;alert(1)&lt;/script&gt;" in html  # disposition table
    assert "L5&lt;script&gt;alert(1)&lt;/scr" in html  # chart label (shortened)


def test_disposition_follows_the_hold_rules(sqlite_report_db, line_report):
    table = {_unescape(k): v for k, v in _dispositions(line_report.html).items()}
    assert set(table) == set(LOTS)
    assert table["L2"] == ("release", "")
    assert table["L3"][0] == "hold" and "above the upper control limit" in table["L3"][1]
    assert table[ERROR_LOT][0] == "hold" and "1 image in error &gt; 0" in table[ERROR_LOT][1]
    assert "Out of control: L3 (0.583 above UCL" in line_report.html

    lenient = ReportOptions(rules=HoldRules(hold_above=0.5, max_errors=1, out_of_control=False))
    table = {_unescape(k): v for k, v in _dispositions(_build(sqlite_report_db.url, Scope(line="A"), lenient).html).items()}
    assert {lot for lot, (verdict, _) in table.items() if verdict == "hold"} == {"L3"}
    assert "58.3 % &gt; 50 %" in table["L3"][1] and "control limit" not in table["L3"][1]


def test_worst_images_show_overlays_with_defect_contours(line_report):
    first = re.search(r'src="data:image/png;base64,([^"]+)"', line_report.html).group(1)
    picture = np.asarray(PILImage.open(io.BytesIO(base64.b64decode(first))).convert("RGB"))
    contour = np.all(picture == class_color(0), axis=2)
    assert contour.any() and picture.shape[0] >= 256
    assert "L3" in line_report.html.split('id="worst"', 1)[1].split("</section>", 1)[0]


def test_one_lot_is_charted_per_hour(sqlite_report_db):
    report = _build(sqlite_report_db.url, Scope(lot="L1"))
    assert "Failed images per hour (UTC)" in report.html
    assert "2026-03-02 07:00" in report.html
    assert report.summary["lots"] == 1


def test_empty_scopes_give_a_short_report_that_says_so(sqlite_report_db):
    later = _build(sqlite_report_db.url, Scope(line="A", since=dt.datetime(2027, 1, 1, tzinfo=dt.UTC)))
    assert later.summary["empty"] and "No inspection results in this scope" in later.html and "<svg" not in later.html
    never = _build(sqlite_report_db.url, Scope(lot=NOT_INSPECTED_LOT))
    assert "No inspection results" in never.html and never.summary["model"] is None
    assert re.search(r"\d+ registered images? in this scope ha(ve|s) not been inspected yet", never.html)  # it said nothing of them


@pytest.mark.parametrize(("scope", "message"), [
    ({}, "got none of them"),
    ({"lot": "L1", "line": "A"}, "got --lot, --line"),
    ({"lot": "L1", "since": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}, "use them with --line"),
])
def test_a_scope_is_one_lot_line_or_job_run(scope, message):
    with pytest.raises(DataError, match=message):
        Scope(**scope)


def test_unknown_lot_is_refused_with_suggestions(sqlite_report_db):
    with pytest.raises(DataError, match="unknown lot 'L33'.*did you mean"):
        _build(sqlite_report_db.url, Scope(lot="L33"))


def _copy(sqlite_report_db, tmp_path) -> tuple[str, sqlite3.Connection]:
    path = tmp_path / "copy.sqlite"
    shutil.copy(sqlite_report_db.url.removeprefix("sqlite:///"), path)
    return f"sqlite:///{path}", sqlite3.connect(path)


def test_several_model_versions_in_scope_need_a_choice(sqlite_report_db, tmp_path):
    url, db = _copy(sqlite_report_db, tmp_path)
    with db:
        db.execute("INSERT INTO models (name, version, uri, sha256, architecture, input_spec, classes, threshold, stage, registered_at, metrics) "
                   "SELECT name, '2', uri, sha256, architecture, input_spec, classes, threshold, stage, registered_at, "
                   "'{\"pixel_auroc\": 0.987, \"thresholds\": {\"0.5\": {\"dice\": 0.91}}}' FROM models")
        db.execute("INSERT INTO inspections (image_id, model_id, verdict, n_defects, defect_pixels, max_score, inspected_at) "
                   "SELECT image_id, 2, verdict, 0, 0, 0.1, inspected_at FROM inspections WHERE image_id = 1")
    db.close()
    with pytest.raises(DataError, match="several model versions: threshold:1 .*threshold:2 .*--model"):
        _build(url, Scope(line="A"))
    chosen = _build(url, Scope(line="A", model="threshold:2"))
    assert chosen.summary["images"] == 1 and "pixel_auroc" in chosen.html and "0.9870" in chosen.html and "0.91" in chosen.html


def test_missing_image_store_leaves_a_note_instead_of_an_overlay(sqlite_report_db, tmp_path):
    url, db = _copy(sqlite_report_db, tmp_path)
    with db:
        db.execute("UPDATE image_sets SET uri = '/nonexistent/' || id || '.zarr'")
    db.close()
    report = _build(url, Scope(lot="L3"))
    assert report.html.count("Overlay unavailable") == ReportOptions().worst
    assert "/nonexistent/" in report.html and 'src="data:image/png' not in report.html


def test_cli_writes_the_report_and_refuses_bad_scopes(cli, sqlite_report_db, tmp_path):
    out = tmp_path / "r" / "line.html"
    result = cli("--database-url", sqlite_report_db.url, "report", "--line", "A", "--since", "2026-03-01", "--until", "2026-03-05",
                 "-o", str(out), "--worst", "2")
    assert result.exit_code == 0, result.output
    assert "Line A (threshold:1): 48 images" in result.output and f"wrote {out}" in result.output
    html = out.read_text()
    assert html.count('src="data:image/png') == 2 and "2026-03-01T00:00:00Z – 2026-03-06T00:00:00Z" in html
    assert SCRIPT_LOT not in html  # captured on 2026-03-06, outside the period

    bad = cli("--database-url", sqlite_report_db.url, "report", "--lot", "L1", "--job-run", "1", "-o", str(out))
    assert bad.exit_code == 1 and "Error: a report covers one lot" in bad.output
    bad = cli("--database-url", sqlite_report_db.url, "report", "--line", "A", "--since", "yesterday", "-o", str(out))
    assert bad.exit_code == 1 and "--since 'yesterday'" in bad.output
    bad = cli("--database-url", sqlite_report_db.url, "report", "--line", "A", "--until", "", "-o", str(out))
    assert bad.exit_code == 1 and "Error: --until '': expected an ISO 8601 date or time" in bad.output
    bad = cli("--database-url", sqlite_report_db.url, "report", "--line", "A", "--hold-above", "nan", "-o", str(out))
    assert bad.exit_code == 1 and "Error: --hold-above nan: expected a share between 0 and 1" in bad.output
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    bad = cli("--database-url", sqlite_report_db.url, "report", "--lot", "L1", "-o", str(unwritable / "x.html"))
    assert bad.exit_code == 1 and "cannot write the report" in bad.output


def test_large_images_are_cropped_to_their_defects(sqlite_report_db, monkeypatch):
    from defectscan.report import build

    monkeypatch.setattr(build, "WHOLE_IMAGE_PIXELS", 16 * 16)  # every 32x32 test image counts as large
    monkeypatch.setattr(build, "CROP_MARGIN", 2)
    report = _build(sqlite_report_db.url, Scope(lot="L3"), ReportOptions(worst=1))
    assert "cropped to its defects" in report.html
    first = re.search(r'src="data:image/png;base64,([^"]+)"', report.html).group(1)
    picture = np.asarray(PILImage.open(io.BytesIO(base64.b64decode(first))).convert("RGB"))
    # L3's worst image has a 9x9 square at (16, 16): cropped with 2 pixels around it to 13x13 (of 32x32),
    # enlarged 36 times to fit the thumbnail
    assert picture.shape[:2] == (13 * 36, 13 * 36)
    contour = np.all(picture == class_color(0), axis=2)
    assert contour[2 * 36 : 3 * 36, 2 * 36 : 11 * 36].all()  # the square's top edge, two pixels into the crop


def test_job_run_scope_reports_that_run(sqlite_report_db):
    report = _build(sqlite_report_db.url, Scope(job_run=sqlite_report_db.job_run_id), ReportOptions(worst=0))
    assert report.summary["images"] == 12 * len(LOTS) and report.summary["scope"] == f"Job run {sqlite_report_db.job_run_id}"
    assert "Not requested (--worst 0)" in report.html and 'src="data:image/png' not in report.html
    assert "the images it skipped are counted in the table below" in report.html
    with pytest.raises(DataError, match="unknown job run 999"):
        _build(sqlite_report_db.url, Scope(job_run=999))


def test_two_class_report_on_both_backends(results_db):
    from db_helpers import query

    report = _build(results_db.url, Scope(lot="L043"))
    expected = query(results_db.url, "SELECT count(*) FROM inspections i JOIN images m ON i.image_id = m.id JOIN image_sets s "
                                     "ON m.image_set_id = s.id WHERE s.lot = 'L043'")[0][0]
    assert report.summary["images"] == expected and report.summary["model"] == "twoclass:1"
    assert "Pareto of defect class" in report.html and "Failed images per hour (UTC)" in report.html
    classes = report.html.split('id="kpis"', 1)[1].split("</table>", 1)[0]
    assert "<td>bright</td>" in classes and "<td>dark</td>" in classes
    assert report.html.count("<svg") == 4


def test_a_report_that_cannot_be_written_in_full_leaves_the_earlier_one(sqlite_report_db, tmp_path, monkeypatch):
    """The HTML goes to a file beside the report and replaces it only once written: a full disk costs no earlier report."""
    from pathlib import Path

    from defectscan.report.build import write_report

    out = tmp_path / "L1.html"
    out.write_text("<p>earlier report</p>")
    write_text = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        write_text(path, text[:100], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    factory, close = session_for(sqlite_report_db.url)
    try:
        with factory() as session, pytest.raises(DataError, match="L1.html: cannot write the report: No space left on device"):
            write_report(session, Scope(lot="L1"), out)
    finally:
        close()
    assert out.read_text() == "<p>earlier report</p>" and [p.name for p in tmp_path.iterdir()] == ["L1.html"]


class _Recorded:
    """A results database written by the pipeline's own writer (record_shard) without a cluster: image sets registered,
    verdicts recorded per job run; the model file is never read."""

    def __init__(self, url: str, folder):
        from defectscan.db.migrate import upgrade
        from defectscan.db.session import make_engine, session_factory

        from pipeline_helpers import add_model

        self.engine = make_engine(url)
        upgrade(self.engine)
        self.factory = session_factory(self.engine)
        self.folder = folder
        self.weights = folder / "weights.keras"
        self.weights.write_bytes(b"not read by these tests")
        self.model = add_model(self.factory, self.weights)

    def add_model(self, name: str):
        from pipeline_helpers import add_model

        return add_model(self.factory, self.weights, name=name)

    def image_set(self, name: str, n: int, **attrs):
        from pipeline_helpers import register, square_images, write_stack

        return register(self.factory, write_stack(self.folder / f"{name}.zarr", square_images(n, size=32), **attrs))

    def run(self, image_set, verdicts: dict[int, str], model=None, run_id: int | None = None) -> int:
        """Record `verdicts` (position -> pass/fail) in a new job run (or `run_id`); returns the run's id."""
        from defectscan.model.verdict import ImageResult
        from defectscan.pipeline import record
        from defectscan.pipeline.job_runs import open_run

        model = model or self.model
        if run_id is None:
            run_id = open_run(self.factory, record.Retry(), job="nightly", spec=None, model_id=model.id)
        results = [ImageResult(position=p, verdict=v, max_score=0.9 if v == "fail" else 0.1) for p, v in verdicts.items()]
        record.record_shard(self.factory, record.Retry(), job_run_id=run_id, model_id=model.id, image_set_id=image_set.id, results=results,
                            mask_uri="m.zarr", mask_array="scores")
        return run_id


def test_a_lot_is_disposed_of_as_a_whole_with_images_left_without_a_result_stopping_its_release(tmp_path, sqlite_url):
    """A lot with 7 of its 10 images never inspected was released; a report on the run that judged a lot's last
    2 images released the lot the whole of which was on hold."""
    from defectscan.db.queries import Filters, list_lots

    db = _Recorded(sqlite_url, tmp_path)
    partial, split = db.image_set("P1", 10, lot="P1"), db.image_set("L", 10, lot="L")
    db.run(partial, {p: "pass" for p in range(3)})
    db.run(split, {p: "fail" if p < 5 else "pass" for p in range(8)})
    last = db.run(split, {8: "pass", 9: "pass"})
    # Lot T: two cameras, each set inspected by its own model; whole for each.
    db.run(db.image_set("T-top", 4, lot="T", camera="top"), {p: "pass" for p in range(4)})
    db.run(db.image_set("T-bottom", 4, lot="T", camera="bottom"), {p: "pass" for p in range(4)}, model=db.add_model("bottom-cam"))

    with db.factory() as session:
        lots = {(row["lot"], row["model"]): (row["images"], row["verdict"]) for row in list_lots(session, Filters()).rows}
        in_last = {row["lot"]: (row["images"], row["verdict"]) for row in list_lots(session, Filters(job_run=last)).rows}
    assert lots == {("P1", "threshold:1"): (3, "incomplete"), ("L", "threshold:1"): (10, "hold"),
                    ("T", "threshold:1"): (4, "release"), ("T", "bottom-cam:1"): (4, "release")}
    assert in_last == {"L": (2, "hold")}
    # A third camera's set nobody has inspected yet: the lot is not whole for either.
    db.image_set("T-side", 4, lot="T", camera="side")
    with db.factory() as session:
        assert {row["verdict"] for row in list_lots(session, Filters(lot="T")).rows} == {"incomplete"}
    # Held whatever the images not inspected turn out to be: a hold, saying what is missing too.
    db.image_set("L-more", 2, lot="L")
    with db.factory() as session:
        assert [row["verdict"] for row in list_lots(session, Filters(lot="L")).rows] == ["hold"]

    def dispositions(scope: Scope) -> dict[str, tuple[str, str]]:
        section = _build(sqlite_url, scope).html.split('id="disposition"', 1)[1].split("</section>", 1)[0]
        rows = re.findall(r"<tr><td>(.*?)</td>.*?<td class=\"(\w+)\">\2</td><td>(.*?)</td></tr>", section, re.DOTALL)
        return {lot: (verdict, _unescape(why)) for lot, verdict, why in rows}

    assert dispositions(Scope(lot="P1")) == {"P1": ("incomplete", "7 of 10 images not inspected")}
    assert dispositions(Scope(job_run=last)) == {"L": ("hold", "the whole lot: failed at least 41.7 % > 5 %; 2 of 12 images not inspected")}
    assert dispositions(Scope(lot="L")) == {"L": ("hold", "failed at least 41.7 % > 5 %; 2 of 12 images not inspected")}
    db.engine.dispose()


def test_with_more_lots_than_drawn_the_figures_and_dispositions_cover_every_lot(tmp_path, sqlite_url):
    """Over max_subgroups lots, the centre line, the hold count and the key figure covered only the latest lots."""
    db = _Recorded(sqlite_url, tmp_path)
    run_id = None
    for day in range(8):
        image_set = db.image_set(f"L{day}", 4, lot=f"L{day}", line="A", acquired_at=f"2026-03-0{day + 1}T08:00:00Z")
        failing = 2 if day < 3 else 0  # the three oldest lots: half their images failed
        run_id = db.run(image_set, {p: "fail" if p < failing else "pass" for p in range(4)}, run_id=run_id)
    db.engine.dispose()

    report = _build(sqlite_url, Scope(line="A"), ReportOptions(max_subgroups=5))
    assert (report.summary["lots"], report.summary["held"]) == (8, 3)
    assert "<div class=\"value\">3 / 8</div>" in report.html
    assert "centre line p̄ = 0.1875" in report.html  # 6 failed of 32 judged, not 0 of the latest 20
    assert "The latest 5 of 8 subgroups are shown." in report.html and "The latest 5 of 8 lots are listed." in report.html
    assert list(_dispositions(report.html)) == [f"L{day}" for day in range(3, 8)]


def test_qa_review_lots_are_named_ordered_by_capture_and_flagged_by_their_own_value(tmp_path, sqlite_url):
    """Sets without a lot showed as "-", a real lot named "-" was flagged for them, and L10 came before L2."""
    from sqlalchemy import select

    from defectscan.db.queries_report import NO_LOT
    from defectscan.db.schema import Image
    from defectscan.review.record import review_images

    db = _Recorded(sqlite_url, tmp_path)
    for day, lot in enumerate(("L2", "L10", "-", None)):
        image_set = db.image_set(f"S{day}", 5, lot=lot, line="A", acquired_at=f"2026-03-0{day + 1}T08:00:00Z")
        db.run(image_set, {p: "fail" for p in range(5)})
        with db.factory() as session:
            images = list(session.scalars(select(Image.id).where(Image.image_set_id == image_set.id)))
            review_images(session, images, "pass" if lot is None else "fail", by="qa")  # the set without a lot: all false calls
    db.engine.dispose()

    html = _build(sqlite_url, Scope(line="A")).html
    section = " ".join(html.split('id="qa-review"', 1)[1].split("</section>", 1)[0].split())
    rows = re.findall(r'<tr( class="signal")?><td>([^<]*)</td>', section)
    assert [(_unescape(lot), bool(signal)) for signal, lot in rows] == [("L2", False), ("L10", False), ("-", False), (NO_LOT, True)]


def test_a_large_image_is_drawn_in_part_whatever_its_defects(monkeypatch):
    """A strip without defects (a comparison's pass side), or with defects at its two ends, was read and drawn whole."""
    from defectscan.report import build

    monkeypatch.setattr(build, "WHOLE_IMAGE_PIXELS", 100 * 100)
    monkeypatch.setattr(build, "CROP_MARGIN", 4)
    shape = (300, 2000)
    assert build.picture_window((100, 100), []) is None  # small enough: drawn whole
    assert build.picture_window(shape, []) == (100, 950, 200, 1050)  # nothing to show: its middle
    near = [{"bbox": [10, 20, 30, 50]}, {"bbox": [40, 60, 50, 70]}]
    assert build.picture_window(shape, near) == (6, 16, 54, 74)  # both defects, with the margin
    apart = [{"bbox": [100, 1900, 140, 1960]}, {"bbox": [10, 5, 12, 7]}]  # largest first, as drawable_inspections lists them
    assert build.picture_window(shape, apart) == (96, 1896, 144, 1964)
    huge = [{"bbox": [0, 0, 300, 1500]}]
    y0, x0, y1, x1 = build.picture_window(shape, huge)
    assert (y1 - y0, x1 - x0) == (100, 100) and (y0, x0) == (100, 702)


def test_a_lot_whose_new_sets_nothing_inspected_is_listed_within_the_filters_too(tmp_path, sqlite_url):
    """Any inspection of the lot, at any time or on any line, took it out of the listing cut to a night or a line."""
    import datetime as dt

    from defectscan.db.queries import Filters, list_lots

    db = _Recorded(sqlite_url, tmp_path)
    db.run(db.image_set("A1", 4, lot="A", line="A", acquired_at="2026-03-01T08:00:00Z"), {p: "pass" for p in range(4)})
    db.image_set("A2", 2, lot="A", line="D", acquired_at="2026-03-08T08:00:00Z")  # written the next week, not inspected
    db.image_set("B1", 2, lot="B", line="D", acquired_at="2026-03-08T09:00:00Z")
    since = dt.datetime(2026, 3, 8, tzinfo=dt.UTC)
    with db.factory() as session:
        everything = [(r["lot"], r["verdict"]) for r in list_lots(session).rows]
        that_night = [(r["lot"], r["verdict"]) for r in list_lots(session, Filters(since=since)).rows]
        line_d = [(r["lot"], r["verdict"]) for r in list_lots(session, Filters(line="D")).rows]
    assert everything == [("A", "incomplete"), ("B", "incomplete")]  # A's row is its inspected part, judged as a whole
    assert that_night == line_d == [("B", "incomplete"), ("A", "incomplete")]
    db.engine.dispose()

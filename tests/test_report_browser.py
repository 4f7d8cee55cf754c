"""The report in a real browser: headless Chromium renders the HTML without console errors, and prints the PDF.

Needs Chromium and pdftoppm (`.ci/run` installs both); without them the tests are skipped,
except under CI=true, where a missing browser is an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import unicodedata

import numpy as np
import pytest
from PIL import Image as PILImage

from defectscan.errors import ConfigError, DataError
from defectscan.report import pdf

HEADINGS = ("QA report: Line A", "Key figures", "Model evaluation", "Failed images per lot: p-chart", "Defects", "Worst images",
            "Lot disposition", "Errors and skipped images")


@pytest.fixture(scope="module")
def chromium():
    try:
        return pdf.find_chromium()
    except ConfigError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install Chromium: {exc}")
        pytest.skip(str(exc))


def console_messages(log: str) -> list[str]:
    """The page's console output as Chromium logs it with --enable-logging=stderr (page errors included)."""
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def report_files(chromium, sqlite_report_db, tmp_path_factory):
    from click.testing import CliRunner

    from defectscan.cli import main

    out = tmp_path_factory.mktemp("browser")
    html, pdf_path = out / "line-A.html", out / "line-A.pdf"
    result = CliRunner().invoke(main, ["--database-url", sqlite_report_db.url, "report", "--line", "A", "-o", str(html), "--pdf", str(pdf_path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {pdf_path}" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["line-A.html", "line-A.pdf"]  # written beside, then renamed
    return html, pdf_path


def _not_blank(picture: np.ndarray) -> None:
    gray = picture.astype(np.float32).mean(axis=2)
    assert gray.std() > 20, "the rendering is blank"
    assert (gray < 128).mean() > 0.01  # some ink: text, chart lines


def test_console_check_sees_page_errors(chromium, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><p>x</p><script>console.error("boom"); throw new Error("bad thing")</script></body></html>')
    run = pdf.screenshot(bad, tmp_path / "bad.png", height=300)
    found = console_messages(run.log)
    assert any("boom" in line for line in found) and any("Uncaught Error: bad thing" in line for line in found)


def test_report_renders_in_chromium_without_console_errors(report_files, tmp_path):
    html, _ = report_files
    run = pdf.screenshot(html, tmp_path / "shot.png", width=1280, height=2400)
    assert console_messages(run.log) == []
    shot = np.asarray(PILImage.open(run.output).convert("RGB"))
    assert shot.shape == (2400, 1280, 3)
    _not_blank(shot)
    # the p-chart's out-of-control ring is drawn in the report's red somewhere on the first screen
    red = (shot[:, :, 0] > 180) & (shot[:, :, 1] < 80) & (shot[:, :, 2] < 80)
    assert red.sum() > 50


def test_pdf_has_pages_headings_and_renders(report_files, tmp_path):
    from pypdf import PdfReader

    _, pdf_path = report_files
    reader = PdfReader(pdf_path)
    assert len(reader.pages) >= 2
    # NFKC: the PDF's text has ligatures ("ﬁ") where the HTML has letters
    text = unicodedata.normalize("NFKC", "\n".join(page.extract_text() for page in reader.pages))
    for heading in HEADINGS:
        assert heading in text, heading
    assert "L5<script>alert(1)" in text  # the lot name is shown as text (a table cell may wrap it), not run
    width = float(reader.pages[0].mediabox.width) / 72 * 25.4
    assert width == pytest.approx(210, abs=1)  # A4 from the print stylesheet

    if shutil.which("pdftoppm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install poppler-utils (pdftoppm)")
        pytest.skip("no pdftoppm")
    subprocess.run(["pdftoppm", "-f", "1", "-l", "1", "-r", "60", "-png", str(pdf_path), str(tmp_path / "page")], check=True)
    (page,) = tmp_path.glob("page*.png")
    _not_blank(np.asarray(PILImage.open(page).convert("RGB")))


def test_a_report_written_without_the_html_suffix_prints_as_a_page_not_its_source(report_files, tmp_path):
    """Chromium takes a file's type from its name: `-o out/report` printed the HTML source, 300 pages of base64."""
    from pypdf import PdfReader

    html, _ = report_files
    bare = tmp_path / "line-A-report"
    shutil.copyfile(html, bare)
    printed = pdf.print_pdf(bare, tmp_path / "bare.pdf").output
    text = unicodedata.normalize("NFKC", "\n".join(page.extract_text() for page in PdfReader(printed).pages))
    assert "<!DOCTYPE" not in text and HEADINGS[0] in text


def test_missing_html_and_missing_browser_are_errors(chromium, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such HTML file"):
        pdf.print_pdf(tmp_path / "none.html", tmp_path / "none.pdf")
    monkeypatch.setenv(pdf.CHROMIUM_ENV, str(tmp_path / "no-chromium"))
    with pytest.raises(ConfigError, match="no such executable"):
        pdf.find_chromium()
    monkeypatch.delenv(pdf.CHROMIUM_ENV)
    page, earlier = tmp_path / "page.html", tmp_path / "page.pdf"
    page.write_text("<p>x</p>")
    earlier.write_bytes(b"%PDF earlier")
    with pytest.raises(DataError, match="page.html: is the HTML file being rendered; give the .html another path"):
        pdf.print_pdf(page, page)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="apt-get install chromium"):
        pdf.find_chromium()
    with pytest.raises(ConfigError, match="apt-get install chromium"):
        pdf.print_pdf(page, earlier)
    assert page.read_text() == "<p>x</p>" and earlier.read_bytes() == b"%PDF earlier"  # nothing removed for a browser that is not there


def test_a_browser_that_fails_is_reported(tmp_path, monkeypatch):
    page = tmp_path / "page.html"
    page.write_text("<p>x</p>")
    monkeypatch.setenv(pdf.CHROMIUM_ENV, shutil.which("false"))
    with pytest.raises(DataError, match="Chromium could not render page.pdf"):
        pdf.print_pdf(page, tmp_path / "page.pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # nothing half-written left behind


def test_a_failed_render_leaves_the_earlier_pdf(tmp_path, monkeypatch):
    page, earlier = tmp_path / "page.html", tmp_path / "page.pdf"
    page.write_text("<p>x</p>")
    earlier.write_bytes(b"%PDF earlier")
    monkeypatch.setenv(pdf.CHROMIUM_ENV, shutil.which("false"))
    with pytest.raises(DataError, match="Chromium could not render page.pdf"):
        pdf.print_pdf(page, earlier)
    assert earlier.read_bytes() == b"%PDF earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "page.pdf"]

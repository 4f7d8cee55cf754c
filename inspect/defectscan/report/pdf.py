"""Headless Chromium: the report's PDF (print-to-PDF of the same HTML) and screenshots.

Chromium is found as $DEFECTSCAN_CHROMIUM, else the first of `chromium`, `chromium-browser`,
`google-chrome` on PATH. Each call gets a fresh profile directory and no network side traffic,
so a report renders the same offline, in CI and as root in a container (hence --no-sandbox).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from defectscan.errors import ConfigError, DataError
from defectscan.report.files import replacing

CHROMIUM_ENV = "DEFECTSCAN_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 120
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--mute-audio", "--enable-logging=stderr", "--v=0",
)


@dataclass(frozen=True)
class BrowserRun:
    output: Path
    log: str  # Chromium's stderr: console messages and load errors appear here


def find_chromium() -> str:
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        if shutil.which(configured) is None:
            raise ConfigError(f"{CHROMIUM_ENV}={configured!r}: no such executable")
        return configured
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        f"no Chromium found (looked for {', '.join(CANDIDATES)} on PATH): install it (Debian: apt-get install chromium) "
        f"or set {CHROMIUM_ENV} to its path; the HTML report does not need it"
    )


def _run(html: Path, output: Path, flag: str, *extra: str) -> BrowserRun:
    html = Path(html).resolve()
    if not html.is_file():
        raise DataError(f"{html}: no such HTML file to render")
    output = Path(output).resolve()
    if output == html:
        raise DataError(f"{output}: is the HTML file being rendered; give the {output.suffix or 'output'} another path")
    browser = find_chromium()
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(output) as partial, tempfile.TemporaryDirectory(prefix="defectscan-chromium-") as profile:
            page = html
            if html.suffix.lower() not in (".html", ".htm"):
                # Chromium takes a file's type from its name: `-o report` was printed as its HTML source, 300 pages of it.
                page = Path(profile) / "page.html"
                shutil.copyfile(html, page)
            command = [browser, *FLAGS, f"--user-data-dir={profile}", f"{flag}={partial}", *extra, page.as_uri()]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                raise DataError(f"{html}: Chromium did not finish rendering within {TIMEOUT_S} s") from None
            if done.returncode != 0 or not partial.is_file() or partial.stat().st_size == 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-5:])
                raise DataError(f"{html}: Chromium could not render {output.name} (exit {done.returncode}): {tail}")
    except OSError as exc:
        raise DataError(f"{output}: cannot write it: {exc.strerror or exc}") from None
    return BrowserRun(output, done.stderr)


def print_pdf(html: str | Path, pdf: str | Path) -> BrowserRun:
    """The HTML file printed to PDF with its print stylesheet (page size and margins from its @page rule)."""
    return _run(Path(html), Path(pdf), "--print-to-pdf", "--no-pdf-header-footer")


def screenshot(html: str | Path, png: str | Path, *, width: int = 1280, height: int = 2000) -> BrowserRun:
    """A PNG of the page's first `height` pixels at `width` pixels wide."""
    return _run(Path(html), Path(png), "--screenshot", f"--window-size={width},{height}")

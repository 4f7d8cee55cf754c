"""A shadow comparison as one self-contained HTML page: the figures, every flip, and the first flips drawn side by side.

What an ML engineer shows QA before a promotion: where the candidate's verdict differs from the
current version's, what QA decided there, and both versions' defects on the image. Same look and
same overlays as the QA report (report/build.py), no JavaScript, opens offline.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from defectscan import __version__
from defectscan.db.comparisons import Comparison
from defectscan.db.queries_report import drawable_inspections
from defectscan.errors import DataError
from defectscan.report.build import overlay, picture_window, render
from defectscan.times import iso_utc

DRAWN_FLIPS = 12  # flips drawn side by side; the table lists them all
FIGURES = (("images", "images judged by both"), ("agreement", "agreement"), ("pass_to_fail", "pass → fail"),
           ("fail_to_pass", "fail → pass"), ("reviewed", "QA-decided"), ("false_calls_fixed", "false calls fixed"),
           ("new_false_calls", "new false calls"), ("escapes_caught", "escapes caught"), ("new_escapes", "new escapes"))
# A flip's effect for QA (db/comparisons.FLIP_EFFECTS), one image's worth.
EFFECTS = {"false_calls_fixed": "false call fixed", "new_false_calls": "new false call", "escapes_caught": "escape caught",
           "new_escapes": "new escape"}
# The figures a candidate should not raise.
WORSE = ("new_false_calls", "new_escapes")


def comparison_html(session: Session, comparison: Comparison, *, drawn: int = DRAWN_FLIPS, now: dt.datetime | None = None) -> str:
    flips = comparison.flips
    ids = [i for flip in flips[:drawn] for i in (flip["current_inspection"], flip["candidate_inspection"])]
    found = drawable_inspections(session, ids)
    pairs = []
    for flip in flips[:drawn]:
        sides = {side: found.get(flip[f"{side}_inspection"]) for side in ("current", "candidate")}
        drawn_sides = [image for image in sides.values() if image is not None]
        # One window for both sides, so that they show the same part of the image (a pass side has no defects of its own).
        window = picture_window((drawn_sides[0]["source"].height, drawn_sides[0]["source"].width),
                                [d for image in drawn_sides for d in image["defects"]]) if drawn_sides else None
        pairs.append({"flip": flip, **{side: {**image, **overlay(image, window)} if image is not None else None for side, image in sides.items()}})
    figures = comparison.figures()
    context: dict[str, Any] = {
        "c": comparison, "figures": [(key, label, figures[key]) for key, label in FIGURES], "worse": WORSE, "effects": EFFECTS, "pairs": pairs,
        "generated_at": iso_utc((now or dt.datetime.now(dt.UTC)).replace(microsecond=0)), "version": __version__,
    }
    return render("comparison.html.j2", context)


def write_comparison_html(session: Session, comparison: Comparison, path: str | Path, **options: Any) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(comparison_html(session, comparison, **options), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot write the comparison: {exc.strerror or exc}") from None
    return path

"""The SVG charts: well-formed, inlinable, data labels escaped and kept out of mathtext, distinct ids."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from defectscan.report import charts
from defectscan.report.spc import p_chart

SVG = "{http://www.w3.org/2000/svg}"
NASTY = 'L5<script>alert("x")</script> & $\\alpha$'


def _texts(svg: str) -> str:
    return " ".join("".join(t.itertext()) for t in ET.fromstring(svg).iter(f"{SVG}text"))


def test_p_chart_svg_is_inline_svg_with_the_data_labels_as_escaped_text():
    chart = p_chart([("L1", 50, 1), (NASTY, 50, 30), ("L3", 50, 2)])
    svg = charts.p_chart_svg(chart, "lot")
    assert svg.startswith("<svg") and "<?xml" not in svg and "DOCTYPE" not in svg
    root = ET.fromstring(svg)  # well-formed XML
    assert root.get("class") == "chart" and root.get("viewBox") and root.get("width") is None
    assert "<script" not in svg and "&lt;script&gt;" in svg
    texts = _texts(svg)
    # the label survives as text, shortened, with its dollar signs literal rather than a formula
    assert charts.label_text(NASTY).replace("\\$", "$") in texts
    assert "out of control" in texts and "UCL" in texts


def test_label_text_shortens_and_shields_mathtext():
    assert charts.label_text("x" * 40) == "x" * 23 + "…"
    assert charts.label_text("$a$") == r"\$a\$"
    assert charts.label_text(r"L\1") == r"L\1"  # outside mathtext a backslash is drawn as it is


@pytest.mark.parametrize("label", [r"L\1", 'x id="q" url(#k)', "href=\"#k\"", r"\$5"])
def test_labels_are_drawn_as_given(label):
    """Neither matplotlib's escapes nor the id prefixes of several SVGs in one page change a label's text."""
    svg = charts.p_chart_svg(p_chart([("L1", 50, 1), (label, 50, 30)]), "lot")
    assert label in _texts(svg)


def test_each_chart_kind_draws_and_ids_do_not_collide_between_charts():
    svgs = [
        charts.p_chart_svg(p_chart([("a", 10, 1), ("b", 10, 2)]), "lot"),
        charts.pareto_svg(["bright", "dark", "none"], [3, 7, 0], "defect class"),
        charts.histogram_svg(["16–31", "32–63"], [4, 2]),
        charts.heatmap_svg([[0, 1], [2, 0]]),
    ]
    ids = [set(re.findall(r'\bid="([^"]+)"', svg)) for svg in svgs]
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not ids[i] & ids[j], (i, j, ids[i] & ids[j])
    pareto = _texts(svgs[1])
    # bars in decreasing order, empty classes left out
    assert pareto.index("dark") < pareto.index("bright") and "none" not in pareto
    assert "cumulative %" in pareto


def test_control_limits_span_each_subgroup_also_when_there_is_only_one():
    """One lot captured within an hour gives a one-point hour chart: its limits were zero-length paths, drawn as nothing."""
    import re

    from defectscan.report.charts import p_chart_svg
    from defectscan.report.spc import p_chart

    svg = p_chart_svg(p_chart([("L1", 100, 5)]), "hour (UTC)")
    spans = []
    for path in re.findall(r'<path d="([^"]*)"[^>]*?style="[^"]*stroke-dasharray', svg, re.S):
        xs = [float(x) for x in re.findall(r"[ML] ([-\d.]+) [-\d.]+", path)]
        spans.append(max(xs) - min(xs))
    limits = sorted(spans)[-2:]  # UCL and LCL; the legend's sample is the short one
    assert len(spans) == 3 and all(span > 300 for span in limits), spans

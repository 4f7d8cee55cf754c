"""The report's charts as inline SVG text, drawn with matplotlib's object API (no pyplot, no global figure state).

Text stays text in the SVG (`svg.fonttype: none`) so the PDF is searchable and labels from data
are XML-escaped by matplotlib's SVG writer. Labels from data are also shielded from mathtext
(`$` would start a formula) and shortened. Each chart's ids (and references to them) get the
chart's own prefix, so several SVGs inlined into one HTML document never share an id.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from defectscan.report.spc import PChart

WIDTH, HEIGHT = 9.0, 3.6  # inches at 72 dpi in the SVG; the page scales them to its width
BLUE, RED, GRAY, ORANGE = "#1f5fa8", "#c62828", "#616161", "#ef6c00"
HALF_WIDTH, HALF_HEIGHT = 5.0, 3.4  # charts shown two side by side
MAX_LABEL = 24
MAX_TICKS = 40


def label_text(value: object, limit: int = MAX_LABEL) -> str:
    """A data value as a safe axis label: no mathtext, at most `limit` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    # matplotlib reads a backslash as an escape only before `$` (and in mathtext, which this keeps
    # out): `L\1` is drawn as written, `\$` as `$`
    return text.replace("$", r"\$")


def _svg(figure, salt: str) -> str:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9}):
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    # inline SVG in HTML: drop the XML prolog and DOCTYPE, let CSS size it
    text = text[text.index("<svg"):]
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart" role="img"', text, count=1)
    # matplotlib numbers its ids per figure (figure_1, axes_1, ...): prefix them and every reference,
    # in tags only, so that a label that reads like one (`id="q" url(#k)`) is drawn as it was given
    return re.sub(r"<[^>]*>", lambda tag: _prefix_ids(tag.group(0), salt), text)


def _prefix_ids(tag: str, salt: str) -> str:
    tag = re.sub(r'(\sid=")([^"]+)"', rf'\1{salt}-\2"', tag)
    tag = re.sub(r'url\(#([^)]+)\)', rf'url(#{salt}-\1)', tag)
    return re.sub(r'(href=")#([^"]+)"', rf'\1#{salt}-\2"', tag)


def _figure(height: float = HEIGHT, width: float = WIDTH):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"font.size": 9}):
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.add_subplot()
    axes.spines[["top", "right"]].set_visible(False)
    axes.grid(axis="y", color="#e0e0e0", linewidth=0.6)
    axes.set_axisbelow(True)
    return figure, axes


def _ticks(axes, labels: Sequence[str], rotate: bool = True) -> None:
    step = max(1, -(-len(labels) // MAX_TICKS))
    positions = list(range(0, len(labels), step))
    axes.set_xticks(positions, [label_text(labels[i]) for i in positions], rotation=45 if rotate else 0,
                    ha="right" if rotate else "center", fontsize=8)


def p_chart_svg(chart: PChart, subgroup: str, what: str = "fraction of images failed") -> str:
    """Fraction failed (or `what`) per subgroup, centre line, stepped 3-sigma limits, out-of-control points in red."""
    figure, axes = _figure()
    points = chart.points
    xs = list(range(len(points)))
    axes.plot(xs, [p.p for p in points], color=BLUE, marker="o", markersize=4, linewidth=1.2, label=what.replace(" of images", ""))
    axes.axhline(chart.center, color=GRAY, linewidth=1.0, label=f"centre p̄ = {chart.center:.4f}")
    # Each subgroup's limits span its whole slot: a step through the points drew nothing for a single subgroup
    # and half a slot for the first and the last.
    edges = [x - 0.5 for x in xs] + [len(xs) - 0.5]
    axes.stairs([p.ucl for p in points], edges, color=RED, linestyle="--", linewidth=1.0, baseline=None, label=f"UCL / LCL ({chart.sigma:g}σ)")
    axes.stairs([p.lcl for p in points], edges, color=RED, linestyle="--", linewidth=1.0, baseline=None)
    out = [(x, p.p) for x, p in zip(xs, points) if p.out_of_control]
    if out:
        axes.scatter([x for x, _ in out], [y for _, y in out], s=70, facecolors="none", edgecolors=RED, linewidths=1.8,
                     zorder=5, label="out of control")
    _ticks(axes, [p.label for p in points])
    axes.set_xlim(-0.5, max(0.5, len(points) - 0.5))
    top = max([p.p for p in points] + [p.ucl for p in points] + [chart.center])
    axes.set_ylim(0, min(1.0, top * 1.1) or 0.05)
    axes.set_ylabel(what)
    axes.set_xlabel(subgroup)
    # above the plot, so that no legend hides a point
    figure.legend(loc="outside upper left", fontsize=8, frameon=False, ncols=4)
    return _svg(figure, "p-chart")


def pareto_svg(labels: Sequence[str], counts: Sequence[int], what: str) -> str:
    """Bars in decreasing order (empty ones left out) with the cumulative share on a second axis."""
    figure, axes = _figure(HALF_HEIGHT, HALF_WIDTH)
    order = sorted((i for i in range(len(counts)) if counts[i]), key=lambda i: -counts[i])
    values = [counts[i] for i in order]
    names = [labels[i] for i in order]
    xs = list(range(len(values)))
    axes.bar(xs, values, color=BLUE, width=0.7)
    total = sum(values) or 1
    running, cumulative = 0, []
    for v in values:
        running += v
        cumulative.append(100.0 * running / total)
    share = axes.twinx()
    share.plot(xs, cumulative, color=ORANGE, marker="o", markersize=4, linewidth=1.2)
    share.set_ylim(0, 105)
    share.set_ylabel("cumulative %")
    share.spines[["top"]].set_visible(False)
    _ticks(axes, names, rotate=len(names) > 6)
    axes.set_ylabel("defects")
    axes.set_xlabel(what)
    return _svg(figure, "pareto")


def histogram_svg(labels: Sequence[str], counts: Sequence[int]) -> str:
    """Defects per area bin (bins as labelled, typically doubling)."""
    figure, axes = _figure(HALF_HEIGHT, HALF_WIDTH)
    xs = list(range(len(counts)))
    axes.bar(xs, counts, color=BLUE, width=0.9)
    _ticks(axes, labels, rotate=True)
    axes.set_ylabel("defects")
    axes.set_xlabel("defect area (pixels)")
    return _svg(figure, "histogram")


def heatmap_svg(grid: Sequence[Sequence[int]]) -> str:
    """Defect centroids per cell of the image, top of the image at the top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6, 3.8), layout="constrained")
    axes = figure.add_subplot()
    size = len(grid)
    mesh = axes.pcolormesh(range(size + 1), range(size + 1), grid, cmap="inferno_r", shading="flat")
    axes.set_xlim(0, size)
    axes.set_ylim(size, 0)
    axes.set_aspect("equal")
    axes.set_xticks([0, size / 2, size], ["0", "½", "1"])
    axes.set_yticks([0, size / 2, size], ["0", "½", "1"])
    axes.set_xlabel("x (share of image width)")
    axes.set_ylabel("y (share of image height)")
    from matplotlib.ticker import MaxNLocator

    figure.colorbar(mesh, ax=axes, label="defects", ticks=MaxNLocator(integer=True))
    return _svg(figure, "heatmap")

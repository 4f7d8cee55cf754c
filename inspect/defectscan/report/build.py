"""A QA report: the scope's aggregations (db/queries_report.py) as one self-contained HTML file, and its PDF.

The HTML has inline CSS (with a print stylesheet), inline SVG charts and the worst images as
PNG data URIs: it opens offline and needs no JavaScript. Every value from the data goes
through Jinja2's autoescaping; chart labels are escaped by the SVG writer (report/charts.py).

Lot disposition: db/queries.py's `WholeLot.disposition`, the one `defectscan lots` shows, over the
whole lot whatever the report's scope ("hold" above hold_above or with more than max_errors images in
error, also when that holds whatever its images without a result turn out to be; "incomplete" when some
of its registered images have no result or none was judged; else "release"), and on a lot-level p-chart also "hold" above the upper control limit;
the rules are `HoldRules`, whose defaults are documented there and are `defectscan report` options.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from defectscan import __version__
from defectscan.db import queries_report as q
from defectscan.db.queries import MAX_ERRORS, Filters, WholeLot, check_filters, failed_share, hold_rules, whole_lots
from defectscan.db.reviews import ReviewFigures, class_figures, review_figures, review_figures_rows
from defectscan.db.schema import Model
from defectscan.errors import DataError
from defectscan.report import charts
from defectscan.report.files import replacing
from defectscan.report.spc import SIGMA, PChart, p_chart
from defectscan.times import iso_utc

TEMPLATES = Path(__file__).with_name("templates")
# Overlays larger than this many pixels are cropped to their defects; shown at most THUMBNAIL wide/high.
WHOLE_IMAGE_PIXELS = 2048 * 2048  # larger images are drawn in part: picture_window
THUMBNAIL = 480
CROP_MARGIN = 64  # pixels of context around the defects of a cropped overlay
LABELLED_FROM = 256


@dataclass(frozen=True)
class Scope:
    """What a report covers: one lot, one line (optionally over a period), or one job run; optionally one model version."""

    lot: str | None = None
    line: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    job_run: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in ("lot", "line", "job_run") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise DataError("a report covers one lot (--lot), one line (--line, with --since/--until) or one job run (--job-run); "
                            f"got {', '.join('--' + c.replace('_', '-') for c in chosen) or 'none of them'}")
        if (self.since or self.until) and self.line is None:
            raise DataError("--since/--until select a period of a line: use them with --line")

    def filters(self, model: str | None = None) -> Filters:
        return Filters(lot=self.lot, line=self.line, since=self.since, until=self.until, job_run=self.job_run, model=model or self.model)

    def title(self) -> str:
        if self.lot is not None:
            return f"Lot {self.lot}"
        if self.line is not None:
            return f"Line {self.line}"
        return f"Job run {self.job_run}"

    def period(self) -> str:
        if self.line is None:
            return ""
        return f"{iso_utc(self.since) or 'start'} – {iso_utc(self.until) or 'now'}"


@dataclass(frozen=True)
class HoldRules:
    """When a lot is held instead of released.

    - failed share above `hold_above` (default: the qa.hold_above setting of configs/defaults.yaml);
    - more than `max_errors` images in error (default db/queries.MAX_ERRORS, none: unjudged parts block a release);
    - its failed share above its p-chart upper control limit, when `out_of_control` (default on;
      lot-level charts only: a one-lot report charts hours, which does not judge the lot).
    """

    hold_above: float | None = None
    max_errors: int = MAX_ERRORS
    out_of_control: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hold_above", hold_rules(self.hold_above, self.max_errors)[0])


@dataclass(frozen=True)
class ReportOptions:
    rules: HoldRules = field(default_factory=HoldRules)
    sigma: float = SIGMA
    worst: int = 6  # worst images shown with overlays
    max_subgroups: int = 100  # latest lots/hours on the p-chart and in the lot table
    grid: int = 24  # heatmap cells per side
    area_edges: tuple[int, ...] = tuple(2**k for k in range(21))  # doubling bins from 1 pixel to 1 Mpixel
    size_edges: tuple[int, ...] = (1, 16, 64, 256, 1024)  # size classes for a single-class model's Pareto
    listed: int = 50  # error and not-inspected images listed by key

    def __post_init__(self) -> None:
        if self.worst < 0 or self.max_subgroups < 1 or self.grid < 1 or self.listed < 0:
            raise DataError("report options: --worst and the listing sizes must not be negative")
        if self.sigma <= 0:
            raise DataError(f"sigma {self.sigma}: expected a positive number of standard deviations")


@dataclass
class Report:
    html: str
    summary: dict[str, Any]


# --- formatting -------------------------------------------------------------------------------------------------


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "–"


def _edges_labels(edges: tuple[int, ...]) -> list[str]:
    labels = []
    for i, low in enumerate(edges):
        if i + 1 == len(edges):
            labels.append(f"≥ {low}")
        elif edges[i + 1] - low == 1:
            labels.append(f"{low}")
        else:
            labels.append(f"{low}–{edges[i + 1] - 1}")
    return labels


def _trim(labels: list[str], counts: list[int]) -> tuple[list[str], list[int]]:
    """Drop empty bins before the first and after the last non-empty one."""
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return [], []
    return labels[used[0] : used[-1] + 1], counts[used[0] : used[-1] + 1]


def _metrics(model: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any] | None]:
    """The model's scalar evaluation metrics, and its per-threshold row nearest the model's threshold."""
    metrics = model["metrics"] or {}
    scalars = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    row = None
    table = metrics.get("thresholds")
    if isinstance(table, dict) and table:
        def distance(key: str) -> float:
            try:
                return abs(float(key) - model["threshold"])
            except ValueError:
                return float("inf")
        key = min(table, key=distance)
        if isinstance(table[key], dict):
            row = {"threshold": key, **{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in table[key].items()}}
    return scalars, row


def _verdict_rows(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The verdict rule the lot was judged by, and the held-out figures it was chosen on and scored."""
    point = model.get("operating_point") or {}
    rows = []
    if point:
        rows.append(("verdict rule", f"threshold {point['threshold']:g}, min defect area {point['min_defect_area']} px, fail score {point['fail_score']:g}"))
        if point.get("figures"):
            rows.append(("chosen on", f"{point.get('chosen_on', 'held-out images')}, for a false-call rate of at most {point['target_false_call_rate']:g}"))
            rows.extend(_figure_rows("validation", point["figures"]))
            if point.get("caution"):
                rows.append(("caution", point["caution"]))
        elif point.get("chosen_by"):
            rows.append(("chosen by", point["chosen_by"]))
    if isinstance((model["metrics"] or {}).get("verdict_rule"), dict):
        rows.extend(_figure_rows("evaluation", model["metrics"]["verdict_rule"]))
    return rows


def _figure_rows(where: str, figures: dict[str, Any]) -> list[tuple[str, str]]:
    def f(key: str) -> str:
        value = figures.get(key)
        return "-" if value is None else f"{value:.3f}"

    return [
        (f"{where}: images", f"{figures['images']} ({figures['defective_images']} defective)"),
        (f"{where}: escape rate / false-call rate", f"{f('escape_rate')} / {f('false_call_rate')}"),
        (f"{where}: Dice (all / defective images)", f"{f('dice')} / {f('dice_defective')}"),
    ]


# --- parts ----------------------------------------------------------------------------------------------------------


def _above(keys: list[Any], subgroups: list[tuple[str, int, int]], chart: PChart) -> dict[Any, Any]:
    """The chart's points above their upper limit, by the subgroups' keys (lot values): a label can be shared, as a lot
    named "(no lot)" shares the label of the sets without a lot. Points are the subgroups with judged images, in order."""
    used = [key for key, (_, n, _) in zip(keys, subgroups, strict=True) if n > 0]
    return {key: point for key, point in zip(used, chart.points, strict=True) if point.signal == "above"}


def _disposition(groups: list[dict[str, Any]], above: dict[Any, Any], rules: HoldRules, whole: dict[Any, WholeLot]) -> list[dict[str, Any]]:
    """Each lot's disposition from the whole lot (`whole`, by lot): a report cut to a job run or a time window judged
    only the part of a lot in it, and images left without a result never stopped a release. `above`: the lots above
    their p-chart upper limit, by lot."""
    rows = []
    for g in groups:
        judged = g["images"] - g["errors"]
        share = f"{100 * failed_share(g['images'], g['failed'], g['errors']):.1f} %" if judged > 0 else "-"
        lot = whole[g["key"]]
        disposition, reasons = lot.disposition(rules.hold_above, rules.max_errors)
        if (lot.images, lot.failed, lot.errors) != (g["images"], g["failed"], g["errors"]):
            reasons = [f"the whole lot: {'; '.join(reasons)}"] if reasons else []
        if disposition != "incomplete":
            if rules.out_of_control and g["key"] in above:
                reasons.append(f"above the upper control limit {above[g['key']].ucl:.3f}")
            disposition = "hold" if reasons else "release"
        rows.append({**g, "judged": judged, "share": share, "disposition": disposition, "reasons": reasons})
    return rows


def _chart_and_lots(session: Session, filters: Filters, model: dict[str, Any], options: ReportOptions, *, by_hour: bool,
                    lot_groups: tuple[list[dict[str, Any]], int]) -> dict[str, Any]:
    """The p-chart (per hour for one lot, else per lot) and the lot dispositions. Over every lot of the scope: with more
    than max_subgroups lots the centre line, the limits, the hold count and the key figure covered only the latest
    ones; only the drawing and the table are cut to the latest max_subgroups."""
    lots, lots_total = lot_groups
    groups, n_groups = q.hour_groups(session, filters, limit=options.max_subgroups) if by_hour else (lots, lots_total)
    subgroups = [(g["label"], g["images"] - g["errors"], g["failed"]) for g in groups]
    chart = p_chart(subgroups, options.sigma)
    drawn = replace(chart, points=chart.points[-options.max_subgroups:])
    whole = whole_lots(session, filters, [(lot["key"], model["id"]) for lot in lots])
    above = {} if by_hour else _above([g["key"] for g in groups], subgroups, chart)
    disposed = _disposition(lots, above, options.rules, {lot: figures for (lot, _), figures in whole.items()})
    listed = disposed[-options.max_subgroups:]
    _in_production(session, model, listed)
    return {
        "subgroup": "hour (UTC)" if by_hour else "lot",
        "subgroups_shown": len(drawn.points) if not by_hour else len(groups), "subgroups_total": n_groups,
        "pchart": chart,
        "pchart_svg": charts.p_chart_svg(drawn, "hour (UTC)" if by_hour else "lot") if drawn.points else None,
        "lots": listed, "lots_total": lots_total,
        "held": sum(1 for lot in disposed if lot["disposition"] != "release"),
    }


def _in_production(session: Session, model: dict[str, Any], lots: list[dict[str, Any]]) -> None:
    """Each lot's versions of the model's name in production while the report's version inspected it (its stage history)."""
    from defectscan.model.stages import UNKNOWN, in_production_between, production_timeline

    def label(version: str | None) -> str:
        return "none" if version is None else "unknown (before the stage history)" if version == UNKNOWN else f"{model['name']}:{version}"

    timeline = production_timeline(session, model["name"])
    for lot in lots:
        versions = in_production_between(timeline, *lot["inspected"])
        lot["in_production"] = " → ".join(label(v) for v in versions)
        lot["shadow"] = model["version"] not in versions and UNKNOWN not in versions


def _review(session: Session, filters: Filters, model: dict[str, Any], sigma: float, lots_in_order: list[Any]) -> dict[str, Any] | None:
    """QA's figures per lot (db/reviews.py) and a p-chart of the false-call rate per lot; None before any decision."""
    per_lot = {lot: f for (lot, model_id), f in review_figures(session, filters).items() if model_id == model["id"]}
    if not per_lot:
        return None
    total = ReviewFigures()
    for f in per_lot.values():
        total.add(f)
    # In production order (the lots' first capture), as a control chart is read; the others after them.
    order = {lot: i for i, lot in enumerate(lots_in_order)}
    lots = sorted(per_lot, key=lambda lot: (order.get(lot, len(order)), lot is None, lot or ""))
    subgroups = [(lot if lot is not None else q.NO_LOT, per_lot[lot].failed_reviewed, per_lot[lot].false_calls) for lot in lots]
    chart = p_chart(subgroups, sigma)
    flagged = _above(lots, subgroups, chart)
    above = list(flagged.values())
    label = f"{model['name']}:{model['version']}"
    return {
        "rows": [{"lot": name, "flagged": lot in flagged, **per_lot[lot].as_row()} for lot, (name, _, _) in zip(lots, subgroups, strict=True)],
        "lines": [row for row in review_figures_rows(session, filters, by="line") if row["model"] == label],
        "classes": [row for row in class_figures(session, filters) if row["model"] == label],
        "total": total.as_row(),
        "chart": chart,
        "out_of_control": above,
    }


def picture_window(shape: tuple[int, int], defects: list[dict[str, Any]]) -> tuple[int, int, int, int] | None:
    """The part of an image drawn: all of it up to WHOLE_IMAGE_PIXELS, else its defects (largest first), else its middle;
    never more than WHOLE_IMAGE_PIXELS. (A strip without defects, or with two at its two ends, was read and drawn whole:
    2.4 GB for 64 megapixels, and a small defect vanished in the thumbnail.)"""
    from defectscan.report.overlay import crop_window

    height, width = shape
    if height * width <= WHOLE_IMAGE_PIXELS:
        return None
    boxes = [d["bbox"] for d in defects]
    window = (0, 0, height, width)
    if boxes:
        union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        window = crop_window(union, shape, margin=CROP_MARGIN)
        if (window[2] - window[0]) * (window[3] - window[1]) > WHOLE_IMAGE_PIXELS:
            window = crop_window(boxes[0], shape, margin=CROP_MARGIN)
    return _at_most(window, shape, int(WHOLE_IMAGE_PIXELS**0.5))


def _at_most(window: tuple[int, int, int, int], shape: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """`window` cut to at most side x side pixels about its centre, inside the image."""
    y0, x0, y1, x1 = window
    edges = []
    for low, high, size in ((y0, y1, shape[0]), (x0, x1, shape[1])):
        if high - low > side:
            low = min(max(0, (low + high - side) // 2), size - side)
            high = low + side
        edges.append((low, high))
    (y0, y1), (x0, x1) = edges
    return y0, x0, y1, x1


def overlay(image: dict[str, Any], window: tuple[int, int, int, int] | None | str = "own") -> dict[str, Any]:
    """The worst image with score tint and defect contours, as a PNG data URI (or why it could not be drawn); the
    part `window` of it (`picture_window`: "own" chooses it from the image's own defects)."""
    from defectscan.report.pixels import draw

    source = image["source"]
    if window == "own":
        window = picture_window((source.height, source.width), image["defects"])
    try:
        # labels are drawn in a fixed-size font: on small images they would cover the defects
        side = max(window[2] - window[0], window[3] - window[1]) if window else max(source.height, source.width)
        picture = draw(source, image["defects"], window, labels=side >= LABELLED_FROM)
    except DataError as exc:
        return {"overlay": None, "overlay_error": str(exc), "window": window}
    from PIL import Image as PILImage

    # small images are enlarged (nearest neighbour keeps contours crisp), large ones reduced
    scale = THUMBNAIL / max(picture.size)
    if scale > 1:
        factor = max(1, int(scale))
        picture = picture.resize((picture.width * factor, picture.height * factor), PILImage.Resampling.NEAREST)
    elif scale < 1:
        picture.thumbnail((THUMBNAIL, THUMBNAIL), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return {"overlay": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), "overlay_error": None,
            "window": window}


def _choose_model(session: Session, scope: Scope) -> dict[str, Any] | None:
    if scope.model is not None:
        return q.model_info(session, scope.model)
    found = q.scope_models(session, scope.filters())
    if not found:
        return None
    production = [m for m in found if session.get(Model, m["id"]).stage == "production"]
    if len(found) > 1 and len(production) == 1:
        # A candidate compared in the shadow of the production version: the report is the production one's.
        return q.model_info(session, production[0]["label"])
    if len(found) > 1:
        listed = ", ".join(f"{m['label']} ({m['inspections']} images)" for m in found)
        raise DataError(f"{scope.title()} has results of several model versions: {listed}; choose one with --model NAME:VERSION")
    return q.model_info(session, found[0]["label"])


# --- the report -------------------------------------------------------------------------------------------------------


def collect(session: Session, scope: Scope, options: ReportOptions = ReportOptions(), *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything the template shows, from a few aggregate queries; pixels only for the worst images."""
    check_filters(session, scope.filters())
    generated = iso_utc((now or dt.datetime.now(dt.UTC)).replace(microsecond=0))
    context: dict[str, Any] = {"scope": scope, "title": scope.title(), "period": scope.period(), "generated_at": generated,
                               "version": __version__, "rules": options.rules, "options": options, "job_runs": [],
                               "not_inspected_count": 0, "not_inspected": [], "review": None, "review_svg": None}
    model = _choose_model(session, scope)
    context["model"] = model
    if model is None:
        context["empty"] = True
        context["totals"] = None
        if scope.job_run is None:  # registered and waiting: the report says so, as it does for a model with no result
            context["not_inspected_count"], context["not_inspected"] = q.not_inspected(session, scope.filters(), None, limit=options.listed)
        return context
    filters = scope.filters(f"{model['name']}:{model['version']}")
    totals = q.totals(session, filters)
    context["totals"] = totals
    context["empty"] = totals["images"] == 0
    context["metrics"], context["metrics_row"] = _metrics(model)
    context["verdict_rows"] = _verdict_rows(model)
    context["job_runs"] = q.job_runs(session, filters)
    # Every lot of the scope, in capture order: one query for the review chart's order, the p-chart and the dispositions.
    lot_groups = q.lot_groups(session, filters, limit=None)
    context["review"] = review = _review(session, filters, model, options.sigma, [g["key"] for g in lot_groups[0]])
    chart = review["chart"] if review else None
    context["review_svg"] = charts.p_chart_svg(chart, "lot", what="fraction of failed images QA passed") if chart and len(chart.points) > 1 else None
    if scope.job_run is None:
        context["not_inspected_count"], context["not_inspected"] = q.not_inspected(session, filters, model["id"], limit=options.listed)
    else:
        context["not_inspected_count"], context["not_inspected"] = 0, []
    if context["empty"]:
        return context

    context.update(_chart_and_lots(session, filters, model, options, by_hour=totals["lots"] == 1, lot_groups=lot_groups))

    classes = q.class_counts(session, filters)
    context["classes"] = classes
    if len(model["classes"]) > 1:
        context["pareto_what"] = "defect class"
        pareto_labels, pareto_counts = [c["class"] for c in classes], [c["defects"] for c in classes]
    else:
        context["pareto_what"] = "defect size class (pixels)"
        pareto_labels = _edges_labels(options.size_edges)
        pareto_counts = q.area_counts(session, filters, options.size_edges)
    context["pareto"] = [{"label": lab, "count": n} for lab, n in zip(pareto_labels, pareto_counts) if n]
    context["pareto_svg"] = charts.pareto_svg(pareto_labels, pareto_counts, context["pareto_what"]) if sum(pareto_counts) else None

    hist_labels, hist_counts = _trim(_edges_labels(options.area_edges), q.area_counts(session, filters, options.area_edges))
    context["histogram_svg"] = charts.histogram_svg(hist_labels, hist_counts) if hist_counts else None
    grid = q.position_grid(session, filters, options.grid)
    context["heatmap_svg"] = charts.heatmap_svg(grid) if any(any(row) for row in grid) else None

    worst = q.worst_images(session, filters, options.worst)
    for image in worst:
        image.update(overlay(image))
    context["worst"] = worst
    context["errors"] = q.error_images(session, filters, limit=options.listed)
    return context


def _environment():
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    environment.filters["pct"] = _pct
    environment.filters["lot"] = lambda lot: q.NO_LOT if lot is None else lot
    environment.filters["num"] = lambda v: f"{v:,}".replace(",", " ") if isinstance(v, int) else v
    return environment


def render(template: str, context: dict[str, Any]) -> str:
    return _environment().get_template(template).render(**context)


def build_report(session: Session, scope: Scope, options: ReportOptions = ReportOptions(), *, now: dt.datetime | None = None) -> Report:
    """The report as HTML text, with a summary of its figures (what the CLI prints)."""
    from markupsafe import Markup

    context = collect(session, scope, options, now=now)
    for name in ("pchart_svg", "pareto_svg", "histogram_svg", "heatmap_svg", "review_svg"):
        if context.get(name):
            context[name] = Markup(context[name])  # matplotlib's SVG: its text is XML-escaped by the writer
    html = render("report.html.j2", context)
    totals = context["totals"] or {}
    summary = {
        "scope": scope.title(), "model": f"{context['model']['name']}:{context['model']['version']}" if context["model"] else None,
        "images": totals.get("images", 0), "failed": totals.get("failed", 0), "errors": totals.get("errors", 0),
        "defects": totals.get("defects", 0), "lots": context.get("lots_total", 0), "held": context.get("held", 0),
        "out_of_control": len(context["pchart"].signals) if context.get("pchart") else 0, "empty": context["empty"],
        "rules": asdict(options.rules),
    }
    return Report(html, summary)


def write_report(
    session: Session, scope: Scope, html_path: str | Path, *, pdf_path: str | Path | None = None,
    options: ReportOptions = ReportOptions(), now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Write the HTML report (and its PDF via headless Chromium); returns the summary with the paths written."""
    report = build_report(session, scope, options, now=now)
    html_path = Path(html_path)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(html_path) as partial:
            partial.write_text(report.html, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{html_path}: cannot write the report: {exc.strerror or exc}") from None
    summary = {**report.summary, "html": str(html_path)}
    if pdf_path is not None:
        from defectscan.report.pdf import print_pdf

        summary["pdf"] = str(print_pdf(html_path, pdf_path).output)
    return summary

"""`defectscan defects | images | lots`: query inspection results (thin over db/queries.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.cli.output import ROW_ID, limit_options, output_options, print_record, print_rows
from defectscan.db.queries import MAX_ERRORS  # an option's default; the CLI imports db/queries anyway (cli/report.py)

_OUT_PNG = click.Path(dir_okay=False, writable=True, path_type=Path)


def filter_options(f: Callable) -> Callable:
    """The selection options shared by the listing commands; the command receives them as `filters`."""
    from defectscan import provenance

    # Keyed by the parameter each option fills.
    options = {name: click.option(f"--{name}", help=f"Only this {provenance.MEANING[name]}.") for name in provenance.LABELS}
    options.update({
        "since": click.option("--since", metavar="WHEN", help="Captured at or after WHEN (ISO 8601 date or time, UTC unless given)."),
        "until": click.option("--until", metavar="WHEN", help="Captured before WHEN; a bare date includes that whole day."),
        "model_ref": click.option("--model", "model_ref", metavar="MODEL", help="Only results of this model version (NAME: its latest; NAME:* every version)."),
        "job_run": click.option("--job-run", type=ROW_ID, metavar="ID", help="Only results written by this job run."),
        "verdict": click.option("--verdict", type=click.Choice(["pass", "fail", "error"]), help="Only images with this verdict."),
        "defect_class": click.option("--class", "defect_class", metavar="NAME", help="Only defects of this class (images: having one)."),
        "min_area": click.option("--min-area", type=click.IntRange(min=0), help="Smallest defect area in pixels (images: defect pixels)."),
        "max_area": click.option("--max-area", type=click.IntRange(min=0), help="Largest defect area in pixels (images: defect pixels)."),
        "min_score": click.option("--min-score", type=click.FloatRange(0, 1), help="Lowest peak score, 0..1."),
        "max_score": click.option("--max-score", type=click.FloatRange(0, 1), help="Highest peak score, 0..1."),
    })

    def wrapper(*args, **kwargs):
        from defectscan.db.queries import Filters, parse_when

        given = {name: kwargs.pop(name) for name in options}
        since, until = given.pop("since"), given.pop("until")
        kwargs["filters"] = Filters(
            since=parse_when(since, "--since") if since is not None else None,
            until=parse_when(until, "--until", end_of_day=True) if until is not None else None,
            model=given.pop("model_ref"),
            **given,
        )
        return f(*args, **kwargs)

    wrapper = _wraps(wrapper, f)
    for option in reversed(options.values()):
        wrapper = option(wrapper)
    return wrapper


def _wraps(wrapper: Callable, f: Callable) -> Callable:
    from functools import update_wrapper

    wrapper = update_wrapper(wrapper, f)
    # click reads options collected on the function; the wrapper must start from f's own.
    wrapper.__click_params__ = list(getattr(f, "__click_params__", []))
    return wrapper


def _sort_options(choices: list[str]) -> Callable:
    def decorate(f: Callable) -> Callable:
        f = click.option("--asc", "ascending", is_flag=True, help="Ascending order (default: descending).")(f)
        return click.option("--sort", type=click.Choice(choices), default="id", show_default=True, help="Order rows by this.")(f)

    return decorate


def _more_hint(page, limit: int) -> str | None:
    return f"more rows follow: add --offset {page.offset + limit}" if page.more else None


def _empty(what: str, filters, offset: int = 0) -> str:
    given = filters.given()
    where = f" ({', '.join(f'{k}={_show(v)}' for k, v in given.items())})" if given else ""
    if offset:
        # a page past the last row: rows may well match, just not this many
        return f"no {what} at offset {offset}: fewer {what} match{where}"
    return f"no {what} match{where}"


def _show(value: Any) -> str:
    from defectscan.times import iso_utc

    return iso_utc(value) if hasattr(value, "tzinfo") else repr(value) if isinstance(value, str) else str(value)


# --- defects ------------------------------------------------------------------------------------------------------------


@click.group("defects")
def defects() -> None:
    """List and show detected defects.

    \b
    Example:
        defectscan defects list --lot L042 --class scratch --min-score 0.8 --limit 20
        defectscan defects show 1234 --crop defect.png
    """


DEFECT_TABLE = ("id", "image_key", "lot", "acquired_at", "model", "class", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "max_score")


@defects.command("list")
@filter_options
@_sort_options(["id", "time", "area", "score", "class"])
@limit_options()
@output_options
@pass_app
def defects_list(app: AppContext, filters, sort: str, ascending: bool, limit: int, offset: int, fmt: str) -> None:
    """List defects, newest first; filters combine with AND.

    The table shows the main columns; csv/json/ndjson carry every column in a fixed order.

    \b
    Example:
        defectscan defects list --lot L042 --since 2026-03-01 --until 2026-03-07
        defectscan defects list --model tinyunet-dagm:3 --class scratch --min-area 50 --sort score --format csv
    """
    from defectscan.db.queries import DEFECT_COLUMNS, list_defects

    with app.session() as session:
        page = list_defects(session, filters, sort=sort, descending=not ascending, limit=limit, offset=offset)
    print_rows(page.rows, DEFECT_TABLE if fmt == "table" else DEFECT_COLUMNS, fmt, empty=_empty("defects", filters, offset),
               more_hint=_more_hint(page, limit))


@defects.command("show")
@click.argument("defect_id", type=ROW_ID)
@click.option("--crop", "crop_path", type=_OUT_PNG, help="Write a PNG of the defect's neighbourhood with its contour here.")
@output_options
@pass_app
def defects_show(app: AppContext, defect_id: int, crop_path: Path | None, fmt: str) -> None:
    """Show one defect: where it is, its geometry and scores; optionally a cropped picture of it.

    \b
    Example:
        defectscan defects show 1234
        defectscan defects show 1234 --crop defect-1234.png
    """
    from defectscan.db.queries import get_defect

    with app.session() as session:
        record, source = get_defect(session, defect_id)
    if crop_path is not None:
        from defectscan.report.overlay import crop_window, save_png
        from defectscan.report.pixels import draw

        bbox = (record["bbox_y0"], record["bbox_x0"], record["bbox_y1"], record["bbox_x1"])
        window = crop_window(bbox, (source.height, source.width))
        record["crop"] = str(save_png(draw(source, [record], window), crop_path))
    record.pop("rle")
    print_record(record, fmt, title=f"defect {defect_id}")


# --- images -------------------------------------------------------------------------------------------------------------


@click.group("images")
def images() -> None:
    """List and show inspected images, and draw their defects.

    \b
    Example:
        defectscan images list --lot L042 --verdict fail
        defectscan images show 17 --overlay out.png
    """


IMAGE_TABLE = ("id", "image_id", "image_key", "lot", "acquired_at", "model", "verdict", "n_defects", "defect_pixels", "max_score")


@images.command("list")
@filter_options
@_sort_options(["id", "time", "score", "defects", "key"])
@limit_options()
@output_options
@pass_app
def images_list(app: AppContext, filters, sort: str, ascending: bool, limit: int, offset: int, fmt: str) -> None:
    """List inspected images (one row per image and model version), newest first.

    `id` is the inspection's id; `image_id` is what `images show` takes. Area options
    select by an image's total defect pixels; --class keeps images having such a defect.
    `qa` is QA's decision on the image (`defectscan review`), empty while undecided.

    \b
    Example:
        defectscan images list --lot L042 --verdict fail
        defectscan images list --line A --since 2026-03-01T06:00:00Z --sort score --format json
    """
    from defectscan.db.queries import IMAGE_COLUMNS, list_images
    from defectscan.db.reviews import qa_decisions

    with app.session() as session:
        page = list_images(session, filters, sort=sort, descending=not ascending, limit=limit, offset=offset)
        decided = qa_decisions(session, [row["id"] for row in page.rows])
    for row in page.rows:
        row["qa"] = decided.get(row["id"])
    columns = (IMAGE_TABLE if fmt == "table" else IMAGE_COLUMNS) + ("qa",)
    print_rows(page.rows, columns, fmt, empty=_empty("images", filters, offset), more_hint=_more_hint(page, limit))


@images.command("show")
@click.argument("ident", metavar="IMAGE")
@click.option("--key", "by_key", is_flag=True, help="IMAGE is a key (serial number, file name) even if it looks like a number.")
@click.option("--model", "model_ref", metavar="MODEL", help="Only this model version's inspection of the image (NAME:* every version's).")
@click.option("--overlay", "overlay_path", type=_OUT_PNG, help="Write the image with score tint, defect contours and labels here (PNG).")
@output_options
@pass_app
def images_show(app: AppContext, ident: str, by_key: bool, model_ref: str | None, overlay_path: Path | None, fmt: str) -> None:
    """Show an image (by id, or by key) with its inspections and defects.

    The overlay draws the latest inspection shown (use --model to pick another).

    \b
    Example:
        defectscan images show 17
        defectscan images show --key SN-2026-000417
        defectscan images show 17 --model tinyunet-dagm:3 --overlay image-17.png
    """
    from defectscan.db.queries import get_image

    with app.session() as session:
        record, source = get_image(session, ident, model_ref, by_key=by_key)
    if overlay_path is not None:
        record["overlay"] = str(_write_overlay(record, source, overlay_path))
    if fmt != "table":
        for inspection in record["inspections"]:
            for d in inspection["defects"]:
                d.pop("rle")
        print_record(record, fmt)
        return
    print_record({k: v for k, v in record.items() if k != "inspections"}, fmt, title=f"image {record['image_id']}")
    if not record["inspections"]:
        click.echo("not inspected yet")
    for inspection in record["inspections"]:
        click.echo()
        summary = {k: v for k, v in inspection.items() if k not in ("defects", "mask_uri", "mask_array")}
        print_record(summary, fmt, title=f"inspection {inspection['id']} by {inspection['model']}")
        rows = [{**d, "bbox": " ".join(map(str, d["bbox"]))} for d in inspection["defects"]]
        click.echo()
        print_rows(rows, ("id", "class", "area", "bbox", "max_score"), fmt, empty="no defects")


def _write_overlay(record: dict[str, Any], source, path: Path) -> Path:
    from dataclasses import replace

    from defectscan.errors import DataError
    from defectscan.report.overlay import save_png
    from defectscan.report.pixels import draw, load_image

    if not record["inspections"]:
        load_image(source)  # a missing image store is named before the missing inspection
        raise DataError(f"image {record['image_id']} has no inspection: nothing to draw (see `defectscan inspect`)")
    inspection = record["inspections"][0]
    scored = replace(source, mask_uri=inspection["mask_uri"], mask_array=inspection["mask_array"])
    return save_png(draw(scored, inspection["defects"]), path)


# --- lots -------------------------------------------------------------------------------------------------------------------


def _hold_above(app: AppContext, flag: float | None) -> float:
    return flag if flag is not None else app.settings.qa.hold_above


# QA's figures in the lots tables (csv/json carry all of db/reviews.REVIEW_COLUMNS).
LOT_REVIEW_TABLE = ("false_call_rate", "escape_rate")
_HOLD_HELP = "Failed-image share above which a lot is on hold (default: the qa.hold_above setting)."
_MAX_ERRORS_HELP = "Hold a lot with more images in error than this (as `report --max-errors`)."


@click.group("lots")
def lots() -> None:
    """Summaries of lots: images, failed images, defect rate, top classes, hold/release verdict.

    \b
    Example:
        defectscan lots list --since 2026-03-01
        defectscan lots show L042
    """


@lots.command("list")
@filter_options
@click.option("--hold-above", type=click.FloatRange(0, 1), help=_HOLD_HELP)
@click.option("--max-errors", type=click.IntRange(min=0), default=MAX_ERRORS, show_default=True, help=_MAX_ERRORS_HELP)
@limit_options()
@output_options
@pass_app
def lots_list(app: AppContext, filters, hold_above: float, max_errors: int, limit: int, offset: int, fmt: str) -> None:
    """One row per lot and model version, most recently captured lots first.

    defect_rate is failed images / judged images (images in error left out; empty when none was judged); a lot
    is "hold" when it is above --hold-above or has more images in error than --max-errors (counting its images without a result
    as passed, when it has some), else "incomplete" when some of its registered images have no result or none could be judged
    (all in error), else "release": the disposition of `defectscan report`.
    Filters select the images counted; the disposition is the whole lot's. Lots registered and not inspected by any model
    yet come last, incomplete (unless a model, run, verdict or defect filter is given). QA's figures follow (`defectscan review`): false_call_rate
    (failed images QA passed / failed images QA decided) and escape_rate (sampled passed images QA
    failed / those QA decided, with its 95 % interval in csv/json); empty until QA decides.

    \b
    Example:
        defectscan lots list --since 2026-03-01 --line A
        defectscan lots list --model tinyunet-dagm --format json
    """
    from defectscan.db.queries import LOT_COLUMNS, list_lots
    from defectscan.db.reviews import REVIEW_COLUMNS, add_review_figures

    with app.session() as session:
        page = list_lots(session, filters, hold_above=_hold_above(app, hold_above), max_errors=max_errors, limit=limit, offset=offset)
        add_review_figures(session, page.rows, filters)
    columns = LOT_COLUMNS + (LOT_REVIEW_TABLE if fmt == "table" else REVIEW_COLUMNS)
    print_rows(page.rows, columns, fmt, empty=_empty("lots", filters, offset), more_hint=_more_hint(page, limit))


@lots.command("show")
@click.argument("lot", required=False)
@click.option("--latest", is_flag=True, help="The lot of the most recently captured image set that has been inspected.")
@click.option("--model", "model_ref", metavar="MODEL", help="Only this model version's results (NAME:* every version's).")
@click.option("--hold-above", type=click.FloatRange(0, 1), help=_HOLD_HELP)
@click.option("--max-errors", type=click.IntRange(min=0), default=MAX_ERRORS, show_default=True, help=_MAX_ERRORS_HELP)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="How many defect classes to list.")
@output_options
@pass_app
def lots_show(
    app: AppContext, lot: str | None, latest: bool, model_ref: str | None, hold_above: float, max_errors: int, top: int, fmt: str,
) -> None:
    """A lot's images, failed images, defect rate, top defect classes and verdict, per model version.

    \b
    Example:
        defectscan lots show L042
        defectscan lots show --latest --format json
    """
    from defectscan.db.queries import CLASS_COLUMNS, LOT_COLUMNS, Filters, latest_lot, lot_summary
    from defectscan.db.reviews import add_review_figures
    from defectscan.errors import DataError

    if (lot is None) == (not latest):
        raise DataError("give a LOT or --latest (not both)")
    with app.session() as session:
        summary = lot_summary(session, lot or latest_lot(session), Filters(model=model_ref), hold_above=_hold_above(app, hold_above),
                              max_errors=max_errors, top=top)
        add_review_figures(session, summary["models"], Filters(lot=summary["lot"], model=model_ref))
    if fmt != "table":
        print_record(summary, fmt)
        return
    print_record({k: v for k, v in summary.items() if k != "models"}, fmt, title=f"lot {summary['lot']}")
    click.echo()
    print_rows(summary["models"], LOT_COLUMNS + LOT_REVIEW_TABLE, fmt, empty=f"no inspections of lot {summary['lot']!r} yet")
    for entry in summary["models"]:
        click.echo()
        print_rows(entry["top_classes"], CLASS_COLUMNS, fmt, empty=f"{entry['model']}: no defects", title=f"top classes, {entry['model']}")

"""`defectscan review`: QA's decisions on the model's results, the review queue, reviewed images as training data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.cli.output import ROW_ID, limit_options, output_options, print_rows
from defectscan.exitcodes import EXIT_PARTIAL

_BY = click.option("--by", metavar="NAME", help="Who decided (default: the login name); any name, checked nowhere.")
_NOTE = click.option("--note", metavar="TEXT", help="Why, in a few words (kept with the decision).")


@click.group("review")
def review() -> None:
    """QA's decisions on verdicts: they never change the model's results, and a newer one supersedes an older one (both kept).

    \b
    Example:
        defectscan review queue --lot L042 --sample-passed 20
        defectscan review defects 812 813 --as false-call --note "dust on the lens"
        defectscan review export --lot L042 --out reviewed/L042
    """


@review.command("defects")
@click.argument("defect_ids", nargs=-1, type=ROW_ID, required=True)
@click.option("--as", "decision", type=click.Choice(["confirmed", "false-call"]), required=True, help="QA's decision on each defect.")
@_NOTE
@_BY
@pass_app
def review_defects_command(app: AppContext, defect_ids: tuple[int, ...], decision: str, note: str | None, by: str | None) -> None:
    """Record QA's decision on defects the model found (ids from `defects list` or `images show`).

    \b
    Example:
        defectscan review defects 812 813 --as confirmed
        defectscan review defects 814 --as false-call --note "reflection" --by anna
    """
    from defectscan.review.record import images_of_defects, named_images, review_defects

    with app.session() as session:
        ids = review_defects(session, defect_ids, decision, by=by, note=note)
        named = named_images(session, images_of_defects(session, defect_ids))
    click.echo(f"recorded {len(ids)} defect decision(s): {decision}, on")
    for line in named:
        click.echo(f"  {line}")


@review.command("images")
@click.argument("image_ids", nargs=-1, type=ROW_ID, required=True)
@click.option("--as", "decision", type=click.Choice(["pass", "fail"]), required=True, help="QA's decision on each image (the part).")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A drawn mask (PNG, the image's size, defect pixels non-zero) of a defect the model missed; one image, --as fail.")
@click.option("--class", "class_name", metavar="NAME", help="The class of the drawn defect (with --mask).")
@click.option("--model", "model_ref", metavar="MODEL",
              help="The model version whose verdicts QA reviewed (as review queue --model); default: the version in production, else the newest.")
@_NOTE
@_BY
@pass_app
def review_images_command(app: AppContext, image_ids: tuple[int, ...], decision: str, mask_path: Path | None, class_name: str | None,
                          model_ref: str | None, note: str | None, by: str | None) -> None:
    """Record QA's decision on whole images: pass (a failed one is then a false call) or fail (a passed one is an escape).

    \b
    Example:
        defectscan review images 4711 4712 --as pass
        defectscan review images 4713 --as fail --mask missed-4713.png --class scratch --note "faint scratch"
    """
    from defectscan.data.imagefiles import read_mask
    from defectscan.review.record import named_images, review_images

    mask = read_mask(mask_path) if mask_path is not None else None
    with app.session() as session:
        ids = review_images(session, image_ids, decision, by=by, note=note, mask=mask, class_name=class_name, model=model_ref)
        named = named_images(session, image_ids)
    click.echo(f"recorded {len(ids)} image decision(s): {decision}" + (f" with a drawn {class_name} mask" if mask is not None else ""))
    for line in named:
        click.echo(f"  {line}")


@review.command("queue")
@click.option("--lot", required=True, help="The lot to review.")
@click.option("--model", "model_ref", metavar="MODEL", help="The model version whose verdicts are reviewed (needed when several inspected the lot).")
@click.option("--sample-passed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also this many passed images, drawn reproducibly (escapes are found there).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Another seed draws another sample.")
@output_options
@pass_app
def queue_command(app: AppContext, lot: str, model_ref: str | None, sample_passed: int, seed: int, fmt: str) -> None:
    """List what still needs QA's decision in a lot: every failed image, then the sampled passed ones.

    \b
    Example:
        defectscan review queue --lot L042 --sample-passed 20
    """
    from defectscan.review.queue import QUEUE_COLUMNS, review_queue

    with app.session() as session:
        queue = review_queue(session, lot, model=model_ref, sample_passed=sample_passed, seed=seed)
    title = (f"lot {queue.lot}, {queue.model}: {len(queue.rows)} to decide ({queue.failed} failed, {queue.sampled} passed sampled; "
             f"{queue.decided} decided)")
    print_rows(queue.rows, QUEUE_COLUMNS, fmt, empty=f"nothing left to decide in lot {lot} ({queue.decided} decided)", title=title)


@review.command("list")
@click.option("--lot", help="Only this lot.")
@click.option("--line", help="Only this production line.")
@click.option("--product", help="Only this product.")
@click.option("--since", metavar="WHEN", help="Images captured at or after WHEN (ISO 8601).")
@click.option("--until", metavar="WHEN", help="Images captured before WHEN; a bare date includes that whole day.")
@click.option("--by", "reviewer", metavar="NAME", help="Only this reviewer's decisions.")
@click.option("--kind", type=click.Choice(["defect", "image"]), help="Only decisions on defects, or on images.")
@limit_options()
@output_options
@pass_app
def list_command(app: AppContext, lot: str | None, line: str | None, product: str | None, since: str | None, until: str | None,
                 reviewer: str | None, kind: str | None, limit: int, offset: int, fmt: str) -> None:
    """List QA's decisions, newest first, superseded ones too (`current` says which stands).

    \b
    Example:
        defectscan review list --lot L042
        defectscan review list --by anna --kind image --format csv
    """
    from defectscan.db.queries import Filters, parse_when
    from defectscan.db.reviews import REVIEW_LIST_COLUMNS, list_reviews

    filters = Filters(lot=lot, line=line, product=product, since=parse_when(since, "--since") if since else None,
                      until=parse_when(until, "--until", end_of_day=True) if until else None)
    with app.session() as session:
        page = list_reviews(session, filters, reviewer=reviewer, kind=kind, limit=limit, offset=offset)
    more = f"more rows follow: add --offset {page.offset + limit}" if page.more else None
    print_rows(page.rows, REVIEW_LIST_COLUMNS, fmt, empty="no decisions match", more_hint=more)


@review.command("figures")
@click.option("--by", "group", type=click.Choice(["lot", "line", "class"]), default="lot", show_default=True,
              help="One row per lot, per production line, or per defect class (and model version).")
@click.option("--lot", help="Only this lot.")
@click.option("--line", help="Only this production line.")
@click.option("--since", metavar="WHEN", help="Captured at or after WHEN (ISO 8601).")
@click.option("--until", metavar="WHEN", help="Captured before WHEN; a bare date includes that whole day.")
@click.option("--model", "model_ref", metavar="MODEL", help="Only this model version's verdicts (NAME:* every version's).")
@output_options
@pass_app
def figures_command(app: AppContext, group: str, lot, line, since, until, model_ref, fmt: str) -> None:
    """QA's figures: false-call and escape rates (with the escape rate's 95 % interval) per lot or line,
    or confirmed defects, false calls and escapes per defect class.

    \b
    Example:
        defectscan review figures --by line --since 2026-03-01
        defectscan review figures --by class --lot L042 --format json
    """
    from defectscan.db.queries import Filters, check_filters, parse_when
    from defectscan.db.reviews import CLASS_COLUMNS, REVIEW_COLUMNS, class_figures, review_figures_rows

    filters = Filters(lot=lot, line=line, model=model_ref, since=parse_when(since, "--since") if since else None,
                      until=parse_when(until, "--until", end_of_day=True) if until else None)
    with app.session() as session:
        check_filters(session, filters)
        if group == "class":
            rows, columns = class_figures(session, filters), CLASS_COLUMNS
        else:
            rows, columns = review_figures_rows(session, filters, by=group), (group, "model", *REVIEW_COLUMNS)
    print_rows(rows, columns, fmt, empty="no QA decision in scope")


@review.command("export")
@click.option("--lot", help="Reviewed images of this lot.")
@click.option("--line", help="Reviewed images of this production line.")
@click.option("--since", metavar="WHEN", help="Captured at or after WHEN (ISO 8601).")
@click.option("--until", metavar="WHEN", help="Captured before WHEN; a bare date includes that whole day.")
@click.option("--model", "model_ref", metavar="MODEL", help="The model version whose reviewed verdicts to export (when several).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The new DAGM-layout folder.")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out.")
@pass_app
def export_command(app: AppContext, lot, line, since, until, model_ref, out: Path, force: bool) -> None:
    """Write the reviewed images as a training set in the DAGM layout (`train`, `evaluate`, `data check` read it).

    QA's passes are defect-free images; QA's fails are labelled with the confirmed defects and
    the drawn masks; undecided images are left out. A decided image that cannot be written (a
    fail with nothing marked, pixels no longer stored) is listed and the exit status is 3. See
    the README for using it as the next fine-tune's validation set.

    \b
    Example:
        defectscan review export --lot L042 --out reviewed/L042
        defectscan evaluate line3:2 --data reviewed/L042 --split Train
    """
    from defectscan.db.queries import Filters, parse_when
    from defectscan.errors import DataError
    from defectscan.review.export import export_reviewed

    if not any((lot, line, since, until)):
        raise DataError("give --lot, --line or --since/--until: what to export")
    filters = Filters(lot=lot, line=line, model=model_ref, since=parse_when(since, "--since") if since else None,
                      until=parse_when(until, "--until", end_of_day=True) if until else None)
    with app.session() as session:
        result = export_reviewed(session, out, filters, force=force)
    click.echo(f"wrote {result.images} reviewed images ({result.defective} with defects) of {result.model} to {result.out}")
    for reason in result.skipped:
        click.echo(f"left out {reason}", err=True)
    if result.skipped:
        sys.exit(EXIT_PARTIAL)  # decided images that are not in the set: a script should not take it for all of them

"""`defectscan report`: a QA report for a lot, a line and period, or a job run, as HTML (and PDF)."""

from __future__ import annotations

from pathlib import Path

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.cli.output import ROW_ID
from defectscan.report.build import HoldRules, ReportOptions

_FILE = click.Path(dir_okay=False, writable=True, path_type=Path)
_RULES = HoldRules()
_OPTIONS = ReportOptions()


@click.command("report")
@click.option("--lot", help="Report on this lot (p-chart per hour of capture).")
@click.option("--line", help="Report on this production line (p-chart per lot); narrow with --since/--until.")
@click.option("--since", metavar="WHEN", help="With --line: images captured at or after WHEN (ISO 8601 date or time, UTC unless given).")
@click.option("--until", metavar="WHEN", help="With --line: images captured before WHEN; a bare date includes that whole day.")
@click.option("--job-run", type=ROW_ID, metavar="ID", help="Report on the results written by this job run.")
@click.option("--model", "model_ref", metavar="NAME:VERSION", help="The model version to report on (needed when the scope has several).")
@click.option("-o", "--output", "html_path", type=_FILE, required=True, help="Write the HTML report here (one self-contained file).")
@click.option("--pdf", "pdf_path", type=_FILE, help="Also print the report to this PDF (needs Chromium).")
@click.option("--hold-above", type=click.FloatRange(0, 1),
              help="Hold a lot whose share of failed images is above this (default: the qa.hold_above setting).")
@click.option("--max-errors", type=click.IntRange(min=0), default=_RULES.max_errors, show_default=True,
              help="Hold a lot with more images in error than this.")
@click.option("--hold-out-of-control/--no-hold-out-of-control", default=_RULES.out_of_control, show_default=True,
              help="Hold a lot above its p-chart upper control limit.")
@click.option("--worst", type=click.IntRange(0, 100), default=_OPTIONS.worst, show_default=True,
              help="Failed images shown with overlays.")
@pass_app
def report(app: AppContext, lot: str | None, line: str | None, since: str | None, until: str | None, job_run: int | None,
           model_ref: str | None, html_path: Path, pdf_path: Path | None, hold_above: float | None, max_errors: int,
           hold_out_of_control: bool, worst: int) -> None:
    """Write a QA report for a lot, a line and period, or a job run.

    The report shows the scope's key figures, a p-chart of the failed share with 3-sigma limits,
    a Pareto of defect classes (size classes for a one-class model), the defect area histogram,
    a heatmap of defect positions, the worst images with their defects drawn, the disposition of
    each lot (hold or release, by the --hold-above, --max-errors and --hold-out-of-control rules)
    and the images in error or without a result. The HTML opens offline; --pdf prints the same
    page through headless Chromium.

    \b
    Example:
        defectscan report --lot L042 -o L042.html
        defectscan report --line A --since 2026-03-01 --until 2026-03-07 -o week10.html --pdf week10.pdf
        defectscan report --job-run 17 --model tinyunet-dagm:3 -o run17.html
    """
    from defectscan.db.queries import parse_when
    from defectscan.report.build import Scope, write_report

    scope = Scope(
        lot=lot, line=line, job_run=job_run, model=model_ref,
        since=parse_when(since, "--since") if since is not None else None,
        until=parse_when(until, "--until", end_of_day=True) if until is not None else None,
    )
    if hold_above is None:
        hold_above = app.settings.qa.hold_above
    options = ReportOptions(rules=HoldRules(hold_above=hold_above, max_errors=max_errors, out_of_control=hold_out_of_control), worst=worst)
    with app.session() as session:
        summary = write_report(session, scope, html_path, pdf_path=pdf_path, options=options)
    if summary["empty"]:
        click.echo(f"{summary['scope']}: no inspection results; wrote a short report to {summary['html']}")
    else:
        click.echo(
            f"{summary['scope']} ({summary['model']}): {summary['images']} images, {summary['failed']} failed, "
            f"{summary['errors']} in error, {summary['defects']} defects; {summary['held']} of {summary['lots']} lots on hold or incomplete, "
            f"{summary['out_of_control']} out-of-control point(s)"
        )
        click.echo(f"wrote {summary['html']}")
    if "pdf" in summary:
        click.echo(f"wrote {summary['pdf']}")

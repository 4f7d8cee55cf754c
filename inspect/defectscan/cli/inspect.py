"""`defectscan inspect`: run a registered model over image sets on a Dask cluster and record the results."""

from __future__ import annotations

import sys

import click

from defectscan.cli.app import AppContext, pass_app


@click.command("inspect")
@click.option("--model", "model_reference", required=True, metavar="MODEL",
              help="Registered model: NAME (its latest version), NAME:VERSION or NAME:STAGE; `demo` registers the shipped demo model and uses its production version.")
@click.option("--imageset", "image_set_ids", multiple=True, required=True, metavar="ID|PATH",
              help="Registered image set, by id or store path/URL; repeat for several.")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler to use (tcp://host:8786); default: a local cluster.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the local cluster.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per model call.")
@click.option("--force", is_flag=True, help="Inspect images again that this model version already inspected, replacing their results.")
@click.option("--retry-errors", is_flag=True,
              help="Inspect again the images recorded as errors (unreadable data since fixed, e.g. a restored chunk), and those not inspected yet; recorded verdicts stay as they are.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@pass_app
def inspect(app: AppContext, model_reference, image_set_ids, scheduler, workers, batch_size, force, retry_errors, progress) -> None:
    """Run a model over image sets on a Dask cluster; masks go to Zarr, verdicts and defects to the database.

    Images this model version already inspected are skipped, so an interrupted or repeated run
    only does what is left. Exit status: 0 all inspected; 3 some images could not be read
    (recorded as errors: fix the data, then --retry-errors); 4 some images were left pending
    because the machinery failed (a worker lost, a full disk: nothing recorded for them, a
    rerun inspects them); 1 the run failed; 143 stopped by SIGTERM, 130 by SIGINT (a rerun resumes).

    \b
    Example:
        defectscan inspect --model demo --imageset /data/L042.zarr
        defectscan inspect --model tinyunet-dagm:3 --imageset 12 --imageset 13 --scheduler tcp://dask:8786
    """
    from defectscan.pipeline.by_name import run_inspect

    if force and retry_errors:
        raise click.UsageError("--force already inspects every image again; --retry-errors is for the images in error only: give one")
    settings = app.settings_with(cluster__scheduler=(scheduler, "--scheduler"), inspection__batch_size=(batch_size, "--batch-size"))
    show_progress = sys.stderr.isatty() if progress is None else progress
    summary = run_inspect(app.session, settings, model_reference, list(image_set_ids), force=force, retry_errors=retry_errors,
                          n_workers=workers, progress=show_progress, echo=lambda line: click.echo(line, err=True))
    click.echo(describe_summary(summary))
    for error in summary.errors[:5]:
        click.echo(f"  error: {error}", err=True)
    sys.exit(summary.exit_code)


def describe_summary(summary) -> str:
    """One line: what the run did with every image it was given."""
    counts = summary.counts
    parts = [f"{counts.inspected} inspected ({counts.failed} failed)", f"{counts.errors} errors"]
    if counts.pending:
        parts.append(f"{counts.pending} left pending")
    if counts.meanwhile:
        runs = counts.meanwhile_runs
        by = f"run{'s' if len(runs) > 1 else ''} {', '.join(map(str, runs))}" if runs else "another run"
        parts.append(f"{counts.meanwhile} recorded meanwhile by {by}")
    done = f"{summary.n_skipped} already done"
    if summary.still_in_error:
        # Skipped as done, yet unjudged: a rerun that said "succeeded" read as if they were fixed.
        done += f" ({summary.still_in_error} of them in error: --retry-errors reads them again)"
    parts.append(done)
    line = (f"job run {summary.job_run_id}: {summary.status}, {summary.n_images} images: {', '.join(parts)}; "
            f"{counts.defects} defects; {summary.images_per_second:.1f} images/s")
    if set(summary.precisions_run) - {summary.precision}:
        ran = ", ".join(f"{precision} on {n}" for precision, n in sorted(summary.precisions_run.items()))
        line += f"; the model's {summary.precision} ran as {ran} images (workers without fast {summary.precision} run float32)"
    return line

"""`defectscan inspect`: run a registered model over image sets on a Dask cluster and record the results."""

from __future__ import annotations

import sys

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.exitcodes import EXIT_PARTIAL


@click.command("inspect")
@click.option("--model", "model_reference", required=True, metavar="NAME[:VERSION]",
              help="Registered model (latest version when none is given); `demo` registers and uses the shipped demo model.")
@click.option("--imageset", "image_set_ids", multiple=True, required=True, metavar="ID|PATH",
              help="Registered image set, by id or store path/URL; repeat for several.")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler to use (tcp://host:8786); default: a local cluster.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the local cluster.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per model call.")
@click.option("--force", is_flag=True, help="Inspect images again that this model version already inspected, replacing their results.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@pass_app
def inspect(app: AppContext, model_reference, image_set_ids, scheduler, workers, batch_size, force, progress) -> None:
    """Run a model over image sets on a Dask cluster; masks go to Zarr, verdicts and defects to the database.

    Images this model version already inspected are skipped, so an interrupted or repeated run
    only does what is left. Exit status: 0 all inspected, 3 some images could not be read
    (recorded as errors), 1 the run failed.

    \b
    Example:
        defectscan inspect --model demo --imageset /data/L042.zarr
        defectscan inspect --model tinyunet-dagm:3 --imageset 12 --imageset 13 --scheduler tcp://dask:8786
    """
    from defectscan.pipeline.cli_run import run_inspect

    settings = app.settings_with(cluster__scheduler=(scheduler, "--scheduler"), inspection__batch_size=(batch_size, "--batch-size"))
    show_progress = sys.stderr.isatty() if progress is None else progress
    summary = run_inspect(app.session, settings, model_reference, list(image_set_ids), force=force, n_workers=workers,
                          progress=show_progress, echo=lambda line: click.echo(line, err=True))
    click.echo(
        f"job run {summary.job_run_id}: {summary.status}, {summary.n_images} images: {summary.counts.inspected} inspected "
        f"({summary.counts.failed} failed), {summary.counts.errors} errors, {summary.n_skipped} already done; "
        f"{summary.counts.defects} defects; {summary.images_per_second:.1f} images/s"
    )
    for error in summary.errors[:5]:
        click.echo(f"  error: {error}", err=True)
    if summary.status == "partial":
        sys.exit(EXIT_PARTIAL)

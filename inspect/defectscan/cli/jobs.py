"""`defectscan jobs`: the scheduled factory jobs of jobs/*.yaml -- list, run, history, show, render."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click

from defectscan.cli.app import AppContext, pass_app
from defectscan.cli.output import ROW_COUNT, ROW_ID


def _default_jobs_dir() -> Path:
    """./jobs when there is one, else the jobs/ folder of this checkout."""
    here = Path("jobs")
    if here.is_dir():
        return here
    from defectscan.paths import CONFIGS_DIR

    return CONFIGS_DIR.parent / "jobs"


@click.group("jobs")
@click.option("--jobs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of job specs (NAME.yaml); default: ./jobs, else the checkout's jobs/.")
@click.pass_context
def jobs(ctx: click.Context, jobs_dir: Path | None) -> None:
    """List, run and schedule the factory inspection jobs in jobs/*.yaml.

    A scheduler (cron, a systemd timer, a Kubernetes CronJob) starts `jobs run NAME`; its
    exit status is 0 succeeded, 3 partial (some images in error or stores left out), 4 some
    images left pending by a machine failure (the next run inspects them), 1 failed, 75 already
    running (another trigger holds the job's lock), 143 interrupted (SIGTERM; 130 for SIGINT).
    A run whose client died without closing it (no heartbeat for inspection.stale_run_after_s)
    is shown `abandoned`.

    \b
    Example:
        defectscan jobs list
        defectscan jobs run demo
        defectscan jobs --jobs-dir /etc/defectscan/jobs render systemd --output-dir /etc/systemd/system
    """
    ctx.meta["jobs_dir"] = jobs_dir or _default_jobs_dir()


def _jobs_dir() -> Path:
    return click.get_current_context().meta["jobs_dir"]


def _close_abandoned_runs(app: AppContext) -> None:
    """Runs whose client died show as `abandoned`, not `running` forever (skipped on a database this user cannot write)."""
    from defectscan.db.session import session_factory
    from defectscan.pipeline.job_runs import abandon_stale_runs_if_writable

    app.session().close()  # the schema check
    abandon_stale_runs_if_writable(session_factory(app.engine), app.settings.inspection.stale_run_after_s)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


@jobs.command("list")
@pass_app
def list_command(app: AppContext) -> None:
    """List the jobs with their schedule, next scheduled time (UTC) and last run.

    A spec that does not validate is listed with its error (and the command exits 1).

    \b
    Example:
        defectscan jobs list
    """
    from defectscan.db.schema import utcnow
    from defectscan.jobs.history import last_runs, running
    from defectscan.jobs.lock import held_by_live_runner
    from defectscan.jobs.spec import load_all, next_run

    found = load_all(_jobs_dir())
    specs = [spec for _, spec in found if not isinstance(spec, Exception)]
    _close_abandoned_runs(app)
    with app.session() as session:
        last = last_runs(session, [s.name for s in specs])
        locks = running(session, [s.name for s in specs])
    now = utcnow()
    click.echo(f"jobs in {_jobs_dir()}:")
    click.echo(f"{'NAME':<20} {'SCHEDULE':<16} {'TZ':<14} {'NEXT (UTC)':<17} {'LAST RUN (UTC)':<17} {'STATUS':<12} RUN")
    bad = 0
    for path, spec in found:
        if isinstance(spec, Exception):
            bad += 1
            click.echo(f"{path.stem:<20} invalid: {spec}")
            continue
        run = last.get(spec.name)
        # A dead runner's lock stays until the next run takes it over: its job is not running.
        lock = locks.get(spec.name)
        status = "running" if lock and held_by_live_runner(lock, spec.lock.stale_after_s, now) else (run.status if run else "never run")
        click.echo(
            f"{spec.name:<20} {spec.schedule:<16} {spec.timezone:<14} {_when(next_run(spec, now)):<17} "
            f"{_when(run.started_at if run else None):<17} {status:<12} {run.id if run else '-'}"
        )
    if bad:
        sys.exit(1)


@jobs.command("run")
@click.argument("name")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler (tls://host:8786), over the spec and the settings.")
@pass_app
def run_command(app: AppContext, name: str, scheduler: str | None) -> None:
    """Run a job once: discover and register new stores, inspect what is new, record the run.

    Exit status: 0 succeeded, 3 partial, 4 images left pending (machine failure), 1 failed,
    75 already running, 143 interrupted (130 for SIGINT).

    \b
    Example:
        defectscan jobs run demo
        DEFECTSCAN_DATABASE_URL=postgresql://qa@db/defectscan defectscan jobs run line-a-nightly
    """
    from defectscan import interrupts
    from defectscan.exitcodes import EXIT_ALREADY_RUNNING
    from defectscan.jobs.lock import AlreadyRunning
    from defectscan.jobs.runner import run_job
    from defectscan.jobs.spec import find_spec, load_spec

    path = find_spec(_jobs_dir(), name)
    spec = load_spec(path)
    overrides = spec.setting_overrides(str(path))
    if scheduler is not None:  # the flag beats the spec's own scheduler
        overrides["cluster__scheduler"] = (scheduler, "--scheduler")
    settings = app.settings_with(**overrides)
    if scheduler is None:
        settings = spec.apply_to(settings)
    # From here on a signal is a flag the run acts on, so one that arrives before the lock is taken still leaves a row.
    with interrupts.stop_on_signals(settings.inspection.stop_within_s):
        app.session().close()  # checks the schema before the lock is taken
        try:
            outcome = run_job(app.engine, spec, path, settings, echo=lambda line: click.echo(line, err=True))
        except AlreadyRunning as exc:
            click.echo(f"{exc}; this trigger does nothing", err=True)
            sys.exit(EXIT_ALREADY_RUNNING)
    click.echo(
        f"job {spec.name}: run {outcome.job_run_id} {outcome.status}: {len(outcome.discovery.new)} new stores, "
        f"{outcome.n_image_sets} image sets with work, {outcome.n_inspected} images inspected, {outcome.n_errors} errors, "
        f"{outcome.n_skipped} already done, {outcome.n_defects} defects in {outcome.seconds:.1f} s"
    )
    for error in outcome.errors[:5]:
        click.echo(f"  error: {error}", err=True)
    sys.exit(outcome.exit_code)


@jobs.command("history")
@click.argument("name")
@click.option("--limit", type=ROW_COUNT, default=20, show_default=True, help="Most recent runs to show.")
@pass_app
def history_command(app: AppContext, name: str, limit: int) -> None:
    """Show a job's most recent runs, newest first.

    \b
    Example:
        defectscan jobs history demo --limit 5
    """
    from defectscan.jobs.history import duration_s, job_history

    _close_abandoned_runs(app)
    with app.session() as session:
        runs = job_history(session, name, limit)
    if not runs:
        from defectscan.jobs.spec import find_spec

        find_spec(_jobs_dir(), name)  # a job never run is said so; a name of no job is an error naming the known ones
        click.echo(f"job {name} has no runs recorded")
        return
    click.echo(f"{'RUN':>6} {'STARTED (UTC)':<19} {'STATUS':<12} {'SECONDS':>8} {'IMAGES':>7} {'DONE':>7} {'SKIPPED':>7} {'ERRORS':>6} {'DEFECTS':>7}")
    for run in runs:
        seconds = duration_s(run)
        click.echo(
            f"{run.id:>6} {run.started_at:%Y-%m-%d %H:%M:%S} {run.status:<12} {'-' if seconds is None else f'{seconds:.1f}':>8} "
            f"{run.n_images:>7} {run.n_inspected:>7} {run.n_skipped:>7} {run.n_errors:>6} {run.n_defects:>7}"
        )


@jobs.command("show")
@click.argument("run_id", type=ROW_ID)
@pass_app
def show_command(app: AppContext, run_id: int) -> None:
    """Show one job run in full as JSON: counts, timings, error, the spec it ran with (secrets masked).

    \b
    Example:
        defectscan jobs show 42
    """
    from defectscan.jobs.history import describe_run, get_run

    _close_abandoned_runs(app)
    with app.session() as session:
        data = describe_run(session, get_run(session, run_id))
    click.echo(json.dumps(data, indent=2))


@jobs.command("render")
@click.argument("target", type=click.Choice(["crontab", "systemd", "kubernetes"]))
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Write the files here (systemd: one pair per job); default: print.")
@click.option("--executable", default="/usr/local/bin/defectscan", show_default=True, help="defectscan on the target machine (crontab, systemd).")
@click.option("--deployed-jobs-dir", default="/etc/defectscan/jobs", show_default=True, help="The specs' folder on the target machine (crontab, systemd).")
@click.option("--env-file", default="/etc/defectscan/defectscan.env", show_default=True,
              help="File with DEFECTSCAN_DATABASE_URL etc. (crontab, systemd); '' for none (crontab: the executable brings its own).")
@click.option("--log-dir", default="/var/log/defectscan", show_default=True, help="Folder of the jobs' logs, one file per job (crontab).")
@click.option("--image", default="defectscan:0.1.0", show_default=True, help="Container image (kubernetes).")
@click.option("--namespace", default="defectscan", show_default=True, help="Namespace (kubernetes).")
@click.option("--scheduler", default="tls://defectscan-scheduler:8786", show_default=True, help="Dask scheduler address (kubernetes).")
@click.option("--data-dir", default="/srv/defectscan", show_default=True,
              help="Image sets and score maps, writable by the job (systemd; as the worker unit's).")
def render_command(target: str, output_dir: Path | None, executable: str, deployed_jobs_dir: str, env_file: str, log_dir: str, image: str,
                   namespace: str, scheduler: str, data_dir: str) -> None:
    """Write crontab lines, systemd .service/.timer units or Kubernetes CronJobs for every job spec.

    No secret is written: each target reads the database URL and TLS files from an
    environment file or a Kubernetes Secret (docs/deploy.md).

    \b
    Example:
        defectscan jobs render crontab | crontab -u defectscan -
        defectscan jobs render systemd --output-dir /etc/systemd/system
        defectscan jobs render kubernetes > cronjobs.yaml
    """
    from defectscan.errors import ConfigError
    from defectscan.jobs.render import (
        RenderOptions,
        render_crontab,
        render_kubernetes,
        render_systemd,
        write_files,
    )
    from defectscan.jobs.spec import load_all

    found = load_all(_jobs_dir())
    bad = [str(spec) for _, spec in found if isinstance(spec, Exception)]
    if bad:
        raise ConfigError("; ".join(bad))
    if not found:
        raise ConfigError(f"{_jobs_dir()}: no job specs (*.yaml) to render")
    specs = [spec for _, spec in found]
    if not log_dir.strip():
        raise ConfigError("--log-dir '': give the folder of the jobs' logs (a crontab line appends to FOLDER/NAME.log)")
    if target == "systemd" and not env_file:
        raise ConfigError("--env-file '': the systemd units read the database URL from an environment file; give its path")
    options = RenderOptions(defectscan=executable, jobs_dir=deployed_jobs_dir, env_file=env_file, log_dir=log_dir, image=image, namespace=namespace,
                            scheduler=scheduler, data_dir=data_dir)
    if target == "crontab":
        files = {"defectscan.crontab": render_crontab(specs, options)}
    elif target == "systemd":
        files = render_systemd(specs, options)
    else:
        files = {"defectscan-cronjobs.yaml": render_kubernetes(specs, {p.stem: p.read_text() for p, _ in found}, options)}
    if output_dir is None:
        for name, text in files.items():
            if len(files) > 1:
                click.echo(f"# ---- {name}")
            click.echo(text, nl=False)
        return
    for path in write_files(files, output_dir):
        click.echo(f"wrote {path}", err=True)

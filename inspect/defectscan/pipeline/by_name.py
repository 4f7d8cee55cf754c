"""Inspect image sets named by the user (ids or URIs, a model reference, `demo` for the shipped model's name): resolve, connect, run with a progress bar."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from defectscan import interrupts
from defectscan.config import Settings
from defectscan.pipeline.run import RunSummary, inspect_image_sets


def run_inspect(
    new_session: Callable[[], Session],
    settings: Settings,
    model_reference: str,
    image_set_ids: list[str],
    *,
    force: bool = False,
    retry_errors: bool = False,
    n_workers: int | None = None,
    progress: bool = False,
    job: str = "inspect",
    echo: Callable[[str], None] = print,
) -> RunSummary:
    from sqlalchemy.orm import sessionmaker

    from defectscan.data.register import get_image_set, look_for_arrived
    from defectscan.model.registry import model_to_run
    from defectscan.pipeline.cluster import connect

    spec = {"command": job, "model": model_reference, "image_sets": image_set_ids, "force": force, "retry_errors": retry_errors}
    with interrupts.stop_on_signals(settings.inspection.stop_within_s):
        with new_session() as session:
            # Its own session: adding arrived images commits, which expires what the run goes on to use.
            waiting = look_for_arrived(session, [get_image_set(session, ident) for ident in image_set_ids])
        with new_session() as session:
            model = model_to_run(session, model_reference)
            image_sets = [get_image_set(session, ident) for ident in image_set_ids]
            factory = sessionmaker(session.get_bind(), expire_on_commit=False)
        interrupts.check()
        with connect(settings.cluster, n_workers=n_workers, runtime=settings.inspection.runtime) as (client, info):
            interrupts.check()
            echo(f"Dask: {info.n_workers} worker{'s' if info.n_workers != 1 else ''}{' (GPU)' if info.gpu else ''}, dashboard {info.dashboard}")
            for warning in info.warnings:
                echo(f"warning: {warning}")
            in_flight = info.n_workers * settings.cluster.shards_in_flight_per_worker
            with _progress(progress) as on_progress:
                return inspect_image_sets(factory, client, model, image_sets, settings.inspection, max_in_flight=in_flight,
                                          force=force, retry_errors=retry_errors, gpu=info.gpu, job=job, spec=spec, on_progress=on_progress,
                                          waiting=waiting)


class _progress:
    """A rich progress bar on stderr fed by (done, total), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        # On stderr, as ingest's: on stdout the bar went into `inspect ... > result.txt` and the pipes scripts read.
        self._bar = Progress(TextColumn("inspecting"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn(),
                             transient=False, console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task("inspect", total=None)

        def update(done: int, total: int) -> None:
            self._bar.update(self._task, completed=done, total=total)

        return update

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()

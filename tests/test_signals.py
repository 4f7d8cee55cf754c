"""SIGTERM at any moment of `jobs run` (registration, planning, inspection, the final write): the process
stops within inspection.stop_within_s with status 143, its run row says `interrupted`, the lock is
released, and once the signals stop one plain rerun leaves what an undisturbed run leaves. SIGINT
gives 130, never click's "Aborted!" with 1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from defectscan.db.migrate import upgrade
from defectscan.db.schema import Defect, Image, ImageSet, Inspection, JobLock, JobRun
from defectscan.db.session import make_engine, session_factory

from db_helpers import create_database, drop_database
from jobs_helpers import write_spec
from pipeline_helpers import add_model, save_threshold_model, square_images, write_stack

N_STORES, N_IMAGES = 3, 24
STOP_WITHIN_S = 10
# Beyond the grace time: the interpreter's own exit (threads, the cluster client) may take a moment.
EXIT_MARGIN_S = 10


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """Three stores waiting in incoming/, a model file, and the job that inspects them."""
    folder = tmp_path_factory.mktemp("line")
    for k in range(N_STORES):
        write_stack(folder / "incoming" / f"L{k}.zarr", square_images(N_IMAGES, defects={k + 2: (10, 10, 6), 20: (30, 30, 8)}, seed=k), lot=f"L{k}")
    model = save_threshold_model(folder / "threshold.keras")
    write_spec(folder, "line-a", source={"glob": "incoming/*.zarr"}, model="threshold:1",
               inspection={"batch_size": 4, "images_per_shard": 4}, max_in_flight=1)
    return folder, model


def _database(url: str, model: Path):
    engine = make_engine(url)
    upgrade(engine)
    factory = session_factory(engine)
    add_model(factory, model)
    return engine, factory


def _job(url: str, folder: Path, scheduler: str, output_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "DEFECTSCAN_CLUSTER__SCHEDULER": scheduler, "DEFECTSCAN_INSPECTION__OUTPUT_DIR": str(output_dir),
           "DEFECTSCAN_INSPECTION__STOP_WITHIN_S": str(STOP_WITHIN_S)}
    return subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", url, "jobs", "--jobs-dir", str(folder), "run", "line-a"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(factory, output_dir: Path):
    """Rows by store name and position (ids may differ between databases), and every score map."""
    import zarr

    with factory() as session:
        rows = session.execute(
            select(ImageSet.lot, Image.position, Inspection.verdict, Inspection.n_defects, Inspection.defect_pixels, Inspection.max_score, Inspection.error)
            .join(Image, Image.image_set_id == ImageSet.id).join(Inspection, Inspection.image_id == Image.id)
            .order_by(ImageSet.lot, Image.position)
        ).all()
        defects = session.execute(
            select(ImageSet.lot, Image.position, Defect.bbox_y0, Defect.bbox_x0, Defect.area, Defect.rle)
            .join(Image, Image.image_set_id == ImageSet.id).join(Inspection, Inspection.image_id == Image.id)
            .join(Defect, Defect.inspection_id == Inspection.id).order_by(ImageSet.lot, Image.position, Defect.bbox_y0)
        ).all()
    stores = {k: next(output_dir.glob(f"L{k}-*.masks.zarr")) for k in range(N_STORES)}  # named by lot and a digest of the source
    scores = {k: zarr.open_array(str(stores[k]), path="threshold/1", mode="r")[...] for k in range(N_STORES)}
    return [tuple(r) for r in rows], [tuple(d) for d in defects], scores


def _assert_same(results, expected):
    assert results[0] == expected[0] and results[1] == expected[1]
    for k in range(N_STORES):
        np.testing.assert_array_equal(results[2][k], expected[2][k])


def _runs(factory) -> list[JobRun]:
    with factory() as session:
        return list(session.scalars(select(JobRun).order_by(JobRun.id)))


class Databases:
    """Fresh databases with the model registered, one per moment: SQLite files, or PostgreSQL databases copied from a template."""

    def __init__(self, url: str, model: Path, folder: Path):
        self.url, self.folder = make_url(url), folder
        engine, _ = _database(url, model)
        engine.dispose()
        self.made: list[str] = []

    def fresh(self, n: int) -> str:
        if self.url.get_backend_name() == "sqlite":
            copy = self.folder / f"moment-{n}.sqlite"
            shutil.copy(self.url.database, copy)
            return f"sqlite:///{copy}"
        self.made.append(create_database(self.url.render_as_string(hide_password=False), template=self.url.database))
        return self.made[-1]

    def drop(self) -> None:
        for url in self.made:
            drop_database(url)


def _rerun(url: str, folder: Path, scheduler: str, output: Path) -> str:
    """The plain rerun, in this process (the library call `jobs run` makes): its status."""
    from defectscan.config import load_settings
    from defectscan.jobs.runner import run_job
    from defectscan.jobs.spec import load_spec

    path = folder / "line-a.yaml"
    spec = load_spec(path)
    settings = spec.apply_to(load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": scheduler, "DEFECTSCAN_INSPECTION__OUTPUT_DIR": str(output)}))
    engine = make_engine(url)
    try:
        return run_job(engine, spec, path, settings, echo=lambda line: None).status
    finally:
        engine.dispose()


def test_sigterm_at_random_moments_always_stops_in_time_and_a_rerun_completes(database_url, line, scheduler, tmp_path, request):
    """10 moments on SQLite, 4 on PostgreSQL (the database only sees the rows; the signal handling is the same code);
    20 and 8 with --run-large (the sweep was the longest test of the suite, which must stay under 20 minutes)."""
    folder, model = line
    databases = Databases(database_url, model, tmp_path)
    try:
        reference = databases.fresh(0)
        assert _rerun(reference, folder, scheduler, tmp_path / "reference-out") == "succeeded"  # also warms the worker
        engine = make_engine(reference)
        expected = _results(session_factory(engine), tmp_path / "reference-out")
        engine.dispose()
        # How long one undisturbed `jobs run` process takes, warm: the moments fall inside it.
        began = time.monotonic()
        timing = _job(databases.fresh(1), folder, scheduler, tmp_path / "timing-out")
        assert timing.wait(timeout=300) == 0, timing.communicate()
        duration = time.monotonic() - began

        outcomes = []
        n_moments = (20 if database_url.startswith("sqlite") else 8) // (1 if request.config.getoption("--run-large") else 2)
        # Over the first 80 % of a run: the last part is the interpreter's exit, where a signal changes nothing.
        for n, moment in enumerate(np.random.default_rng(7).uniform(0.0, 0.8 * duration, size=n_moments), start=2):
            url, output = databases.fresh(n), tmp_path / f"out-{n}"
            engine = make_engine(url)
            factory = session_factory(engine)
            outcomes.append(_signal_at(moment, url, folder, scheduler, output, factory))
            engine.dispose()
            assert _rerun(url, folder, scheduler, output) == "succeeded"
            engine = make_engine(url)
            _assert_same(_results(session_factory(engine), output), expected)
            engine.dispose()
        # Timing varies with the machine's load; that a fair share of the moments fell inside a run is what matters.
        assert outcomes.count("interrupted") >= n_moments // 4, outcomes
    finally:
        databases.drop()


def _signal_at(moment: float, url: str, folder: Path, scheduler: str, output: Path, factory) -> str:
    """Start `jobs run`, SIGTERM it `moment` seconds later, check how it ended; returns which way."""
    job = _job(url, folder, scheduler, output)
    time.sleep(moment)
    job.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = job.communicate(timeout=STOP_WITHIN_S + EXIT_MARGIN_S + 30)
    assert time.monotonic() - sent < STOP_WITHIN_S + EXIT_MARGIN_S, f"took {time.monotonic() - sent:.1f} s to stop at {moment:.2f} s: {err}"
    runs = _runs(factory)
    with factory() as session:
        assert session.scalars(select(JobLock)).all() == [], f"lock left behind at {moment:.2f} s"
    assert "Aborted!" not in err and "Traceback" not in err, err
    assert [r.id for r in runs if r.status == "running"] == [], err
    if job.returncode == -signal.SIGTERM and not runs:
        # Still loading Python, before any handler: killed by the signal itself, nothing started.
        return "before start"
    if job.returncode == 143:
        assert len(runs) == 1 and runs[0].status == "interrupted" and runs[0].finished_at is not None, err
        assert "interrupted by signal SIGTERM" in runs[0].error
        return "interrupted"
    # The signal came after the run had closed its row: the status it recorded stands, and the
    # process ends as it would have (or, in its last milliseconds, by the signal itself).
    assert job.returncode in (0, -signal.SIGTERM) and [r.status for r in runs] == ["succeeded"], (moment, job.returncode, err)
    return "already done"


def test_sigint_stops_a_run_with_130_and_records_it_interrupted(sqlite_url, line, scheduler, tmp_path):
    folder, model = line
    engine, factory = _database(sqlite_url, model)
    job = _job(sqlite_url, folder, scheduler, tmp_path / "out")
    deadline = time.monotonic() + 120
    while not any(r.status == "running" for r in _runs(factory)):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=STOP_WITHIN_S + EXIT_MARGIN_S + 30)
    assert job.returncode == 130, err
    assert "Aborted!" not in err
    [run] = _runs(factory)
    assert run.status == "interrupted" and "interrupted by signal SIGINT" in run.error
    engine.dispose()

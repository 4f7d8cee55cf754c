"""Faults on real multi-process clusters: a worker killed mid-run, the database going away mid-run."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from defectscan.config import load_settings
from defectscan.db.migrate import upgrade
from defectscan.db.schema import Image, Inspection, JobRun
from defectscan.db.session import make_engine, session_factory
from defectscan.errors import DatabaseError
from defectscan.pipeline.record import Retry
from defectscan.pipeline.run import inspect_image_sets

from pipeline_helpers import add_model, register, save_threshold_model, square_images, write_stack
from tcp_proxy import TcpProxy
from test_pipeline_run import _table

DEFECTS = {3: (10, 10, 6), 40: (30, 40, 8), 77: (0, 0, 5), 95: (50, 50, 10)}
N_IMAGES = 96


@pytest.fixture(scope="module")
def settings():
    return load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8"}).inspection


@pytest.fixture(scope="module")
def two_workers():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, Client(local) as client:
        yield client


def _prepare(url, tmp_path, name="L1"):
    engine = make_engine(url)
    upgrade(engine)
    factory = session_factory(engine)
    image_set = register(factory, write_stack(tmp_path / f"{name}.zarr", square_images(N_IMAGES, defects=DEFECTS)))
    model = add_model(factory, save_threshold_model(tmp_path / f"{name}.keras"))
    return engine, factory, image_set, model


@pytest.fixture
def undisturbed(tmp_path_factory, two_workers, settings):
    """The database of a run nothing disturbed, to compare against."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    engine, factory, image_set, model = _prepare(f"sqlite:///{tmp / 'db.sqlite'}", tmp)
    summary = inspect_image_sets(factory, two_workers, model, [image_set], settings, max_in_flight=4)
    assert summary.status == "succeeded"
    table = _table(factory)
    engine.dispose()
    return table


def test_worker_killed_mid_run_loses_and_duplicates_nothing(two_workers, settings, sqlite_url, tmp_path, undisturbed):
    engine, factory, image_set, model = _prepare(sqlite_url, tmp_path)
    killed = []

    def kill_a_busy_worker(done, total):
        if killed or done == 0:
            return
        processing = {w: keys for w, keys in two_workers.processing().items() if keys}
        if not processing:
            return
        victim = next(iter(processing))
        pid = two_workers.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        killed.append(victim)

    summary = inspect_image_sets(factory, two_workers, model, [image_set], settings, max_in_flight=4, on_progress=kill_a_busy_worker)
    assert killed, "no worker was busy to be killed"
    assert summary.status == "succeeded", summary.errors
    assert _table(factory) == undisturbed
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == N_IMAGES
    two_workers.wait_for_workers(2, timeout=60)
    engine.dispose()


@pytest.fixture
def proxied_postgres(postgres_url):
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host, url.port)
    yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)
    proxy.close()


def test_database_gone_briefly_is_retried_and_the_run_completes(proxied_postgres, two_workers, settings, tmp_path, undisturbed):
    proxy, url = proxied_postgres
    engine, factory, image_set, model = _prepare(url, tmp_path)
    cut = []

    def outage(done, total):
        if done and not cut:
            proxy.cut()
            cut.append(done)
            threading.Timer(1.5, proxy.restore).start()

    summary = inspect_image_sets(factory, two_workers, model, [image_set], settings, max_in_flight=2,
                                 retry=Retry(attempts=6, backoff_s=0.2), on_progress=outage)
    assert cut
    assert summary.status == "succeeded", summary.errors
    assert _table(factory) == undisturbed
    engine.dispose()


def test_database_refusing_writes_fails_the_run_with_the_reason_and_nothing_half_written(postgres_url, two_workers, settings, tmp_path):
    # Statements wait at most 300 ms for a lock: a table locked by someone else is a database that cannot take our writes.
    engine = create_engine(make_url(postgres_url).set(drivername="postgresql+psycopg"), connect_args={"options": "-c lock_timeout=300"})
    upgrade(engine)
    factory = session_factory(engine)
    image_set = register(factory, write_stack(tmp_path / "L9.zarr", square_images(N_IMAGES, defects=DEFECTS)))
    model = add_model(factory, save_threshold_model(tmp_path / "L9.keras"))
    blocker = engine.connect()
    blocking = []

    def lock_inspections(done, total):
        if done and not blocking:
            blocking.append(blocker.begin())
            blocker.execute(text("LOCK TABLE inspections IN ACCESS EXCLUSIVE MODE"))

    with pytest.raises(DatabaseError, match="database unavailable after 3 attempts: .*lock timeout"):
        inspect_image_sets(factory, two_workers, model, [image_set], settings, max_in_flight=2,
                           retry=Retry(attempts=3, backoff_s=0.1), on_progress=lock_inspections)
    blocking[0].rollback()
    blocker.close()
    with factory() as session:
        run = session.scalars(select(JobRun)).one()
        assert run.status == "failed"
        assert "lock timeout" in run.error
        recorded = session.scalar(select(func.count()).select_from(Inspection))
        assert 0 < recorded < N_IMAGES and recorded % 8 == 0  # whole shards only
        assert run.n_inspected == recorded
        positions = session.scalars(select(Image.position).join(Inspection, Inspection.image_id == Image.id)).all()
        assert len(positions) == len(set(positions))

    # the rerun completes the rest
    summary = inspect_image_sets(factory, two_workers, model, [image_set], settings, max_in_flight=2)
    assert (summary.status, summary.n_skipped, summary.counts.inspected) == ("succeeded", recorded, N_IMAGES - recorded)
    engine.dispose()

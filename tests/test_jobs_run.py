"""`defectscan jobs run` against a real `dask scheduler` + `dask worker` pair over TLS, with real Zarr stores and databases."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
from defectscan.config import load_settings
from defectscan.db.schema import Image, ImageSet, Inspection, JobLock, JobRun
from defectscan.db.session import make_engine, session_factory
from defectscan.errors import DefectscanError
from defectscan.pipeline.cluster import connect
from jobs_helpers import defectscan, make_tls, tls_cluster, tls_environment, write_spec
from pipeline_helpers import add_model, save_threshold_model, square_images, write_stack
from sqlalchemy import func, select

DEFECTS = {1: (10, 10, 6), 3: (30, 40, 8)}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory, tls):
    with tls_cluster(tmp_path_factory.mktemp("cluster"), tls) as address:
        yield address


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_threshold_model(tmp_path_factory.mktemp("model") / "threshold.keras")


@pytest.fixture
def env(tls, scheduler):
    return tls_environment(tls, scheduler)


def _count(factory, model=Inspection):
    with factory() as session:
        return session.scalar(select(func.count()).select_from(model))


def _runs(factory, job):
    with factory() as session:
        return list(session.scalars(select(JobRun).where(JobRun.job == job).order_by(JobRun.id)))


def _started_run(url, factory, tmp_path, env):
    """`jobs run line-a` in a process of its own, once it has recorded a few images."""
    runner = defectscan(url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    deadline = time.monotonic() + 120
    while _count(factory) < 3:
        assert runner.poll() is None, runner.communicate()
        assert time.monotonic() < deadline, "the run recorded nothing in time"
        time.sleep(0.05)
    return runner


def _spec(tmp_path, name="line-a", **fields):
    fields.setdefault("source", {"glob": "incoming/*.zarr"})
    fields.setdefault("model", "threshold:1")
    fields.setdefault("inspection", {"batch_size": 4, "images_per_shard": 4})
    return write_spec(tmp_path, name, **fields)


def test_run_discovers_inspects_records_and_a_second_run_does_nothing(cli, migrated_url, factory, env, model_file, tmp_path):
    add_model(factory, model_file)
    write_stack(tmp_path / "incoming" / "L1.zarr", square_images(6, defects=DEFECTS), lot="L1")
    write_stack(tmp_path / "incoming" / "L2.zarr", square_images(5, seed=1), lot="L2")
    _spec(tmp_path)

    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    assert result.exit_code == 0, result.output
    assert "2 new stores" in result.output and "11 images inspected" in result.output

    with factory() as session:
        uris = sorted(session.scalars(select(ImageSet.uri)))
        rows = session.execute(
            select(ImageSet.lot, Image.position, Inspection.verdict, Inspection.n_defects)
            .join(Image, Image.image_set_id == ImageSet.id).join(Inspection, Inspection.image_id == Image.id)
            .order_by(ImageSet.lot, Image.position)
        ).all()
    # The masks the run wrote next to the stores (*.masks.zarr) are outputs, never new inputs.
    assert uris == [str(tmp_path / "incoming" / "L1.zarr"), str(tmp_path / "incoming" / "L2.zarr")]
    assert [(lot, p) for lot, p, _, _ in rows] == [("L1", p) for p in range(6)] + [("L2", p) for p in range(5)]
    assert {(lot, p) for lot, p, verdict, _ in rows if verdict == "fail"} == {("L1", 1), ("L1", 3)}
    assert all(n == (1 if (lot, p) in {("L1", 1), ("L1", 3)} else 0) for lot, p, _, n in rows)
    assert (tmp_path / "incoming" / "L1.masks.zarr").is_dir()

    [run] = _runs(factory, "line-a")
    assert (run.status, run.n_images, run.n_inspected, run.n_errors, run.n_defects) == ("succeeded", 11, 11, 0, 2)
    assert run.spec["job"]["model"] == {"name": "threshold", "version": "1"}
    assert sorted(run.spec["discovery"]["new"]) == uris
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(JobLock)) == 0

    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    assert result.exit_code == 0, result.output
    assert "0 new stores, 0 image sets with work, 0 images inspected" in result.output and "11 already done" in result.output
    assert "nothing new to inspect" in result.output
    assert _count(factory) == 11
    _, second = _runs(factory, "line-a")
    assert (second.status, second.n_images, second.n_skipped, second.model_id) == ("succeeded", 11, 11, None)
    assert second.spec["discovery"] == {"matched": 2, "new": [], "incomplete": [], "problems": [], "arrived": 0}

    history = cli("--database-url", migrated_url, "jobs", "history", "line-a")
    lines = history.output.splitlines()
    assert lines[1].split()[:4] == [str(second.id), *f"{second.started_at:%Y-%m-%d %H:%M:%S}".split(), "succeeded"]
    assert lines[2].split()[3] == "succeeded" and lines[2].split()[-5:] == ["11", "11", "0", "0", "2"]

    # A new store beside the done ones: the history counts what the run printed (the done sets were left out).
    write_stack(tmp_path / "incoming" / "L3.zarr", square_images(3, seed=2), lot="L3")
    third_run = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    assert "3 images inspected" in third_run.output and "11 already done" in third_run.output, third_run.output
    third = _runs(factory, "line-a")[-1]
    assert (third.n_images, third.n_inspected, third.n_skipped) == (14, 3, 11)


def test_a_store_that_cannot_be_registered_makes_the_run_partial(cli, migrated_url, factory, env, model_file, tmp_path):
    add_model(factory, model_file)
    write_stack(tmp_path / "incoming" / "good.zarr", square_images(4))
    (tmp_path / "incoming" / "broken.zarr").mkdir()
    _spec(tmp_path)

    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    assert result.exit_code == 3, result.output
    assert f"{tmp_path / 'incoming' / 'broken.zarr'}: not a Zarr store" in result.output
    assert _count(factory) == 4
    [run] = _runs(factory, "line-a")
    assert run.status == "partial" and "broken.zarr" in run.error


def test_a_missing_model_fails_the_run_and_records_it(cli, migrated_url, factory, env, model_file, tmp_path):
    write_stack(tmp_path / "incoming" / "L1.zarr", square_images(2))
    _spec(tmp_path, model="no-such-model")
    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    assert result.exit_code == 1, result.output
    [run] = _runs(factory, "line-a")
    assert run.status == "failed" and run.error.startswith("no model no-such-model:production in the registry")
    shown = json.loads(cli("--database-url", migrated_url, "jobs", "show", str(run.id)).output)
    assert shown["status"] == "failed" and shown["spec"]["job"]["model"]["name"] == "no-such-model"

    # A night without data is no excuse: the missing model fails the run, and so does a glob whose folder is gone.
    shutil.rmtree(tmp_path / "incoming" / "L1.zarr")
    assert cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env).exit_code == 1
    assert _runs(factory, "line-a")[-1].error.startswith("no model no-such-model:production")
    add_model(factory, model_file)
    _spec(tmp_path, source={"glob": "unmounted/*.zarr"})
    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    assert result.exit_code == 1, result.output
    assert _runs(factory, "line-a")[-1].error == f"source glob {tmp_path / 'unmounted' / '*.zarr'}: its folder {tmp_path / 'unmounted'} does not exist (an unmounted share, a misspelt path?)"


@pytest.fixture
def sqlite_factory(sqlite_url):
    from defectscan.db.migrate import upgrade

    engine = make_engine(sqlite_url)
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def test_sigterm_marks_the_run_interrupted_and_the_next_run_resumes(sqlite_url, sqlite_factory, env, model_file, tmp_path):
    # Signals are the runner's business, not the database's: SQLite only, to save a minute.
    migrated_url, factory = sqlite_url, sqlite_factory
    add_model(factory, model_file)
    n = 150
    write_stack(tmp_path / "incoming" / "big.zarr", square_images(n, size=32))
    _spec(tmp_path, inspection={"batch_size": 1, "images_per_shard": 1}, max_in_flight=1)

    runner = _started_run(migrated_url, factory, tmp_path, env)
    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 143, err
    done = _count(factory)
    assert 3 <= done < n
    [run] = _runs(factory, "line-a")
    assert run.status == "interrupted" and run.finished_at is not None and "interrupted" in run.error
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(JobLock)) == 0

    rerun = defectscan(migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a", env=env)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    assert f"{n - done} images inspected" in out and f"{done} already done" in out
    assert _count(factory) == n
    assert [r.status for r in _runs(factory, "line-a")] == ["interrupted", "succeeded"]


def test_a_run_that_loses_its_lock_stops_and_its_row_says_so(sqlite_url, sqlite_factory, env, model_file, tmp_path):
    """The heartbeat stops such a run as SIGTERM would: its row said "interrupted by signal SIGTERM", not why."""
    from defectscan.jobs.runner import LOCK_LOST
    from sqlalchemy import update

    factory = sqlite_factory
    add_model(factory, model_file)
    write_stack(tmp_path / "incoming" / "big.zarr", square_images(150, size=32))
    _spec(tmp_path, inspection={"batch_size": 1, "images_per_shard": 1}, max_in_flight=1, lock={"stale_after_s": 5})
    runner = _started_run(sqlite_url, factory, tmp_path, env)
    with factory.begin() as session:
        session.execute(update(JobLock).values(owner="otherhost/1:1:abc"))
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 143, err
    [run] = _runs(factory, "line-a")
    assert (run.status, run.error) == ("interrupted", LOCK_LOST)


def test_a_client_without_the_certificates_cannot_connect(scheduler, tls, tmp_path):
    from distributed import Client

    # Plain TCP to the TLS port: the scheduler never completes a handshake with it.
    with pytest.raises((OSError, TimeoutError)):
        Client(scheduler.replace("tls://", "tcp://"), timeout=3)

    stranger = make_tls(tmp_path / "other-ca")
    foreign = load_settings(environ=tls_environment(stranger, scheduler)).cluster
    with pytest.raises(DefectscanError, match="cannot connect to the Dask scheduler"), connect(foreign, timeout=5):
        pass

    good = load_settings(environ=tls_environment(tls, scheduler)).cluster
    with connect(good, timeout=30) as (client, info):
        assert info.n_workers == 1
        assert client.submit(sum, [1, 2, 3]).result() == 6


def test_a_job_without_tls_files_for_a_tls_scheduler_fails_with_one_line(cli, migrated_url, factory, scheduler, model_file, tmp_path):
    add_model(factory, model_file)
    write_stack(tmp_path / "incoming" / "L1.zarr", square_images(2))
    _spec(tmp_path)
    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a",
                 env={"DEFECTSCAN_CLUSTER__SCHEDULER": scheduler})
    assert result.exit_code == 1, result.output
    assert f"cluster.scheduler {scheduler} uses TLS but cluster.tls is not set" in result.output
    assert _count(factory) == 0

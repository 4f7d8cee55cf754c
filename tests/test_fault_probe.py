"""The fault probe, repeated on real processes: each fault of the machinery leaves images pending
(never a verdict), and once the fault is gone one rerun without --force leaves the database and the
score maps equal to those of a run nothing disturbed. SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from defectscan.config import load_settings
from defectscan.db.migrate import upgrade
from defectscan.db.schema import Inspection, JobRun
from defectscan.db.session import make_engine, session_factory
from defectscan.exitcodes import EXIT_PARTIAL, EXIT_PENDING
from defectscan.pipeline.outputs import scores_uri
from defectscan.pipeline.run import inspect_image_sets

from pipeline_helpers import add_model, corrupt_chunk, register, restore_chunk, save_threshold_model, square_images, write_stack
from test_pipeline_run import _table

N_IMAGES = 48
DEFECTS = {3: (10, 10, 6), 20: (30, 40, 8), 41: (0, 0, 5)}
SMALL_SHARDS = {"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8"}


def _settings(**environ: str):
    return load_settings(environ={**SMALL_SHARDS, **environ}).inspection


@pytest.fixture(scope="module")
def probe_cluster():
    """Two worker processes whose death fails their tasks at once: one kill is "past the retry budget"."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, Client(local) as client:
            yield client


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_threshold_model(tmp_path_factory.mktemp("model") / "threshold.keras")


@dataclass
class Plant:
    url: str
    factory: object
    store: Path
    image_set: object
    model: object

    def outcome(self, output_dir: Path | None = None):
        """What a run leaves: the inspection and defect rows, and the score maps."""
        scores = zarr.open_array(scores_uri(str(self.store), output_dir), path="threshold/1", mode="r")[...]
        return _table(self.factory), scores

    def run(self, client, settings=None, **kwargs):
        return inspect_image_sets(self.factory, client, self.model, [self.image_set], settings or _settings(), max_in_flight=4, **kwargs)


@contextmanager
def plant(url: str, folder: Path, model_file: Path):
    engine = make_engine(url)
    upgrade(engine)
    factory = session_factory(engine)
    store = write_stack(folder / "L1.zarr", square_images(N_IMAGES, defects=DEFECTS))
    try:
        yield Plant(url, factory, store, register(factory, store), add_model(factory, model_file))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, probe_cluster, model_file):
    folder = tmp_path_factory.mktemp("undisturbed")
    with plant(f"sqlite:///{folder / 'db.sqlite'}", folder, model_file) as reference:
        summary = reference.run(probe_cluster)
        assert summary.status == "succeeded"
        return reference.outcome()


def _assert_equal(outcome, expected):
    (rows, defects), scores = outcome
    (expected_rows, expected_defects), expected_scores = expected
    assert rows == expected_rows
    assert defects == expected_defects
    np.testing.assert_array_equal(scores, expected_scores)


def _verdicts(factory) -> dict[str, int]:
    with factory() as session:
        return dict(session.execute(select(Inspection.verdict, func.count()).group_by(Inspection.verdict)).all())


def _die_if_executing(dask_worker) -> bool:
    if dask_worker.state.executing_count:
        os.kill(os.getpid(), signal.SIGKILL)
    return False


def test_a_worker_lost_past_the_retry_budget_leaves_its_images_pending_and_a_rerun_completes(probe_cluster, database_url, tmp_path, model_file, undisturbed):
    killed = []

    def kill_a_busy_worker(done, total):
        if killed or done == 0:
            return
        # The worker checks and dies in one step on its own event loop, so the task it is executing
        # cannot be reported finished in between (a kill chosen from the scheduler's view could land
        # after the worker had finished everything, and nothing was lost).
        answers = probe_cluster.run(_die_if_executing, on_error="return")
        killed.extend(worker for worker, answer in answers.items() if answer is not False)

    with plant(database_url, tmp_path, model_file) as line:
        summary = line.run(probe_cluster, on_progress=kill_a_busy_worker)
        assert killed, "no worker was busy to be killed"
        assert summary.counts.pending > 0 and summary.status == "partial", summary.errors
        assert summary.exit_code == EXIT_PENDING
        assert any("left pending, the next run inspects them: worker lost" in e for e in summary.errors), summary.errors
        assert "error" not in _verdicts(line.factory)  # a lost worker is not a verdict on the images
        with line.factory() as session:
            assert session.scalar(select(func.count()).select_from(Inspection)) == N_IMAGES - summary.counts.pending
            assert session.get(JobRun, summary.job_run_id).status == "partial"
        probe_cluster.wait_for_workers(2, timeout=120)

        rerun = line.run(probe_cluster)
        assert (rerun.status, rerun.counts.inspected, rerun.n_skipped) == ("succeeded", summary.counts.pending, N_IMAGES - summary.counts.pending)
        _assert_equal(line.outcome(), undisturbed)


def test_a_shard_past_the_timeout_is_cancelled_and_left_pending(probe_cluster, database_url, tmp_path, model_file, undisturbed):
    with plant(database_url, tmp_path, model_file) as line:
        hurried = line.run(probe_cluster, _settings(DEFECTSCAN_INSPECTION__SHARD_TIMEOUT_S="0.001"))
        assert hurried.counts.pending > 0 and hurried.exit_code == EXIT_PENDING, hurried.errors
        assert any("ShardTimeout: a shard did not finish within inspection.shard_timeout_s (0.001 s)" in e for e in hurried.errors)
        assert "error" not in _verdicts(line.factory)
        rerun = line.run(probe_cluster)
        assert rerun.status == "succeeded" and rerun.counts.inspected == hurried.counts.pending
        _assert_equal(line.outcome(), undisturbed)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


def test_a_full_disk_leaves_images_pending_names_the_store_and_its_free_space(probe_cluster, database_url, tmp_path, model_file, undisturbed):
    out = tmp_path / "out"
    # Room for the array's metadata (8 inodes) and one shard file with its 3 folders, then ENOSPC:
    # counted in inodes, since these score maps compress to almost nothing (all-zero shards are not
    # even written, so only the 3 shards holding defects need room).
    mounted = _mount_tmpfs(out, "2m,nr_inodes=14")
    try:
        with plant(database_url, tmp_path, model_file) as line:
            settings = _settings(DEFECTSCAN_INSPECTION__OUTPUT_DIR=str(out))
            if mounted:
                def clear_fault() -> None:
                    subprocess.run(["mount", "-o", "remount,nr_inodes=100000", str(out)], check=True)

                expected = "No space left on device"
            else:  # no tmpfs here: a write error injected at the store, where its chunks go
                line.run(probe_cluster, settings)  # creates the array
                with line.factory.begin() as session:
                    session.execute(text("DELETE FROM defects"))
                    session.execute(text("DELETE FROM inspections"))
                    session.execute(text("DELETE FROM inspection_daily"))
                chunks = Path(scores_uri(str(line.store), out)) / "threshold" / "1" / "c"
                shutil.rmtree(chunks)
                chunks.write_text("not a folder")
                clear_fault, expected = chunks.unlink, "Not a directory"
            summary = line.run(probe_cluster, settings)
            assert summary.counts.pending > 0 and summary.exit_code == EXIT_PENDING, summary.errors
            reason = next(e for e in summary.errors if "left pending" in e)
            assert f"{scores_uri(str(line.store), out)}: cannot write score maps: {expected}" in reason
            assert "MB free on" in reason
            assert "error" not in _verdicts(line.factory)

            clear_fault()  # the disk has room again
            rerun = line.run(probe_cluster, settings)
            assert rerun.status == "succeeded" and rerun.counts.inspected == summary.counts.pending
            _assert_equal(line.outcome(out), undisturbed)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(out)], check=False)


def test_a_storage_fault_under_the_images_leaves_them_pending_never_an_error_verdict(probe_cluster, database_url, tmp_path, model_file, undisturbed):
    with plant(database_url, tmp_path, model_file) as line:
        chunk = line.store / "images" / "c" / "20" / "0" / "0"
        good = chunk.read_bytes()
        chunk.unlink()
        chunk.symlink_to(chunk)  # every read of it fails in the filesystem (ELOOP), as a failing disk or mount does
        summary = line.run(probe_cluster)
        assert summary.counts.pending > 0 and summary.exit_code == EXIT_PENDING, summary.errors
        reason = next(e for e in summary.errors if "left pending" in e)
        assert f"{line.store}: cannot read images: Too many levels of symbolic links" in reason
        assert "error" not in _verdicts(line.factory)

        chunk.unlink()
        chunk.write_bytes(good)  # the storage answers again
        rerun = line.run(probe_cluster)
        assert rerun.status == "succeeded" and rerun.counts.inspected == summary.counts.pending
        _assert_equal(line.outcome(), undisturbed)


def test_a_corrupt_chunk_is_an_error_a_plain_rerun_keeps_and_retry_errors_redoes_once_restored(probe_cluster, database_url, tmp_path, model_file, undisturbed):
    with plant(database_url, tmp_path, model_file) as line:
        good = corrupt_chunk(line.store, 20)
        first = line.run(probe_cluster)
        assert (first.status, first.exit_code, first.counts.errors) == ("partial", EXIT_PARTIAL, 1)
        assert _verdicts(line.factory)["error"] == 1

        restore_chunk(line.store, 20, good)  # restored from the acquisition system's copy
        plain = line.run(probe_cluster)
        assert (plain.status, plain.counts.inspected, plain.n_skipped) == ("succeeded", 0, N_IMAGES)
        assert _verdicts(line.factory)["error"] == 1  # a data error stays until asked for

        retried = line.run(probe_cluster, retry_errors=True)
        assert (retried.status, retried.counts.inspected, retried.n_skipped) == ("succeeded", 1, N_IMAGES - 1)
        _assert_equal(line.outcome(), undisturbed)


def _inspect_process(url: str, scheduler: str, image_set_id: int, **environ: str) -> subprocess.Popen:
    env = {**os.environ, **SMALL_SHARDS, "DEFECTSCAN_CLUSTER__SHARDS_IN_FLIGHT_PER_WORKER": "1", **environ}
    return subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", url, "inspect", "--model", "threshold",
                             "--imageset", str(image_set_id), "--scheduler", scheduler, "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_sigkilled_client_leaves_a_row_the_next_run_and_jobs_history_close_as_abandoned(probe_cluster, database_url, tmp_path, model_file, undisturbed, cli):
    stale = {"DEFECTSCAN_INSPECTION__HEARTBEAT_S": "1", "DEFECTSCAN_INSPECTION__STALE_RUN_AFTER_S": "3"}
    with plant(database_url, tmp_path, model_file) as line:
        client = _inspect_process(line.url, probe_cluster.scheduler.address, line.image_set.id)
        deadline = time.monotonic() + 120
        while client.poll() is None and time.monotonic() < deadline:
            with line.factory() as session:
                if session.scalar(select(func.count()).select_from(Inspection)):
                    break
            time.sleep(0.05)
        assert client.poll() is None, client.communicate()[0].decode()
        client.kill()
        client.wait()
        with line.factory() as session:
            [killed] = session.scalars(select(JobRun)).all()
            assert killed.status == "running"

        fresh = cli("--database-url", line.url, "jobs", "history", "inspect", env=stale)
        assert " running " in fresh.output  # its heartbeat is younger than 3 s: it may be alive
        time.sleep(3.5)
        shown = cli("--database-url", line.url, "jobs", "history", "inspect", env=stale)
        assert f"{killed.id:>6}" in shown.output and " abandoned " in shown.output, shown.output

        rerun = line.run(probe_cluster, _settings(**stale))
        assert rerun.status == "succeeded"
        _assert_equal(line.outcome(), undisturbed)
        with line.factory() as session:
            closed = session.get(JobRun, killed.id)
            assert closed.status == "abandoned" and closed.finished_at is not None
            assert "no heartbeat for over 3 s" in closed.error


def test_the_next_run_closes_a_dead_clients_row_itself(probe_cluster, database_url, tmp_path, model_file):
    with plant(database_url, tmp_path, model_file) as line:
        with line.factory.begin() as session:
            session.execute(text("INSERT INTO job_runs (job, status, started_at, heartbeat_at, n_images, n_skipped, n_inspected, n_errors, n_defects) "
                                 "VALUES ('inspect', 'running', '2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00', 0, 0, 0, 0, 0)"))
        line.run(probe_cluster)
        with line.factory() as session:
            assert [r.status for r in session.scalars(select(JobRun).order_by(JobRun.id))] == ["abandoned", "succeeded"]


@contextmanager
def read_only(line: Plant, folder: Path):
    """The database made read-only: PostgreSQL by a setting, SQLite by remounting its folder read-only."""
    url = make_url(line.url)
    if url.get_backend_name() == "postgresql":
        admin = create_engine(url.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{url.database}" SET default_transaction_read_only = on'))
        try:
            yield
        finally:
            with admin.connect() as connection:
                connection.execute(text("SET default_transaction_read_only = off"))
                connection.execute(text(f'ALTER DATABASE "{url.database}" SET default_transaction_read_only = off'))
            admin.dispose()
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)


def test_a_read_only_database_is_said_so_at_once_and_read_commands_still_work(probe_cluster, database_url, tmp_path, model_file, undisturbed, cli):
    folder = tmp_path / "db"
    if database_url.startswith("sqlite"):
        if not _mount_tmpfs(folder, "16m"):
            pytest.skip("a read-only folder needs a tmpfs mount (root): as root the file's permissions do not stop writes")
        database_url = f"sqlite:///{folder / 'defectscan.sqlite'}"
    try:
        with plant(database_url, tmp_path, model_file) as line:
            line.factory.kw["bind"].dispose()  # no connection opened before the change survives it
            with read_only(line, folder):
                listed = cli("--database-url", line.url, "lots", "list")
                assert listed.exit_code == 0, listed.output
                shown = cli("--database-url", line.url, "imagesets", "list")
                assert shown.exit_code == 0 and "L1" in shown.output, shown.output
                refused = cli("--database-url", line.url, "inspect", "--model", "threshold", "--imageset", str(line.image_set.id),
                              "--scheduler", probe_cluster.scheduler.address, "--no-progress", env=SMALL_SHARDS)
                assert refused.exit_code == 1, refused.output
                assert "the database is read-only" in refused.output and "attempts" not in refused.output
                assert "Traceback" not in refused.output
            line.factory.kw["bind"].dispose()
            rerun = line.run(probe_cluster)
            assert rerun.status == "succeeded" and rerun.counts.inspected == N_IMAGES
            _assert_equal(line.outcome(), undisturbed)
    finally:
        if folder.is_mount():
            subprocess.run(["umount", "-l", str(folder)], check=False)

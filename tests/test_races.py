"""Two processes meeting on a new database: registering the same model, demo model or store at once.
The loser reads what the winner wrote; no traceback reaches a user; counts say what happened."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from defectscan.db.schema import ImageSet, Inspection, JobRun, Model

from pipeline_helpers import register, save_threshold_model, square_images, write_stack


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local.scheduler_address


def _at_once(url: str, *commands: list[str]) -> list[tuple[int, str]]:
    """Start every `defectscan` command together; their exit statuses and outputs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFECTSCAN_") or k.startswith("DEFECTSCAN_TEST_")}
    env.update({"DEFECTSCAN_INSPECTION__BATCH_SIZE": "2", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "2"})
    processes = [subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", url, *command], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for command in commands]
    return [(p.wait(timeout=300), p.communicate()[0]) for p in processes]


def test_two_inspect_model_demo_at_once_on_a_new_database(migrated_url, factory, scheduler, tmp_path):
    store = write_stack(tmp_path / "L1.zarr", square_images(4, size=64))
    image_set = register(factory, store)
    command = ["inspect", "--model", "demo", "--imageset", str(image_set.id), "--scheduler", scheduler, "--no-progress"]
    results = _at_once(migrated_url, command, command)
    for status, output in results:
        assert status == 0, output
        assert "Traceback" not in output and "UNIQUE" not in output and "duplicate key" not in output, output
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 1
        assert session.scalar(select(func.count()).select_from(Inspection)) == 4
        runs = {run.id: run for run in session.scalars(select(JobRun))}
    # Every image is accounted for in each run's line: inspected, recorded meanwhile by the other, or already done.
    for _, output in results:
        line = next(text for text in output.splitlines() if text.startswith("job run "))
        run_id = int(line.split()[2].rstrip(":"))
        other = next(i for i in runs if i != run_id)
        inspected = int(line.split("images: ")[1].split(" inspected")[0])
        meanwhile = int(line.split(" recorded meanwhile")[0].rsplit(", ", 1)[1]) if "recorded meanwhile" in line else 0
        skipped = int(line.split(" already done")[0].rsplit(", ", 1)[1])
        assert inspected + meanwhile + skipped == 4, line
        if meanwhile:
            assert f"recorded meanwhile by run {other}" in line


def test_two_model_registrations_of_one_name_and_version_at_once(migrated_url, factory, tmp_path):
    model = save_threshold_model(tmp_path / "threshold.keras")
    command = ["models", "register", str(model), "--name", "threshold", "--version", "1"]
    results = sorted(_at_once(migrated_url, command, command))
    assert [status for status, _ in results] == [0, 1], results
    assert results[1][1].startswith("Error: model threshold:1 is already registered"), results[1][1]
    assert "Traceback" not in results[1][1]
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 1


def test_two_registrations_of_one_store_at_once_give_one_image_set(migrated_url, factory, tmp_path):
    store = write_stack(tmp_path / "L2.zarr", square_images(6, size=32))
    results = _at_once(migrated_url, *[["imagesets", "register", str(store)]] * 3)
    assert [status for status, _ in results] == [0, 0, 0], results
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(ImageSet)) == 1


def test_the_loser_of_a_store_registration_race_reads_the_winners_row(migrated_url, factory, tmp_path, monkeypatch):
    """The race made certain: another session registers the store between our look-up and our insert."""
    from defectscan.data import imageset as layout
    from defectscan.data import register as registration

    store = write_stack(tmp_path / "L3.zarr", square_images(6, size=32))
    real = layout.missing_chunks
    winner, calls = [], []

    def meanwhile(array):
        calls.append(array)
        if len(calls) == 1:  # our registration: the other process's happens now, in full
            winner.append(register(factory, store))
        return real(array)

    monkeypatch.setattr(layout, "missing_chunks", meanwhile)
    with factory() as session:
        result = registration.register_store(session, str(store))
    assert winner and result.image_set.id == winner[0].id and not result.created


def test_an_unexpected_error_is_one_line_with_a_hint_and_the_traceback_under_debug(migrated_url, cli, monkeypatch):
    from defectscan.db import queries

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(queries, "list_lots", broken)
    result = cli("--database-url", migrated_url, "lots", "list")
    assert result.exit_code == 1
    assert result.output == "Error: RuntimeError: something nobody foresaw (rerun with --log-level DEBUG for the traceback)\n"
    with pytest.raises(RuntimeError, match="something nobody foresaw"):
        cli("--database-url", migrated_url, "--log-level", "DEBUG", "lots", "list")


def test_images_another_run_recorded_meanwhile_are_counted_as_such(factory, cluster, tmp_path):
    """Run B plans, then run A inspects everything before B records: B says so, never "0 inspected, 0 already done"."""
    from defectscan.cli.inspect import describe_summary
    from defectscan.config import load_settings
    from defectscan.pipeline.run import inspect_image_sets

    from pipeline_helpers import add_model

    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8"}).inspection
    image_set = register(factory, write_stack(tmp_path / "L5.zarr", square_images(16, size=32)))
    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    other = []

    def planned(done, total):
        if done == 0 and not other:
            other.append(inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2))

    late = inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2, on_progress=planned)
    [first] = other
    assert (first.counts.inspected, late.counts.inspected, late.counts.meanwhile, late.counts.meanwhile_runs) == (16, 0, 16, [first.job_run_id])
    assert late.status == "succeeded"
    assert f"0 inspected (0 failed), 0 errors, 16 recorded meanwhile by run {first.job_run_id}, 0 already done" in describe_summary(late)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 16

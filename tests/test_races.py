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


def test_a_shard_recorded_by_another_run_between_our_look_up_and_insert_is_counted_meanwhile(factory, tmp_path, monkeypatch):
    """The race made certain: run B looks up what is done, run A commits the same images, B inserts.
    B writes its shard again instead of failing on the unique (image, model) row."""
    from defectscan.model.verdict import ImageResult
    from defectscan.pipeline import record
    from defectscan.pipeline.job_runs import open_run

    from pipeline_helpers import add_model

    image_set = register(factory, write_stack(tmp_path / "L6.zarr", square_images(4, size=32)))
    weights = tmp_path / "weights.keras"
    weights.write_bytes(b"not read by this test")
    model = add_model(factory, weights)
    first, second = (open_run(factory, record.Retry(), job="race", spec=None, model_id=model.id) for _ in range(2))
    results = [ImageResult(position=p, verdict="pass", max_score=0.1) for p in range(4)]
    shard = dict(model_id=model.id, image_set_id=image_set.id, results=results, mask_uri="m.zarr", mask_array="scores")
    real, calls = record.utcnow, []

    def meanwhile():
        calls.append(1)
        if len(calls) == 1:  # run B has looked up what is done; run A records the same shard now, in full
            assert record.record_shard(factory, record.Retry(), job_run_id=first, **shard).inspected == 4
        return real()

    monkeypatch.setattr(record, "utcnow", meanwhile)
    counts = record.record_shard(factory, record.Retry(), job_run_id=second, **shard)
    assert (counts.inspected, counts.meanwhile, counts.meanwhile_runs) == (0, 4, [first])
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 4
        assert {run.id: run.n_inspected for run in session.scalars(select(JobRun))} == {first: 4, second: 0}


def test_two_runs_creating_one_score_array_at_once_both_use_it(tmp_path, monkeypatch):
    """The race made certain: the other run creates the array after our look-up, so our creation finds it there."""
    import zarr
    from zarr.errors import ContainsArrayError

    from defectscan.pipeline.outputs import prepare_output

    args = dict(image_set_uri=str(tmp_path / "L7.zarr"), kind="stack", shape=(4, 32, 32), n_classes=1, model_name="m", model_version="1")
    options = dict(images_per_file=2, images_per_shard=2, tile_size=32, output_dir=None, attributes={"by": "test"})
    real, calls = zarr.Group.require_array, []

    def created_meanwhile(self, name, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            monkeypatch.setattr(zarr.Group, "require_array", real)
            prepare_output(**args, **options)  # the other run, in full
            monkeypatch.setattr(zarr.Group, "require_array", created_meanwhile)
            raise ContainsArrayError(f"An array exists in store at path {name!r}.")
        return real(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "require_array", created_meanwhile)
    ref = prepare_output(**args, **options)
    assert len(calls) == 2
    assert zarr.open_array(ref.uri, path=ref.path, mode="r").shape == (4, 1, 32, 32)


def test_a_reader_that_goes_away_ends_the_command_quietly_with_the_sigpipe_status(migrated_url):
    # `defectscan db history | head -0`: the pipe is closed before the command writes.
    command = subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", migrated_url, "db", "history"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()
    assert command.wait(timeout=120) == 141
    assert command.stderr.read() == b""


def test_an_unexpected_tensorflow_error_shows_its_own_message_not_the_traceback_header(migrated_url, cli, monkeypatch):
    from defectscan.db import queries

    def broken(*args, **kwargs):
        raise TypeError('in user code:\n\n    File "/x/train.py", line 3, in step  *\n        return f(x)\n\n    TypeError: cannot add str and int\n')

    monkeypatch.setattr(queries, "list_lots", broken)
    result = cli("--database-url", migrated_url, "lots", "list")
    assert result.output == "Error: TypeError: cannot add str and int (rerun with --log-level DEBUG for the traceback)\n"


@pytest.mark.parametrize("redo", ["none", "all"])
def test_a_shard_whose_commit_reached_the_database_but_not_its_acknowledgement_is_counted_once_as_this_runs(factory, tmp_path, redo):
    """The connection drops after COMMIT: the retry found the run's own rows and said "recorded meanwhile by another
    run", while the summary lacked the shard (and a --force retry replaced them a second time)."""
    from sqlalchemy.exc import OperationalError

    from defectscan.model.verdict import ImageResult
    from defectscan.pipeline import record
    from defectscan.pipeline.job_runs import open_run

    from pipeline_helpers import add_model

    image_set = register(factory, write_stack(tmp_path / "L8.zarr", square_images(4, size=32)))
    weights = tmp_path / "weights.keras"
    weights.write_bytes(b"not read by this test")
    model = add_model(factory, weights)
    if redo == "all":  # an earlier run's verdicts, for the --force run to replace
        earlier = open_run(factory, record.Retry(), job="before", spec=None, model_id=model.id)
        record.record_shard(factory, record.Retry(), job_run_id=earlier, model_id=model.id, image_set_id=image_set.id, mask_uri="m.zarr",
                            mask_array="scores", results=[ImageResult(position=p, verdict="pass", max_score=0.1) for p in range(4)])
    run = open_run(factory, record.Retry(), job="lost-ack", spec=None, model_id=model.id)
    results = [ImageResult(position=p, verdict="fail" if p == 1 else "pass", max_score=0.9 if p == 1 else 0.1) for p in range(4)]
    if redo == "all":  # one image unreadable this time: it keeps the earlier verdict, and is this run's error once
        results[3] = ImageResult(position=3, verdict="error", error="chunk unreadable")
    begin, attempts = factory.begin, []

    class CommitThenDrop:
        def __init__(self):
            self.inner = begin()

        def __enter__(self):
            return self.inner.__enter__()

        def __exit__(self, *exc):
            self.inner.__exit__(*exc)
            attempts.append(1)
            if len(attempts) == 1 and exc[0] is None:
                raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    factory.begin = CommitThenDrop
    try:
        counts = record.record_shard(factory, record.Retry(attempts=2, backoff_s=0), job_run_id=run, model_id=model.id, image_set_id=image_set.id,
                                     results=results, mask_uri="m.zarr", mask_array="scores", redo=redo)
    finally:
        del factory.begin
    assert len(attempts) == 2
    inspected, errors = (3, 1) if redo == "all" else (4, 0)
    assert (counts.inspected, counts.errors, counts.failed, counts.meanwhile, counts.meanwhile_runs) == (inspected, errors, 1, 0, [])
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 4
        assert set(session.scalars(select(Inspection.job_run_id))) == ({run, earlier} if redo == "all" else {run})
        assert (session.get(JobRun, run).n_inspected, session.get(JobRun, run).n_errors) == (inspected, errors)

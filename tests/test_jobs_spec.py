"""Job specs: what validates, what is refused (with file, line, key, value and what is accepted), and `jobs list`/`show`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from defectscan.db.schema import JobLock, JobRun, utcnow
from defectscan.db.session import make_engine
from defectscan.jobs.spec import (
    JobSpec,
    SpecError,
    load_spec,
    next_run,
    resolve_glob,
    since_time,
)
from defectscan.paths import CONFIGS_DIR
from jobs_helpers import write_spec
from sqlalchemy import insert

GOOD = """\
name: line-a
schedule: "0 2 * * 1-5"
timezone: Europe/Berlin
source:
  glob: incoming/*.zarr
  lot: L42
model:
  name: tinyunet-dagm
  version: 3
inspection:
  threshold: 0.4
  batch_size: 4
  images_per_shard: 16
cluster:
  scheduler: tls://dask:8786
  tls: {ca_file: /etc/defectscan/tls/ca.crt, cert_file: /etc/defectscan/tls/tls.crt, key_file: /etc/defectscan/tls/tls.key}
max_in_flight: 4
"""


def _file(tmp_path: Path, text: str, name: str = "line-a") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, name: str = "line-a") -> str:
    path = _file(tmp_path, text, name)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    return message.removeprefix(str(path))


def test_a_full_spec_validates_and_layers_over_the_settings(tmp_path):
    path = _file(tmp_path, GOOD)
    spec = load_spec(path)
    assert (spec.model.reference, spec.max_in_flight) == ("tinyunet-dagm:3", 4)
    overrides = spec.setting_overrides(str(path))
    assert overrides["inspection__threshold"] == (0.4, f"{path}: inspection.threshold")  # wins over the model's registered one
    assert overrides["inspection__batch_size"] == (4, f"{path}: inspection.batch_size")
    assert overrides["cluster__scheduler"] == ("tls://dask:8786", f"{path}: cluster.scheduler")
    assert overrides["cluster__tls__key_file"][0] == "/etc/defectscan/tls/tls.key"
    # 02:00 in Berlin in winter is 01:00 UTC; Saturday 2026-01-03 -> Monday 2026-01-05.
    assert next_run(spec, dt.datetime(2026, 1, 3, 12, tzinfo=dt.UTC)) == dt.datetime(2026, 1, 5, 1, tzinfo=dt.UTC)


def test_the_shipped_demo_job_validates():
    spec = load_spec(CONFIGS_DIR.parent / "jobs" / "demo.yaml")
    assert spec.name == "demo" and spec.model.name == "demo" and spec.source.glob.endswith("*.zarr")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("max_in_flight: 4", "max_inflight: 4"),
         " line 17: unknown key 'max_inflight'; accepted keys: cluster, description, inspection, lock, max_in_flight, model, name, retries, schedule, source, timezone"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 2 * *"'),
         " line 2: key 'schedule' has value '0 2 * *': expected a cron expression of 5 fields (minute hour day-of-month month day-of-week), got 4; e.g. '*/30 * * * *'"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 25 * * *"'),
         " line 2: key 'schedule' has value '0 25 * * *': not a valid cron expression; fields: minute 0-59, hour 0-23"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 2 * * 1#2"'),
         " line 2: key 'schedule' has value '0 2 * * 1#2': not a valid cron expression; fields: minute 0-59"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 2 L * *"'),
         " line 2: key 'schedule' has value '0 2 L * *': not a valid cron expression; fields: minute 0-59"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 0 30 2 *"'),
         " line 2: key 'schedule' has value '0 0 30 2 *': the schedule never fires (no such date in any year, e.g. 30 February)"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 2 * * 1-7"'),
         " line 2: key 'schedule' has value '0 2 * * 1-7': day-of-week '1-7' is outside 0-6 (Sunday is 0)"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 22-2 * * *"'),
         " line 2: key 'schedule' has value '0 22-2 * * *': hour range '22-2' runs backwards, which Kubernetes refuses; write it as two"),
        (GOOD.replace('"0 2 * * 1-5"', '"0 2 * * fri-mon"'),
         " line 2: key 'schedule' has value '0 2 * * fri-mon': day-of-week range 'fri-mon' runs backwards"),
        (GOOD.replace("threshold: 0.4", "threshold: 1.5"),
         " line 11: key 'inspection.threshold' has value 1.5: Input should be less than 1"),
        (GOOD.replace("batch_size: 4", "batch_size: 5"),
         " line 13: section 'inspection': images_per_shard (16) must be a multiple of batch_size (5)"),
        (GOOD.replace("threshold: 0.4", "treshold: 0.4"),
         " line 10: section 'inspection': unknown key(s) treshold; accepted: batch_size, fail_score, halo, heartbeat_s, images_per_shard, max_batch_pixels, min_defect_area, output_dir, precision, runtime, shard_timeout_s, stale_run_after_s, stop_within_s, threshold, tile_batch_size, tile_size"),
        (GOOD.replace("Europe/Berlin", "Mars/Olympus"),
         " line 3: key 'timezone' has value 'Mars/Olympus': expected an IANA time zone such as UTC or Europe/Berlin"),
        (GOOD.replace("scheduler: tls://dask:8786", "scheduler: http://dask:8786"),
         " line 15: key 'cluster.scheduler' has value 'http://dask:8786': expected `local` or a scheduler address such as tls://dask-scheduler:8786"),
        (GOOD.replace("name: line-a", "name: line-b"),
         " line 1: key 'name' has value 'line-b': expected the file's name without .yaml, 'line-a'"),
        (GOOD.replace("  glob: incoming/*.zarr\n  lot: L42\n", "  array: images\n"),
         " line 4: section 'source': give a glob of Zarr stores, or at least one of lot, line, product, since to filter registered image sets"),
        ("name: line-a\nsource: {glob: a/*.zarr}\nmodel: demo\n",
         ": key 'schedule' is missing; expected a cron expression such as '0 2 * * *'"),
        ("- just\n- a list\n", ": expected a mapping of job settings at the top level, got list"),
        ("name: [unclosed\n", " line 2: not valid YAML"),
    ],
    ids=["unknown-key", "cron-4-fields", "cron-range", "cron-nth-weekday", "cron-last-day", "cron-never", "cron-sunday-7", "cron-wrapping-hours",
         "cron-wrapping-days", "threshold", "cross-field", "inspection-key", "timezone", "scheduler",
         "name", "empty-source", "missing", "not-mapping", "bad-yaml"],
)
def test_a_bad_spec_names_file_line_key_value_and_what_is_accepted(tmp_path, text, expected):
    assert _error(tmp_path, text).startswith(expected)


@pytest.mark.parametrize(
    ("insert_text", "expected"),
    [
        ("description: copy of postgresql://qa:hunter2@db/defectscan\n",
         " line 18: key 'description' has value 'copy of postgresql://qa:***@db/defectscan': it contains a password"),
        ("database_url: postgresql://qa@db/defectscan\n", " line 18: key 'database_url' does not belong in a job spec"),
        ("description: \"-----BEGIN PRIVATE KEY-----\"\n", " line 18: key 'description' holds PEM key or certificate text"),
    ],
    ids=["password-in-url", "database-url", "pem"],
)
def test_secrets_in_a_spec_are_refused_without_echoing_them(tmp_path, insert_text, expected):
    message = _error(tmp_path, GOOD + insert_text)
    assert message.startswith(expected)
    assert "hunter2" not in message


def test_source_glob_expands_variables_relative_to_the_spec(tmp_path, monkeypatch):
    spec_file = _file(tmp_path, GOOD)
    assert resolve_glob(spec_file, "incoming/*.zarr") == str(tmp_path / "incoming" / "*.zarr")
    monkeypatch.setenv("LINE_DATA", "/data/line-a")
    assert resolve_glob(spec_file, "$LINE_DATA/*.zarr") == "/data/line-a/*.zarr"
    assert resolve_glob(spec_file, "s3://bucket/line-a/*.zarr") == "s3://bucket/line-a/*.zarr"
    monkeypatch.delenv("LINE_DATA")
    with pytest.raises(SpecError, match="key 'source.glob' has value '\\$LINE_DATA/\\*.zarr': environment variable LINE_DATA is not set"):
        resolve_glob(spec_file, "$LINE_DATA/*.zarr")


def test_since_windows():
    now = dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC)
    assert since_time("12h", now) == dt.datetime(2026, 3, 10, 0, tzinfo=dt.UTC)
    assert since_time("2w", now) == dt.datetime(2026, 2, 24, 12, tzinfo=dt.UTC)
    assert since_time("2026-03-01T06:00", now) == dt.datetime(2026, 3, 1, 6, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="expected a window such as 30m"):
        since_time("yesterday", now)
    with pytest.raises(ValueError, match="window 1000000d reaches before the year 1"):  # was an OverflowError on every `jobs list`
        since_time("1000000d", now)
    base = {"name": "x", "schedule": "* * * * *", "model": "demo"}
    # `since: 2026-01-31` unquoted is a YAML date, the documented ISO form: it was refused as "not a string"
    assert JobSpec.model_validate({**base, "source": {"since": dt.date(2026, 1, 31)}}).source.since == "2026-01-31"


def test_model_forms():
    base = {"name": "x", "schedule": "* * * * *", "source": {"lot": "L1"}}
    # A job runs the promoted version unless its spec names another: a bare name too.
    assert JobSpec.model_validate({**base, "model": "demo"}).model.reference == "demo:production"
    assert JobSpec.model_validate({**base, "model": {"name": "demo"}}).model.reference == "demo:production"
    assert JobSpec.model_validate({**base, "model": "tinyunet:7"}).model.reference == "tinyunet:7"
    assert JobSpec.model_validate({**base, "model": "tinyunet:latest"}).model.reference == "tinyunet"
    assert JobSpec.model_validate({**base, "model": {"name": "tinyunet", "stage": "staging"}}).model.reference == "tinyunet:staging"
    old_form = {"name": "tinyunet", "version": "latest", "stage": "production"}  # documented before production became the default
    assert JobSpec.model_validate({**base, "model": old_form}).model.reference == "tinyunet:production"
    short = JobSpec.model_validate({**base, "model": "tinyunet:production"}).model
    assert (short.name, short.version, short.reference) == ("tinyunet", "production", "tinyunet:production")
    with pytest.raises(ValueError, match="give a version or a stage, not both"):
        JobSpec.model_validate({**base, "model": {"name": "tinyunet", "version": "2", "stage": "production"}})


def test_jobs_list_shows_next_and_last_run_and_flags_a_bad_spec(cli, migrated_url, tmp_path):
    write_spec(tmp_path, "line-a", schedule="30 6 * * *", source={"glob": "a/*.zarr"}, model="demo")
    write_spec(tmp_path, "line-b", schedule="0 0 * * 0", source={"lot": "L1"}, model="demo")
    (tmp_path / "broken.yaml").write_text("name: broken\nschedule: nope\n")
    (tmp_path / "notepad.yaml").write_text("name: notepad\n", encoding="utf-16")  # broke `jobs list` for every job, naming no file
    engine = make_engine(migrated_url)
    started = utcnow() - dt.timedelta(hours=1)
    with engine.begin() as connection:
        run_id = connection.execute(
            insert(JobRun).values(job="line-a", status="partial", started_at=started, finished_at=started, spec={"job": {}},
                                  error="database postgresql://qa:hunter2@db/x refused").returning(JobRun.id)
        ).scalar_one()
        # A runner on another host that died five hours ago left its lock: line-a is not "running".
        connection.execute(insert(JobLock).values(job="line-a", owner="other-host/4026531836:77:abcd", acquired_at=started,
                                                  heartbeat_at=utcnow() - dt.timedelta(hours=5)))
        connection.execute(insert(JobLock).values(job="line-b", owner="other-host/4026531836:78:abce", heartbeat_at=utcnow()))
    engine.dispose()

    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "list")
    assert result.exit_code == 1
    rows = {line.split()[0]: line for line in result.output.splitlines()[2:]}
    assert rows["broken"].startswith(f"broken               invalid: {tmp_path / 'broken.yaml'} line 2: key 'schedule' has value 'nope'")
    assert f"invalid: {tmp_path / 'notepad.yaml'}: cannot read job spec: not UTF-8 text (byte 0: 0xff); save it as UTF-8" in rows["notepad"]
    next_a = next_run(load_spec(tmp_path / "line-a.yaml"), utcnow())
    assert rows["line-a"].split()[-6:] == [*f"{next_a:%Y-%m-%d %H:%M}".split(), *f"{started:%Y-%m-%d %H:%M}".split(), "partial", str(run_id)]
    assert rows["line-b"].split()[-3:] == ["-", "running", "-"]

    shown = cli("--database-url", migrated_url, "jobs", "show", str(run_id))
    assert shown.exit_code == 0
    data = json.loads(shown.output)
    assert data["error"] == "database postgresql://qa:***@db/x refused"
    assert "hunter2" not in shown.output

    missing = cli("--database-url", migrated_url, "jobs", "show", "999")
    assert missing.exit_code == 1 and "no job run 999" in missing.output
    unknown = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-z")
    assert unknown.exit_code == 1
    assert unknown.output.strip() == f"Error: no job 'line-z': {tmp_path / 'line-z.yaml'} does not exist; jobs in {tmp_path}: broken, line-a, line-b, notepad"
    empty = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "history", "line-b")
    assert empty.output.strip() == "job line-b has no runs recorded"
    nowhere = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "history", "line-z")
    assert nowhere.exit_code == 1 and nowhere.output.strip() == unknown.output.strip()

"""Rendered schedules are valid for their scheduler: crontab syntax, `systemd-analyze verify` and its calendar, CronJob schema."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from croniter import croniter
from defectscan.jobs.render import (
    RenderOptions,
    cron_to_oncalendar,
    render_crontab,
    render_kubernetes,
    render_systemd,
)
from defectscan.jobs.spec import load_spec
from jobs_helpers import write_spec

SCHEDULES = ["*/15 * * * *", "0 2 * * 1-5", "30 6 1,15 * *", "0 0 1 * 0", "5-30/5 22-23 * jan-mar sun", "0 */6 * * 7", "45 23 31 12 *"]
BASE = dt.datetime(2026, 3, 27, 21, 7, tzinfo=dt.UTC)  # the Friday before Europe's DST change


@pytest.fixture
def specs(tmp_path):
    jobs = tmp_path / "jobs"
    write_spec(jobs, "line-a", schedule="*/15 * * * *", source={"glob": "incoming/*.zarr"}, model="demo")
    write_spec(jobs, "line-b", schedule="0 2 * * 1-5", timezone="Europe/Berlin", source={"lot": "L1"}, model="tinyunet:3",
               description="night shift, 50% of lots\nOwner: QA team")
    return [load_spec(p) for p in sorted(jobs.glob("*.yaml"))]


def test_crontab_lines_have_five_valid_fields_and_run_each_job(specs):
    text = render_crontab(specs, RenderOptions(defectscan="/opt/defectscan/bin/defectscan"))
    entries = [line for line in text.splitlines() if line and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)]
    assert len(entries) == 2
    for spec, entry in zip(specs, entries):
        fields = entry.split(None, 5)
        schedule = " ".join(fields[:5])
        assert schedule == spec.schedule and croniter.is_valid(schedule)
        assert "; set -a; . /etc/defectscan/defectscan.env; set +a; exec /opt/defectscan/bin/defectscan jobs --jobs-dir /etc/defectscan/jobs run " in fields[5]
        assert fields[5].startswith(f"exec >> /var/log/defectscan/{spec.name}.log 2>&1; ")
        assert fields[5].endswith(f"run {spec.name}")
    assert "CRON_TZ=Europe/Berlin" in text.splitlines()
    # The description's % is a comment; a % in a command line would be escaped.
    assert "# line-b: night shift, 50% of lots Owner: QA team" in text  # a description of two lines, one comment
    weird = render_crontab(specs[:1], RenderOptions(defectscan="/opt/100%/defectscan"))
    assert r"/opt/100\%/defectscan" in weird


def test_crontab_runs_under_sh(specs, tmp_path):
    # The command part of each line, with a stand-in defectscan, run by /bin/sh as cron would.
    fake = tmp_path / "defectscan"
    fake.write_text('#!/bin/sh\necho "args: $*" "db: $DEFECTSCAN_DATABASE_URL"\n')
    fake.chmod(0o755)
    env_file = tmp_path / "defectscan.env"
    env_file.write_text("DEFECTSCAN_DATABASE_URL=postgresql://qa@db/defectscan\n")
    text = render_crontab(specs[:1], RenderOptions(defectscan=str(fake), env_file=str(env_file), log_dir=str(tmp_path)))
    entry = [line for line in text.splitlines() if line.startswith("*/15")][0]
    subprocess.run(["/bin/sh", "-c", entry.split(None, 5)[5]], check=True, env={"PATH": "/usr/bin:/bin"})
    assert (tmp_path / "line-a.log").read_text() == "args: jobs --jobs-dir /etc/defectscan/jobs run line-a db: postgresql://qa@db/defectscan\n"
    # A missing environment file: its error is in the job's log (it went to cron's mail only), and nothing ran.
    env_file.unlink()
    failed = subprocess.run(["/bin/sh", "-c", entry.split(None, 5)[5]], env={"PATH": "/usr/bin:/bin"})
    assert failed.returncode != 0 and "defectscan.env" in (tmp_path / "line-a.log").read_text().splitlines()[-1]
    # No environment file (docker compose brings its own): nothing sourced.
    bare = render_crontab(specs[:1], RenderOptions(defectscan=str(fake), env_file="", log_dir=str(tmp_path)))
    command = [line for line in bare.splitlines() if line.startswith("*/15")][0].split(None, 5)[5]
    assert "set -a" not in command
    subprocess.run(["/bin/sh", "-c", command], check=True, env={"PATH": "/usr/bin:/bin"})
    assert (tmp_path / "line-a.log").read_text().splitlines()[-1] == "args: jobs --jobs-dir /etc/defectscan/jobs run line-a db: "


def _systemd_times(calendars: list[str], n: int) -> list[dt.datetime]:
    times = set()
    for calendar in calendars:
        out = subprocess.run(["systemd-analyze", "calendar", f"--iterations={n}", f"--base-time={BASE:%Y-%m-%d %H:%M:%S} UTC", calendar],
                             capture_output=True, text=True, check=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"}).stdout
        for stamp in re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", out):
            times.add(dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC))
    return sorted(times)[:n]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin"])
def test_systemd_calendars_fire_exactly_when_cron_does(timezone):
    for schedule in SCHEDULES:
        calendars = cron_to_oncalendar(schedule, timezone)
        cron = croniter(schedule, BASE.astimezone(ZoneInfo(timezone)))
        expected = [cron.get_next(dt.datetime).astimezone(dt.UTC) for _ in range(8)]
        assert _systemd_times(calendars, 8) == expected, (schedule, calendars)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_pass_systemd_analyze_verify(specs, tmp_path):
    executable = str(Path(sys.executable).parent / "defectscan")
    files = render_systemd(specs, RenderOptions(defectscan=executable))
    assert sorted(files) == ["defectscan-job-line-a.service", "defectscan-job-line-a.timer", "defectscan-job-line-b.service", "defectscan-job-line-b.timer"]
    units = tmp_path / "units"
    units.mkdir()
    for name, text in files.items():
        (units / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in units.iterdir())], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "defectscan-job-line-b" not in result.stderr, result.stderr
    assert "OnCalendar=Mon..Fri *-*-* 02:00:00 Europe/Berlin" in files["defectscan-job-line-b.timer"]
    assert f"ExecStart={executable} jobs --jobs-dir /etc/defectscan/jobs run line-b" in files["defectscan-job-line-b.service"]
    assert "SuccessExitStatus=75" in files["defectscan-job-line-b.service"]
    # ProtectSystem=strict: the client makes the score stores, under the data folder the workers write too
    assert "ReadWritePaths=/var/lib/defectscan /srv/defectscan" in files["defectscan-job-line-b.service"]


def test_kubernetes_cronjobs_are_valid_and_keep_secrets_in_secrets(specs, tmp_path):
    texts = {s.name: f"name: {s.name}\n" for s in specs}
    documents = list(yaml.safe_load_all(render_kubernetes(specs, texts, RenderOptions(image="registry.example/defectscan:1.2.3"))))
    config_map, *cronjobs = documents
    assert config_map["kind"] == "ConfigMap" and config_map["data"] == {"line-a.yaml": "name: line-a\n", "line-b.yaml": "name: line-b\n"}
    assert [c["metadata"]["name"] for c in cronjobs] == ["defectscan-line-a", "defectscan-line-b"]
    tricky = [specs[0].model_copy(update={"name": name}) for name in ("line-job-a", "line-a")]  # "line-job-a" was named "defectscan-line-a" too
    assert [d["metadata"]["name"] for d in list(yaml.safe_load_all(render_kubernetes(tricky, {}, RenderOptions())))[1:]] == [
        "defectscan-line-job-a", "defectscan-line-a"]
    for spec, cronjob in zip(specs, cronjobs):
        assert (cronjob["apiVersion"], cronjob["kind"]) == ("batch/v1", "CronJob")
        assert cronjob["spec"]["schedule"] == spec.schedule and cronjob["spec"]["timeZone"] == spec.timezone
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["enableServiceLinks"] is False  # else a Service defectscan-scheduler puts DEFECTSCAN_SCHEDULER_PORT in the env
        [no_retry] = [r for r in cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
        assert no_retry["onExitCodes"]["values"] == [3, 75]  # a retry of a partial run found nothing new and hid it
        [container] = pod["containers"]
        assert container["image"] == "registry.example/defectscan:1.2.3"
        assert "command" not in container  # the image's tini entrypoint stays PID 1
        assert container["args"] == ["defectscan", "jobs", "--jobs-dir", "/etc/defectscan/jobs", "run", spec.name]
        env = {e["name"]: e for e in container["env"]}
        assert env["DEFECTSCAN_DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "defectscan-database", "key": "url"}}
        assert env["DEFECTSCAN_CLUSTER__SCHEDULER"]["value"].startswith("tls://")
        assert {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}["dask-tls"] == "defectscan-dask-tls"
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate to check against the schemas")
    for document in documents:
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_render_command_writes_files_and_refuses_bad_specs(cli, specs, tmp_path):
    jobs = tmp_path / "jobs"
    out = tmp_path / "out"
    result = cli("jobs", "--jobs-dir", str(jobs), "render", "systemd", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["defectscan-job-line-a.service", "defectscan-job-line-a.timer",
                                                     "defectscan-job-line-b.service", "defectscan-job-line-b.timer"]
    printed = cli("jobs", "--jobs-dir", str(jobs), "render", "kubernetes")
    assert [d["kind"] for d in yaml.safe_load_all(printed.output)] == ["ConfigMap", "CronJob", "CronJob"]
    (jobs / "line-c.yaml").write_text("name: line-c\nschedule: '61 * * * *'\nsource: {lot: L}\nmodel: demo\n")
    refused = cli("jobs", "--jobs-dir", str(jobs), "render", "crontab")
    assert refused.exit_code == 1
    assert refused.output.startswith(f"Error: {jobs / 'line-c.yaml'} line 2: key 'schedule' has value '61 * * * *'")

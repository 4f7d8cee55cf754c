"""Schedules for existing schedulers, written from the job specs: crontab, systemd timers, Kubernetes CronJobs.

defectscan has no daemon of its own: the scheduler starts `defectscan jobs run NAME`, the
job's database lock keeps two triggers from overlapping, and the exit status says what
happened (docs/deploy.md). Secrets never appear here: each target reads the database URL and
the TLS files from the environment, an environment file, or a Kubernetes Secret.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from defectscan.jobs.spec import JobSpec

TARGETS = ("crontab", "systemd", "kubernetes")
_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


@dataclass(frozen=True)
class RenderOptions:
    # Paths as they are on the machine that runs the jobs.
    defectscan: str = "/usr/local/bin/defectscan"
    jobs_dir: str = "/etc/defectscan/jobs"
    env_file: str = "/etc/defectscan/defectscan.env"
    log_dir: str = "/var/log/defectscan"
    user: str = "defectscan"
    # Image sets and score maps (written by the job's client: the score store is made before workers fill it).
    data_dir: str = "/srv/defectscan"
    # Kubernetes
    namespace: str = "defectscan"
    image: str = "defectscan:0.1.0"
    scheduler: str = "tls://defectscan-scheduler:8786"
    database_secret: str = "defectscan-database"
    tls_secret: str = "defectscan-dask-tls"
    # Image sets and masks, shared with the workers (deploy/kubernetes/pvc.yaml).
    data_claim: str = "defectscan-data"


def unit_name(spec: JobSpec) -> str:
    return f"defectscan-job-{spec.name}"


def run_command(spec: JobSpec, options: RenderOptions) -> list[str]:
    # The executable may be a command line, e.g. "docker compose -f compose.yaml run --rm -T runner defectscan".
    return [*shlex.split(options.defectscan), "jobs", "--jobs-dir", options.jobs_dir, "run", spec.name]


# ---- crontab -----------------------------------------------------------------------------------------


def render_crontab(specs: list[JobSpec], options: RenderOptions) -> str:
    """A crontab (for `crontab -u defectscan FILE`): one line per job, its time zone set with CRON_TZ (cronie)."""
    lines = [
        "# defectscan jobs -- written by `defectscan jobs render crontab`; edit the specs, not this file.",
        ("# Needs: the environment file with DEFECTSCAN_DATABASE_URL and the DEFECTSCAN_CLUSTER__TLS__* files." if options.env_file
         else "# Needs: DEFECTSCAN_DATABASE_URL and the DEFECTSCAN_CLUSTER__TLS__* files from the executable's own environment."),
        "# Exit status 75 means the previous run of the job is still going (this trigger did nothing).",
        "SHELL=/bin/sh",
        "PATH=/usr/local/bin:/usr/bin:/bin",
    ]
    for spec in specs:
        command = " ".join(shlex.quote(part) for part in run_command(spec, options))
        log = shlex.quote(f"{options.log_dir}/{spec.name}.log")
        # The log first: a missing environment file's error went to cron's mail, the job log stayed empty. No
        # environment file (--env-file ''): the executable brings its own (docker compose's env_file).
        env = f"set -a; . {shlex.quote(options.env_file)}; set +a; " if options.env_file else ""
        # `%` ends a crontab command line: escape it wherever a path may hold one.
        line = f"exec >> {log} 2>&1; {env}exec {command}".replace("%", r"\%")
        # One comment line: a description's second line would be read as a crontab entry.
        about = " ".join((spec.description or "inspection job").split())
        lines += ["", f"# {spec.name}: {about}", f"CRON_TZ={spec.timezone}", f"{spec.schedule} {line}"]
    return "\n".join(lines) + "\n"


# ---- systemd -----------------------------------------------------------------------------------------


def _compress(values: list[int], name=lambda v: f"{v:02d}") -> str:
    """[1, 2, 3, 5] -> '01..03,05' (systemd calendar lists and ranges)."""
    values = sorted(set(values))
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            run = values[start:i]
            parts.append(name(run[0]) if len(run) == 1 else f"{name(run[0])}..{name(run[-1])}" if len(run) > 2 else ",".join(map(name, run)))
            start = i
    return ",".join(parts)


def cron_to_oncalendar(expression: str, timezone: str = "UTC") -> list[str]:
    """systemd OnCalendar= values that fire exactly when the cron expression does.

    Cron fires when the day of month OR the day of week matches if both are restricted;
    systemd requires both, so that case becomes two OnCalendar= lines.
    """
    from croniter import croniter

    minute, hour, dom, month, dow = croniter(expression).expanded

    def field(values, name=lambda v: f"{v:02d}") -> str:
        return "*" if values == ["*"] else _compress([int(v) for v in values], name)

    clock = f"{field(hour)}:{field(minute)}:00"
    month_text = field(month)
    # Cron's 7 is Sunday too.
    weekdays = "" if dow == ["*"] else _compress(sorted({int(d) % 7 for d in dow}), lambda v: _DAYS[v])
    if dom != ["*"] and dow != ["*"]:
        return [f"*-{month_text}-{field(dom)} {clock} {timezone}", f"{weekdays} *-{month_text}-* {clock} {timezone}"]
    prefix = f"{weekdays} " if weekdays else ""
    return [f"{prefix}*-{month_text}-{field(dom)} {clock} {timezone}"]


def render_systemd(specs: list[JobSpec], options: RenderOptions) -> dict[str, str]:
    """File name -> text: a oneshot .service and its .timer per job."""
    files: dict[str, str] = {}
    for spec in specs:
        name = unit_name(spec)
        command = " ".join(shlex.quote(part) for part in run_command(spec, options))
        files[f"{name}.service"] = f"""\
# Written by `defectscan jobs render systemd`; edit jobs/{spec.name}.yaml, not this file.
[Unit]
Description=defectscan inspection job {spec.name}
Documentation=file:///usr/share/doc/defectscan/deploy.md
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
User={options.user}
Group={options.user}
# DEFECTSCAN_DATABASE_URL and the DEFECTSCAN_CLUSTER__TLS__* paths: readable by root and {options.user} only.
EnvironmentFile={options.env_file}
ExecStart={command}
# 75: a run of this job was still going (another host holds its lock); not a failure.
SuccessExitStatus=75
# SIGTERM marks the run interrupted; the next run resumes where it stopped.
KillSignal=SIGTERM
TimeoutStopSec=120
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes
# The job's client creates each image set's score store, beside the set or under inspection.output_dir.
ReadWritePaths=/var/lib/defectscan {options.data_dir}
StateDirectory=defectscan
LogsDirectory=defectscan
"""
        calendars = "\n".join(f"OnCalendar={value}" for value in cron_to_oncalendar(spec.schedule, spec.timezone))
        files[f"{name}.timer"] = f"""\
# Written by `defectscan jobs render systemd` from the cron schedule '{spec.schedule}' ({spec.timezone}).
[Unit]
Description=Schedule of defectscan inspection job {spec.name}

[Timer]
{calendars}
# A trigger missed while the machine was off runs at the next boot.
Persistent=true
Unit={name}.service

[Install]
WantedBy=timers.target
"""
    return files


# ---- Kubernetes -----------------------------------------------------------------------------------------


def render_kubernetes(specs: list[JobSpec], spec_texts: dict[str, str], options: RenderOptions) -> str:
    """A ConfigMap with the specs and one CronJob per job, as one multi-document YAML."""
    documents: list[dict] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "defectscan-jobs", "namespace": options.namespace, "labels": _labels()},
            "data": {f"{name}.yaml": text for name, text in sorted(spec_texts.items())},
        }
    ]
    for spec in specs:
        documents.append(_cronjob(spec, options))
    return "---\n".join(yaml.safe_dump(doc, sort_keys=False, width=120) for doc in documents)


def _labels(job: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "defectscan", "app.kubernetes.io/component": "job-runner"}
    if job:
        labels["defectscan/job"] = job
    return labels


def _cronjob(spec: JobSpec, options: RenderOptions) -> dict:
    tls_dir = "/etc/defectscan/tls"
    env = [
        {"name": "DEFECTSCAN_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": options.database_secret, "key": "url"}}},
        {"name": "DEFECTSCAN_CLUSTER__SCHEDULER", "value": options.scheduler},
        {"name": "DEFECTSCAN_CLUSTER__TLS__CA_FILE", "value": f"{tls_dir}/ca.crt"},
        {"name": "DEFECTSCAN_CLUSTER__TLS__CERT_FILE", "value": f"{tls_dir}/tls.crt"},
        {"name": "DEFECTSCAN_CLUSTER__TLS__KEY_FILE", "value": f"{tls_dir}/tls.key"},
    ]
    container = {
        "name": "job",
        "image": options.image,
        # args, not command: the image's entrypoint (tini) stays PID 1 and forwards SIGTERM.
        "args": run_command(spec, RenderOptions(defectscan="defectscan", jobs_dir="/etc/defectscan/jobs")),
        "env": env,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "jobs", "mountPath": "/etc/defectscan/jobs", "readOnly": True},
            {"name": "dask-tls", "mountPath": tls_dir, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "data", "mountPath": "/data"},
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": f"defectscan-{spec.name}", "namespace": options.namespace, "labels": _labels(spec.name)},
        "spec": {
            "schedule": spec.schedule,
            "timeZone": spec.timezone,
            # The database lock is what keeps two runners apart; Forbid spares the pod that would only exit 75.
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 300,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 5,
            "jobTemplate": {
                "metadata": {"labels": _labels(spec.name)},
                "spec": {
                    "backoffLimit": 2,
                    "podFailurePolicy": {
                        "rules": [
                            # Already running elsewhere: another pod would only find the same lock. Partial (3): a
                            # second pod would find nothing new, succeed, and hide the images in error.
                            {"action": "FailJob", "onExitCodes": {"containerName": "job", "operator": "In", "values": [3, 75]}},
                            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                        ]
                    },
                    "template": {
                        "metadata": {"labels": _labels(spec.name)},
                        "spec": {
                            "restartPolicy": "Never",
                            # Service links put DEFECTSCAN_SCHEDULER_PORT and the like in the environment (config.py skips them too).
                            "enableServiceLinks": False,
                            "terminationGracePeriodSeconds": 120,
                            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                            "containers": [container],
                            "volumes": [
                                {"name": "jobs", "configMap": {"name": "defectscan-jobs"}},
                                {"name": "dask-tls", "secret": {"secretName": options.tls_secret, "defaultMode": 0o440}},
                                {"name": "tmp", "emptyDir": {}},
                                {"name": "data", "persistentVolumeClaim": {"claimName": options.data_claim}},
                            ],
                        },
                    },
                },
            },
        },
    }


def write_files(files: dict[str, str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written

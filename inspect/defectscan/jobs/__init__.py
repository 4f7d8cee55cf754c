"""Scheduled factory jobs: specs (jobs/*.yaml), discovery of new image sets, the run lock, the runner, schedules.

    spec.py      the validated job spec
    discover.py  stores matched by the source glob -> registered image sets with work left
    lock.py      one runner per job (job_locks), stale-lock takeover
    runner.py    lock -> discover -> inspect -> record, exit statuses
    history.py   last runs, history, one run (secrets masked)
    render.py    crontab lines, systemd units, Kubernetes CronJobs
"""

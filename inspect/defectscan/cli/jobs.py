"""`defectscan jobs`: scheduled factory jobs (lands with the jobs issue)."""

from defectscan.cli.app import not_yet_available

jobs = not_yet_available(
    "jobs",
    "List, run and schedule the factory inspection jobs in jobs/*.yaml.",
    "defectscan jobs run nightly-line-a",
)

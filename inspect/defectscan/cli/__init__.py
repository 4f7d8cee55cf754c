"""The `defectscan` command line: thin click commands over the library.

Commands are listed in data-path order: set up, data, model, inspection, jobs, results, reports.
"""

from defectscan.cli.app import main
from defectscan.cli.data import data
from defectscan.cli.db import db
from defectscan.cli.ingest import imagesets, ingest
from defectscan.cli.inspect import inspect
from defectscan.cli.jobs import jobs
from defectscan.cli.models import evaluate, models, train
from defectscan.cli.report import report
from defectscan.cli.results import defects, images, lots
from defectscan.cli.review import review

for _command in (db, data, ingest, imagesets, train, evaluate, models, inspect, jobs, defects, images, lots, review, report):
    main.add_command(_command)

__all__ = ["main"]

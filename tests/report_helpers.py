"""A results database for the report tests, written by the real pipeline on a real LocalCluster.

Five lots of one line, inspected by the single-class threshold model (pipeline_helpers): lot L3
fails far more often than the others (its p-chart point is out of control), lot L4 has an
unreadable image (an error row), the fifth lot's name carries markup, L1's images carry their
own capture times over three hours, and lot L6 is registered but never inspected.
Built once per backend per test session (the `report_db` fixtures of conftest.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path


from pipeline_helpers import (
    add_model,
    corrupt_chunk,
    register,
    save_threshold_model,
    square_images,
    write_stack,
)
from queries_helpers import add_keys_and_times

UTC = dt.UTC
SCRIPT_LOT = "L5<script>alert(1)</script>"
N_IMAGES = 12
SIZE = 32
# lot -> {position: (y, x, side)} of bright squares (each one defect, area side*side)
LOTS = {
    "L1": {2: (4, 4, 5)},
    "L2": {},
    "L3": {0: (2, 2, 8), 1: (10, 10, 6), 3: (20, 4, 5), 5: (4, 20, 7), 6: (16, 16, 9), 8: (2, 24, 5), 10: (24, 24, 6)},
    "L4": {4: (8, 8, 6)},
    SCRIPT_LOT: {1: (12, 3, 5), 7: (3, 12, 6)},
}
ERROR_LOT, ERROR_POSITION = "L4", 9
NOT_INSPECTED_LOT = "L6"
L1_START = dt.datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
# L1 images over three hours: four per hour
L1_TIMES = [L1_START + dt.timedelta(minutes=15 * i) for i in range(N_IMAGES)]


@dataclass
class ReportDB:
    url: str
    root: Path
    stores: dict[str, Path]
    job_run_id: int
    model_ref: str = "threshold:1"


def populate(url: str, root: Path) -> ReportDB:
    """Write the lots, inspect them on a LocalCluster started (and closed) for this, return where they are."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local, Client(local) as client:
        return _populate(url, root, client)


def _populate(url: str, root: Path, client) -> ReportDB:
    from defectscan.config import load_settings
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, session_factory
    from defectscan.pipeline.run import inspect_image_sets

    engine = make_engine(url)
    upgrade(engine)
    factory = session_factory(engine)
    stores = {}
    for day, (lot, defects) in enumerate(LOTS.items()):
        name = f"lot{day}.zarr"
        stores[lot] = write_stack(root / name, square_images(N_IMAGES, size=SIZE, defects=defects, seed=day), lot=lot, line="A",
                                  acquired_at=f"2026-03-0{day + 2}T09:00:00Z")
    add_keys_and_times(stores["L1"], [f"L1-{i:03d}" for i in range(N_IMAGES)], L1_TIMES)
    corrupt_chunk(stores[ERROR_LOT], ERROR_POSITION)
    image_sets = [register(factory, path) for path in stores.values()]
    register(factory, write_stack(root / "lot6.zarr", square_images(N_IMAGES, size=SIZE, seed=6), lot=NOT_INSPECTED_LOT, line="A",
                                  acquired_at="2026-03-08T09:00:00Z"))
    model = add_model(factory, save_threshold_model(root / "threshold.keras"))
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "12",
                                      "DEFECTSCAN_INSPECTION__TILE_SIZE": "128", "DEFECTSCAN_INSPECTION__HALO": "16"}).inspection
    summary = inspect_image_sets(factory, client, model, image_sets, settings, max_in_flight=2, job="qa-report-test")
    assert summary.status == "partial" and summary.counts.errors == 1, summary
    engine.dispose()
    return ReportDB(url, root, stores, summary.job_run_id)


def session_for(url: str):
    """A session factory on `url` and a function that closes its engine."""
    from defectscan.db.session import make_engine, session_factory

    engine = make_engine(url)
    return session_factory(engine), engine.dispose

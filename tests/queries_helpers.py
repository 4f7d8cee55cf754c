"""A results database written by the real pipeline, shared by the query, CLI and overlay tests.

Three image sets in two lots and three lines, inspected by a two-class model whose output is
known (bright squares are class "bright", dark squares class "dark"), on a real LocalCluster;
and lot L044, registered but not inspected.
Built once per backend for the whole session (the `results_db` fixture of conftest.py); tests only read it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline_helpers import add_model, register, textured, write_stack, write_strip

UTC = dt.timezone.utc
CLASSES = ("bright", "dark")
BRIGHT, DARK = 250, 5

# position -> list of (class, y, x, height, width)
L042_DEFECTS = {1: [("bright", 10, 10, 6, 6)], 3: [("dark", 30, 40, 8, 8), ("bright", 5, 50, 5, 5)], 4: [("bright", 50, 20, 3, 10)]}
L043_DEFECTS = {2: [("dark", 20, 20, 7, 7)]}
STRIP_DEFECT = ("bright", 100, 60, 10, 90)
# L042's images carry their own capture times, one minute apart from this.
L042_START = dt.datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@dataclass
class ResultsDB:
    url: str
    stores: dict[str, Path]
    model_ref: str = "twoclass:1"
    expected: dict[str, dict[int, list]] = field(default_factory=dict)


def save_two_class_model(path: Path) -> Path:
    """A real Keras model: channel 0 ~1 above pixel ~230 ("bright"), channel 1 ~1 below pixel ~25 ("dark")."""
    import keras

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(2, 1, activation="sigmoid", name="threshold")
    model = keras.Model(inputs, conv(inputs))
    # x = pixel / 127.5 - 1; bright: 40x - 32 > 0 above 229.5; dark: -40x - 32 > 0 below 25.5
    conv.set_weights([np.array([[[[40.0, -40.0]]]], np.float32), np.array([-32.0, -32.0], np.float32)])
    model.save(path)
    return path


def _images(n: int, size: tuple[int, int], defects: dict[int, list], seed: int) -> np.ndarray:
    images = np.clip(textured((n, *size), seed=seed), 60, 200).astype(np.uint8)
    for position, marks in defects.items():
        for cls, y, x, h, w in marks:
            images[position, y : y + h, x : x + w] = BRIGHT if cls == "bright" else DARK
    return images


def add_keys_and_times(path: Path, keys: list[str], times: list[dt.datetime]) -> None:
    """Per-image serial numbers and capture times, as the image-set layout stores them."""
    import zarr

    from defectscan.data.imageset import KEYS, TIMES, to_micros

    group = zarr.open_group(path, mode="a")
    group.create_array(KEYS, shape=(len(keys),), dtype=str, fill_value=None)[:] = np.array(keys, dtype=object)
    group.create_array(TIMES, data=np.array([to_micros(t) for t in times], dtype=np.int64))


def populate(url: str, root: Path) -> ResultsDB:
    from distributed import Client, LocalCluster

    from defectscan.config import load_settings
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, session_factory
    from defectscan.pipeline.run import inspect_image_sets

    engine = make_engine(url)
    upgrade(engine)
    factory = session_factory(engine)
    stores = {
        "L042": write_stack(root / "L042.zarr", _images(6, (64, 64), L042_DEFECTS, 1), lot="L042", line="A", product="P1",
                            camera="C1", acquired_at="2026-03-01T08:00:00Z"),
        "L043": write_stack(root / "L043.zarr", _images(4, (64, 64), L043_DEFECTS, 2), lot="L043", line="B", product="P1",
                            camera="C2", acquired_at="2026-03-05T08:00:00Z"),
    }
    add_keys_and_times(stores["L042"], [f"L042-{i:03d}" for i in range(6)], [L042_START + dt.timedelta(minutes=i) for i in range(6)])
    strip = _images(1, (160, 200), {0: [STRIP_DEFECT]}, 3)[0]
    stores["S7"] = write_strip(root / "S7.zarr", strip, chunk=64, lot="L043", line="C", product="P2", camera="C3",
                               acquired_at="2026-03-06T12:30:00Z")
    image_sets = [register(factory, path) for path in stores.values()]
    model = add_model(factory, save_two_class_model(root / "twoclass.keras"), name="twoclass", version="1", classes=CLASSES)
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4",
                                      "DEFECTSCAN_INSPECTION__TILE_SIZE": "128", "DEFECTSCAN_INSPECTION__HALO": "16"}).inspection
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local, Client(local) as client:
        summary = inspect_image_sets(factory, client, model, image_sets, settings, max_in_flight=2, job="qa-test")
    assert summary.status == "succeeded", summary
    # registered after the run: a lot whose images nobody has inspected yet
    stores["L044"] = write_stack(root / "L044.zarr", _images(2, (64, 64), {}, 4), lot="L044", line="A", product="P1", camera="C1",
                                 acquired_at="2026-03-07T08:00:00Z")
    register(factory, stores["L044"])
    engine.dispose()
    return ResultsDB(url, stores, expected={"L042": L042_DEFECTS, "L043": L043_DEFECTS})

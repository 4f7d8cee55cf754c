"""`make demo`: the main job on the embedded default (SQLite, a local Dask cluster, the demo model).

What a plant does every night, on synthetic data: camera images arrive as files, are ingested
into Zarr image sets (three lots from two lines, and one large mosaic image), inspected with the
registered model on a local Dask cluster, recorded in the database, and then queried. Every step
is idempotent: a second run finds the files, stores and results in place and has nothing to do.

    python -m defectscan.demo [--folder var/demo] [--images-per-lot 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectscan.config import Settings, load_settings

# (lot, line, product, camera, capture time): three lots from two lines.
LOTS = (
    ("L-2026-1101", "line-1", "bracket-A", "cam-top", "2026-11-01T06:00:00Z"),
    ("L-2026-1102", "line-1", "bracket-A", "cam-top", "2026-11-02T06:00:00Z"),
    ("L-2026-1102B", "line-2", "panel-B", "cam-side", "2026-11-02T14:00:00Z"),
)
MOSAIC = ("L-2026-1103", "line-2", "panel-B", "cam-scan", "2026-11-03T06:00:00Z")
DEFECTIVE_FRACTION = 0.25


@dataclass
class DemoResult:
    image_set_ids: list[int] = field(default_factory=list)
    inspected: int = 0
    skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def write_lot_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """`n` synthetic camera images (PNG) of one lot, a quarter of them with a defect; existing files are kept."""
    from PIL import Image

    from defectscan.data.synth import make_sample

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"SN{seed:02d}{i:05d}.png"
        # Draw every image's randomness even when the file exists, so a partial folder completes identically.
        class_index, defective = int(rng.integers(0, 4)), bool(rng.random() < DEFECTIVE_FRACTION)
        sample_seed = int(rng.integers(0, 2**31))
        if not path.exists():
            image, _ = make_sample(np.random.default_rng(sample_seed), size, class_index, defective)
            Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def write_mosaic(path: Path, size: int, seed: int) -> Path:
    """One large image (as from a line-scan camera), with defects."""
    from PIL import Image

    from defectscan.data.synth import make_sample

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        image, _ = make_sample(np.random.default_rng(seed), size, 1, True)
        Image.fromarray(image).save(path)
    return path


def prepare_image_sets(factory, folder: Path, images_per_lot: int, image_size: int, mosaic_size: int, echo: Callable[[str], None]) -> list[int]:
    """Files -> registered image sets (ingest is idempotent: the same files give the same store)."""
    from defectscan.data.imageset import parse_time
    from defectscan.data.ingest import IngestOptions, ingest

    ids = []
    jobs = [(lot, write_lot_images(folder / "incoming" / lot, images_per_lot, image_size, seed), "stack", rest)
            for seed, (lot, *rest) in enumerate(LOTS)]
    lot, *rest = MOSAIC
    jobs.append((lot, [write_mosaic(folder / "incoming" / lot / "scan-0001.png", mosaic_size, 99)], "strip", rest))
    for lot, paths, kind, (line, product, camera, when) in jobs:
        options = IngestOptions(lot=lot, line=line, product=product, camera=camera, acquired_at=parse_time(when), kind=kind)
        with factory() as session:
            result, registration = ingest(session, paths, folder / "imagesets" / f"{lot}.zarr", options)
        state = "already ingested" if result.reused else f"ingested in {result.seconds:.1f} s"
        echo(f"  {lot} ({line}, {kind}): {result.n_images} images, {state} -> image set {registration.image_set.id}")
        ids.append(registration.image_set.id)
    return ids


def run_demo(settings: Settings, folder: Path, *, images_per_lot: int = 64, image_size: int = 512, mosaic_size: int = 2048,
             workers: int | None = None, progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import display_url, make_engine, session_factory
    from defectscan.pipeline.cli_run import DEMO, run_inspect

    result = DemoResult()
    engine = make_engine(settings.resolved_database_url)
    try:
        _, state = upgrade(engine)
        echo(f"database: {display_url(engine.url)} (schema {state.current})")
        factory = session_factory(engine)

        began = time.perf_counter()
        echo(f"image sets under {folder}:")
        result.image_set_ids = prepare_image_sets(factory, folder, images_per_lot, image_size, mosaic_size, echo)
        result.seconds["ingest"] = time.perf_counter() - began

        began = time.perf_counter()
        echo(f"inspecting with the demo model on a local Dask cluster ({len(result.image_set_ids)} image sets):")
        summary = run_inspect(factory, settings, DEMO, [str(i) for i in result.image_set_ids], n_workers=workers, progress=progress, echo=echo)
        result.seconds["inspect"] = time.perf_counter() - began
        result.inspected, result.skipped = summary.counts.inspected, summary.n_skipped
        echo(
            f"job run {summary.job_run_id}: {summary.status}; {summary.counts.inspected} images inspected "
            f"({summary.counts.failed} failed, {summary.counts.defects} defects), {summary.n_skipped} already done"
        )
    finally:
        engine.dispose()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defectscan.demo", description="Run the defectscan demo on the embedded default.")
    parser.add_argument("--folder", type=Path, default=Path("var/demo"), help="where the demo's files and image sets go")
    parser.add_argument("--images-per-lot", type=int, default=64)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    result = run_demo(load_settings(), args.folder.resolve(), images_per_lot=args.images_per_lot, progress=sys.stderr.isatty())
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    print(f"demo done in {time.perf_counter() - began:.0f} s ({timings})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the main job on the embedded default (SQLite, a local Dask cluster, the demo model).

What a plant does every night, on synthetic data: camera images arrive as files, are ingested
into Zarr image sets (three lots from two lines, and one large mosaic image), inspected with the
registered model on a local Dask cluster, recorded in the database, and then queried. Every step
is idempotent: a second run finds the files, stores and results in place and has nothing to do.

    python -m defectscan.demo [--folder var/demo] [--job jobs/demo.yaml] [--images-per-lot 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectscan.config import load_settings
from defectscan.native_logs import quiet_tensorflow_startup

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
    status: str = "not run"
    job_run_id: int | None = None
    inspected: int = 0
    skipped: int = 0
    reports: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # Where the results went (password masked): the demo's own database unless one was set.
    database: str = ""


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


def write_image_sets(folder: Path, images_per_lot: int, image_size: int, mosaic_size: int, echo: Callable[[str], None]) -> list[Path]:
    """Camera files -> Zarr image sets under folder/imagesets, where the demo job discovers them.

    Ingest is idempotent: the same files give the same store, written once.
    """
    from defectscan.data.imageset import parse_time
    from defectscan.data.ingest import IngestOptions, ingest_files

    batches = [(lot, write_lot_images(folder / "incoming" / lot, images_per_lot, image_size, seed), "stack", rest)
               for seed, (lot, *rest) in enumerate(LOTS)]
    lot, *rest = MOSAIC
    batches.append((lot, [write_mosaic(folder / "incoming" / lot / "scan-0001.png", mosaic_size, 99)], "strip", rest))
    stores = []
    for lot, paths, kind, (line, product, camera, when) in batches:
        options = IngestOptions(lot=lot, line=line, product=product, camera=camera, acquired_at=parse_time(when), kind=kind)
        result = ingest_files(paths, folder / "imagesets" / f"{lot}.zarr", options)
        state = "already there" if result.reused else f"ingested in {result.seconds:.1f} s"
        echo(f"  {lot} ({line}, {kind}): {result.n_images} image{'s' if result.n_images != 1 else ''}, {state}")
        stores.append(Path(result.uri))
    return stores


def run_demo(folder: Path, job_file: Path, *, images_per_lot: int = 64, image_size: int = 512, mosaic_size: int = 2048,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Write the image sets, then run the demo's scheduled job on them as cron would (`defectscan jobs run demo`).

    Settings are what `defectscan jobs run` would use: configs/defaults.yaml, DEFECTSCAN_* and the job's own,
    except the database: unless one is set explicitly, the demo's own `folder/defectscan.sqlite`.
    """
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import display_url, make_engine
    from defectscan.jobs.runner import run_job
    from defectscan.jobs.spec import load_spec

    result = DemoResult()
    spec = demo_spec(load_spec(job_file), folder)
    settings = demo_settings(spec, job_file, folder)
    engine = make_engine(settings.resolved_database_url)
    try:
        _, state = upgrade(engine)
        result.database = display_url(engine.url)
        echo(f"database: {result.database} (schema {state.current})")

        began = time.perf_counter()
        echo(f"image sets under {folder / 'imagesets'}:")
        write_image_sets(folder, images_per_lot, image_size, mosaic_size, echo)
        result.seconds["ingest"] = time.perf_counter() - began

        began = time.perf_counter()
        echo(f"job {spec.name} ({job_file}): discover, register, inspect with the demo model on a local Dask cluster")
        outcome = run_job(engine, spec, job_file, settings, echo=lambda line: echo(f"  {line}"))
        result.seconds["job"] = time.perf_counter() - began
        result.status, result.job_run_id = outcome.status, outcome.job_run_id
        result.inspected, result.skipped = outcome.n_inspected, outcome.n_skipped
        echo(
            f"job run {outcome.job_run_id}: {outcome.status}; {outcome.n_inspected} images inspected, "
            f"{outcome.n_defects} defects, {outcome.n_skipped} already done"
        )
        for error in outcome.errors[:5]:
            echo(f"  error: {error}")

        show_results(settings.resolved_database_url, echo)
        began = time.perf_counter()
        echo("QA reports:")
        result.reports = write_reports(engine, spec, folder / "reports", settings.qa.hold_above, echo)
        result.seconds["reports"] = time.perf_counter() - began
    finally:
        engine.dispose()
    return result


def demo_spec(spec, folder: Path):
    """The job reads the image sets this demo writes, whatever folder it was given (the shipped job's glob
    names var/demo: with another --folder it would inspect a previous demo's stores instead)."""
    source = spec.source.model_copy(update={"glob": str(folder.resolve() / "imagesets" / "*.zarr")})
    return spec.model_copy(update={"source": source})


def demo_settings(spec, job_file: Path, folder: Path):
    """The job's settings, with the demo's own database under `folder` unless one is set explicitly.

    The user's default database (`data_dir`) holds their real results: a demo never creates or touches it.
    """
    settings = spec.apply_to(load_settings(overrides=spec.setting_overrides(str(job_file))))
    if settings.database_url is None:
        settings = settings.model_copy(update={"database_url": f"sqlite:///{folder / 'defectscan.sqlite'}"})
    return settings


def show_results(database_url: str, echo: Callable[[str], None]) -> None:
    """What a QA engineer looks at first: the lots, then a few defects (the CLI's own commands)."""
    from click.testing import CliRunner

    from defectscan.cli import main

    for args in (["lots", "list", "--format", "table"], ["defects", "list", "--sort", "score", "--limit", "5", "--format", "table"]):
        echo(f"$ defectscan {' '.join(args)}")
        output = CliRunner().invoke(main, ["--database-url", database_url, *args], catch_exceptions=False).output
        echo(output.rstrip())


def write_reports(engine, spec, folder: Path, hold_above: float, echo: Callable[[str], None]) -> list[Path]:
    """One QA report per line (HTML, and PDF when Chromium is there), of the version the job runs."""
    from defectscan.db.session import session_factory
    from defectscan.errors import DefectscanError
    from defectscan.model.registry import model_to_run
    from defectscan.report.build import HoldRules, ReportOptions, Scope, write_report
    from defectscan.report.pdf import find_chromium

    try:
        find_chromium()
        pdf = True
    except DefectscanError as exc:
        echo(f"  no PDF: {exc}")
        pdf = False
    folder.mkdir(parents=True, exist_ok=True)
    # The version the job runs (the shipped one, or a promoted fine-tuned one): a database kept from an
    # older defectscan also holds the results of the demo model it shipped, and a report covers one version.
    with session_factory(engine)() as session:
        demo = model_to_run(session, spec.model.reference)
        model = f"{demo.name}:{demo.version}"
    written = []
    for line in sorted({line for _, line, *_ in (*LOTS, MOSAIC)}):
        html = folder / f"{line}.html"
        with session_factory(engine)() as session:
            summary = write_report(session, Scope(line=line, model=model), html, pdf_path=html.with_suffix(".pdf") if pdf else None,
                                   options=ReportOptions(rules=HoldRules(hold_above=hold_above)))
        written += [Path(summary["html"])] + ([Path(summary["pdf"])] if "pdf" in summary else [])
        echo(f"  QA report {line}: {summary['html']}" + (f" and {summary['pdf']}" if "pdf" in summary else ""))
    return written


def main(argv: list[str] | None = None) -> int:
    from defectscan.paths import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m defectscan.demo", description="Run the defectscan demo on the embedded default.")
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / "var" / "demo", help="where the demo's files and image sets go")
    parser.add_argument("--job", type=Path, default=REPO_ROOT / "jobs" / "demo.yaml", help="the scheduled job to run (on the image sets under --folder)")
    parser.add_argument("--images-per-lot", type=int, default=64)
    args = parser.parse_args(argv)
    quiet_tensorflow_startup()
    began = time.perf_counter()
    result = run_demo(args.folder.resolve(), args.job.resolve(), images_per_lot=args.images_per_lot)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    print(f"demo done in {time.perf_counter() - began:.0f} s ({timings})")
    if result.reports:
        print(f"open the QA report: {result.reports[0]}")
    if result.database:
        # The defectscan commands read the user's default database, not the demo's: say how to query this one.
        print(f"query these results: export DEFECTSCAN_DATABASE_URL={result.database}")
    return 0 if result.status in ("succeeded",) else 1


if __name__ == "__main__":
    sys.exit(main())

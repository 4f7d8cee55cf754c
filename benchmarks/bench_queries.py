"""Query latency at production size: 10M defects across 1M images in PostgreSQL.

    python benchmarks/bench_queries.py [--images 1000000] [--defects 10000000] [--reviewed 0.1] [--repeats 40] [--keep]

Creates the database `defectscan_bench` on the server at DEFECTSCAN_TEST_POSTGRES_URL (or --url),
applies the schema with the migrations, bulk-loads it with COPY (and fills the per-day rollup
`inspection_daily` from it, as the pipeline keeps it), then times the common QA
queries as the CLI runs them (db/queries.py, QA figures from db/reviews.py) and prints p50/p95
with the EXPLAIN ANALYZE plans of the statements they issue; then adds QA decisions on --reviewed
of the images (review tables) and times them again, printing the ratio measured in the one run. The database is dropped at the end unless --keep
(--reuse times an existing one without loading). Writes benchmarks/results/bench_queries.json.

Data shape: lots of 10 image sets x 100 images, spread evenly over one year, 4 lines,
3 products, 8 cameras; 30% of images fail and carry all the defects (5 classes, skewed), 0.1%
are errors. Rows are written in capture order, as the pipeline writes them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DB_NAME = "defectscan_bench"
CLASSES = ("scratch", "stain", "crack", "dent", "pit")
CLASS_P = (0.45, 0.25, 0.15, 0.1, 0.05)
IMAGES_PER_SET, SETS_PER_LOT = 100, 10
START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SPAN = dt.timedelta(days=365)
CHUNK = 500_000


def _server_url(url: str | None):
    from sqlalchemy.engine import make_url

    url = url or os.environ.get("DEFECTSCAN_TEST_POSTGRES_URL")
    if not url:
        # `make bench` runs every benchmark: without a server this one says so and steps aside.
        print("bench_queries: skipped, no PostgreSQL (give --url or set DEFECTSCAN_TEST_POSTGRES_URL)")
        sys.exit(0)
    return make_url(url).set(drivername="postgresql+psycopg")


def _admin(server, sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(sql))
    engine.dispose()


# --- bulk load ------------------------------------------------------------------------------------------------


def _iso(seconds: np.ndarray) -> list[str]:
    stamps = np.datetime64(START.replace(tzinfo=None), "s") + seconds.astype("timedelta64[s]")
    return np.datetime_as_string(stamps, unit="s", timezone="UTC").tolist()


def _copy(cursor, table: str, columns: list[str], rows_text: str) -> None:
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        copy.write(rows_text)


def _lines(*columns: list[str]) -> str:
    return "".join("\t".join(row) + "\n" for row in zip(*columns, strict=True))


def _strs(values: np.ndarray) -> list[str]:
    return values.astype(str).tolist()


def load(engine, n_images: int, n_defects: int, seed: int = 0) -> dict[str, float]:
    from defectscan.db.schema import Defect, Image, Inspection

    rng = np.random.default_rng(seed)
    n_sets = n_images // IMAGES_PER_SET
    n_lots = max(1, n_sets // SETS_PER_LOT)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # one production model, one job run per lot
        cursor.execute(
            "INSERT INTO models (id, name, version, uri, sha256, architecture, input_spec, classes, threshold, stage, registered_at) "
            "VALUES (1, 'tinyunet-dagm', '3', '/models/tinyunet-dagm-3.keras', repeat('0', 64), 'tinyunet', '{}'::jsonb, %s::jsonb, 0.5, "
            "'production', now())",
            (json.dumps(list(CLASSES)),),
        )
        lot_seconds = np.arange(n_lots) * (SPAN.total_seconds() / n_lots)
        set_lot = np.arange(n_sets) // SETS_PER_LOT
        # image sets of a lot follow each other, 10 minutes apart
        set_seconds = lot_seconds[set_lot] + (np.arange(n_sets) % SETS_PER_LOT) * 600
        set_iso = _iso(set_seconds)
        _copy(cursor, "job_runs", ["id", "job", "model_id", "status", "started_at", "finished_at", "n_images", "n_inspected",
                                   "n_skipped", "n_errors", "n_defects"], _lines(
            _strs(np.arange(1, n_lots + 1)), ["nightly-line"] * n_lots, ["1"] * n_lots, ["succeeded"] * n_lots,
            _iso(lot_seconds + 7200), _iso(lot_seconds + 9000), [str(SETS_PER_LOT * IMAGES_PER_SET)] * n_lots,
            [str(SETS_PER_LOT * IMAGES_PER_SET)] * n_lots, ["0"] * n_lots, ["0"] * n_lots, ["0"] * n_lots,
        ))
        lines, products, cameras = np.array(list("ABCD")), np.array(["P1", "P2", "P3"]), np.array([f"C{i}" for i in range(1, 9)])
        set_line = lines[set_lot % 4]
        _copy(cursor, "image_sets", ["id", "uri", "array_path", "kind", "lot", "line", "product", "camera", "acquired_at", "shape",
                                     "dtype", "chunks", "n_images", "checksum", "registered_at"], _lines(
            _strs(np.arange(1, n_sets + 1)), [f"/data/L{lot:06d}-{i}.zarr" for i, lot in enumerate(set_lot)], ["images"] * n_sets,
            ["stack"] * n_sets, [f"L{lot:06d}" for lot in set_lot], set_line.tolist(), products[set_lot % 3].tolist(),
            cameras[np.arange(n_sets) % 8].tolist(), set_iso, [f"[{IMAGES_PER_SET}, 512, 512]"] * n_sets, ["uint8"] * n_sets,
            ["[1, 512, 512]"] * n_sets, [str(IMAGES_PER_SET)] * n_sets, ["0" * 64] * n_sets, set_iso,
        ))
        raw.commit()

        # which images fail, and how many defects each failed image has (at least one)
        verdict = np.where(rng.random(n_images) < 0.3, 1, 0)
        verdict[rng.random(n_images) < 0.001] = 2
        failed = np.flatnonzero(verdict == 1)
        counts = np.ones(failed.size, dtype=np.int64)
        counts += np.bincount(rng.integers(0, failed.size, n_defects - failed.size), minlength=failed.size)
        n_per_image = np.zeros(n_images, dtype=np.int64)
        n_per_image[failed] = counts
        first_defect = np.concatenate(([0], np.cumsum(n_per_image)))
        timings["prepare_s"] = round(time.perf_counter() - t0, 1)

        t = time.perf_counter()
        with raw.cursor() as cursor:
            # indexes and foreign keys are built once after the load: far faster than row by row
            _drop_constraints_raw(cursor, [Image.__table__, Inspection.__table__, Defect.__table__])
            raw.commit()
        verdicts = np.array(["pass", "fail", "error"])
        for start in range(0, n_images, CHUNK):
            stop = min(n_images, start + CHUNK)
            ids = np.arange(start + 1, stop + 1)
            image_set = np.arange(start, stop) // IMAGES_PER_SET
            position = np.arange(start, stop) % IMAGES_PER_SET
            seconds = set_seconds[image_set] + position
            when = _iso(seconds)
            v = verdict[start:stop]
            n = n_per_image[start:stop]
            max_score = np.where(v == 1, 0.5 + rng.random(stop - start) * 0.5, rng.random(stop - start) * 0.45)
            with raw.cursor() as cursor:
                _copy(cursor, "images", ["id", "image_set_id", "position", "key", "acquired_at", "height", "width"], _lines(
                    _strs(ids), _strs(image_set + 1), _strs(position), [f"SN{i:09d}" for i in ids], when,
                    ["512"] * ids.size, ["512"] * ids.size,
                ))
                _copy(cursor, "inspections", ["id", "image_id", "model_id", "job_run_id", "verdict", "n_defects", "defect_pixels",
                                              "max_score", "mask_uri", "mask_array", "inspected_at", "duration_ms"], _lines(
                    _strs(ids), _strs(ids), ["1"] * ids.size, _strs(set_lot[image_set] + 1), verdicts[v].tolist(), _strs(n),
                    _strs(n * 40), _strs(max_score.round(4)), [f"/data/L{lot:06d}.masks.zarr" for lot in set_lot[image_set]],
                    ["tinyunet-dagm/3"] * ids.size, _iso(seconds + 7200), ["12.5"] * ids.size,
                ))
                d0, d1 = first_defect[start], first_defect[stop]
                _copy_defects(cursor, rng, d0, d1, np.repeat(ids, n))
            raw.commit()
            print(f"  loaded images {stop:,}/{n_images:,}, defects {d1:,}", file=sys.stderr, flush=True)
        timings["copy_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        with raw.cursor() as cursor:
            fill_rollup(cursor)
        raw.commit()
        timings["rollup_s"] = round(time.perf_counter() - t, 1)
        return timings
    finally:
        raw.close()


def fill_rollup(cursor) -> None:
    """inspection_daily as the pipeline would have kept it (schema.InspectionDaily), in one pass after COPY."""
    cursor.execute(
        "INSERT INTO inspection_daily (image_set_id, model_id, day, images, failed, errors, defects, first_at, last_at) "
        "SELECT i.image_set_id, n.model_id, coalesce((i.acquired_at AT TIME ZONE 'UTC')::date, DATE '0001-01-01'), count(*), "
        "count(*) FILTER (WHERE n.verdict = 'fail'), count(*) FILTER (WHERE n.verdict = 'error'), sum(n.n_defects), "
        "min(i.acquired_at), max(i.acquired_at) "
        "FROM inspections n JOIN images i ON i.id = n.image_id GROUP BY 1, 2, 3"
    )


def fill_reviews(engine, fraction: float, seed: int = 2) -> float:
    """QA decisions on `fraction` of the images, as a plant reviewing them would leave: an image decision on each
    (failed images: 20 % passed by QA; passed ones: 3 % failed), a decision on every defect of the failed ones
    (15 % false calls), and 5 % of all decisions superseded by a newer one; then the rollup review_daily.
    Returns seconds."""
    t = time.perf_counter()
    with engine.begin() as connection:
        run = connection.exec_driver_sql
        run(f"SELECT setseed({seed / 10})")
        run(f"CREATE TEMP TABLE reviewed AS SELECT image_id, id AS inspection_id, verdict, inspected_at FROM inspections "
            f"WHERE verdict <> 'error' AND random() < {fraction}")
        run("INSERT INTO image_reviews (image_id, inspection_id, decision, reviewer, reviewed_at) "
            "SELECT image_id, inspection_id, CASE WHEN verdict = 'fail' THEN (CASE WHEN random() < 0.2 THEN 'pass' ELSE 'fail' END) "
            "ELSE (CASE WHEN random() < 0.03 THEN 'fail' ELSE 'pass' END) END, 'qa' || (1 + floor(random() * 6))::int, "
            "inspected_at + interval '1 day' FROM reviewed ORDER BY inspected_at")
        run("INSERT INTO defect_reviews (defect_id, image_id, decision, reviewer, reviewed_at) "
            "SELECT d.id, r.image_id, CASE WHEN random() < 0.15 THEN 'false-call' ELSE 'confirmed' END, 'qa' || (1 + floor(random() * 6))::int, "
            "r.inspected_at + interval '1 day' FROM reviewed r JOIN defects d ON d.inspection_id = r.inspection_id "
            "WHERE r.verdict = 'fail' ORDER BY r.inspected_at, d.id")
        run("INSERT INTO image_reviews (image_id, inspection_id, decision, reviewer, reviewed_at, note) "
            "SELECT image_id, inspection_id, CASE decision WHEN 'pass' THEN 'fail' ELSE 'pass' END, 'lead', reviewed_at + interval '2 days', "
            "'second look' FROM image_reviews WHERE random() < 0.05 ORDER BY id")
        run("INSERT INTO defect_reviews (defect_id, image_id, decision, reviewer, reviewed_at, note) "
            "SELECT defect_id, image_id, CASE decision WHEN 'confirmed' THEN 'false-call' ELSE 'confirmed' END, 'lead', "
            "reviewed_at + interval '2 days', 'second look' FROM defect_reviews WHERE random() < 0.05 ORDER BY id")
    # review_daily as review/record.py keeps it, counted from the decisions by the same code
    from sqlalchemy import text

    from defectscan.db.reviews import refresh_review_daily_of_sets
    from defectscan.db.session import session_factory

    with session_factory(engine)() as session:
        sets = list(session.scalars(text("SELECT DISTINCT i.image_set_id FROM images i JOIN image_reviews r ON r.image_id = i.id ORDER BY 1")))
        for start in range(0, len(sets), 200):
            refresh_review_daily_of_sets(session, sets[start:start + 200])
            session.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in ("image_reviews", "defect_reviews", "review_daily"):
            connection.exec_driver_sql(f"VACUUM ANALYZE {table}")
    return time.perf_counter() - t


def _drop_constraints_raw(cursor, tables) -> None:
    for table in tables:
        for constraint in sorted(table.constraints, key=lambda c: str(c.name)):
            if constraint.name and not constraint.name.startswith(("pk_", "ck_")):
                cursor.execute(f'ALTER TABLE {table.name} DROP CONSTRAINT IF EXISTS "{constraint.name}"')
        for index in table.indexes:
            cursor.execute(f'DROP INDEX IF EXISTS "{index.name}"')


def _copy_defects(cursor, rng, d0: int, d1: int, inspection: np.ndarray) -> None:
    n = d1 - d0
    if n == 0:
        return
    ids = np.arange(d0 + 1, d1 + 1)
    cls = rng.choice(len(CLASSES), size=n, p=CLASS_P)
    area = np.clip(rng.lognormal(3.5, 1.0, n), 16, 20000).astype(np.int64)
    side = np.ceil(np.sqrt(area)).astype(np.int64)
    y0 = rng.integers(0, 512 - side.clip(max=511))
    x0 = rng.integers(0, 512 - side.clip(max=511))
    mean, peak = 0.5 + rng.random(n) * 0.3, 0.8 + rng.random(n) * 0.2
    names = np.array(CLASSES)
    _copy(cursor, "defects", ["id", "inspection_id", "class_index", "class_name", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "area",
                              "centroid_y", "centroid_x", "orientation", "eccentricity", "mean_score", "max_score", "rle"], _lines(
        _strs(ids), _strs(inspection), _strs(cls), names[cls].tolist(), _strs(y0), _strs(x0), _strs(y0 + side), _strs(x0 + side),
        _strs(area), _strs((y0 + side / 2).round(1)), _strs((x0 + side / 2).round(1)), ["0.0"] * n, ["0.5"] * n,
        _strs(mean.round(3)), _strs(peak.round(3)), [f"0 {a}" for a in area.tolist()],
    ))


def finish(engine) -> float:
    """Recreate the dropped indexes and constraints from the schema, then VACUUM ANALYZE; returns seconds."""
    from sqlalchemy import ForeignKeyConstraint, UniqueConstraint
    from sqlalchemy.schema import AddConstraint, CreateIndex

    from defectscan.db.schema import Defect, Image, Inspection

    t = time.perf_counter()
    with engine.begin() as connection:
        connection.exec_driver_sql("SET maintenance_work_mem = '1GB'")
        for table in (Image.__table__, Inspection.__table__, Defect.__table__):
            for index in table.indexes:
                connection.execute(CreateIndex(index))
            for constraint in table.constraints:
                if isinstance(constraint, UniqueConstraint):
                    connection.execute(AddConstraint(constraint))
        for table in (Image.__table__, Inspection.__table__, Defect.__table__):
            for constraint in table.constraints:
                if isinstance(constraint, ForeignKeyConstraint):
                    connection.execute(AddConstraint(constraint))
        for table in ("models", "job_runs", "image_sets", "images", "inspections", "defects", "image_reviews", "defect_reviews"):
            connection.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT coalesce(max(id), 1) FROM {table}))"
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE")
    return time.perf_counter() - t


# --- timing ------------------------------------------------------------------------------------------------------


class Recorder:
    """Keeps the SQL statements (and parameters) a query function issues, for EXPLAIN."""

    def __init__(self):
        self.statements: list[tuple[str, object]] = []
        self.on = False

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        if self.on:
            self.statements.append((statement, parameters))


def measure(engine, repeats: int, seed: int = 1) -> dict:
    from sqlalchemy import event, text

    from defectscan.db.queries import Filters, latest_lot, list_defects, list_images, list_lots, lot_summary
    from defectscan.db.session import session_factory

    factory = session_factory(engine)
    rng = np.random.default_rng(seed)
    with factory() as session:
        lots = list(session.scalars(text("SELECT DISTINCT lot FROM image_sets ORDER BY lot")))
        newest = session.scalar(text("SELECT max(acquired_at) FROM image_sets"))
    since = newest - dt.timedelta(days=30)

    from defectscan.db.reviews import add_review_figures, list_reviews, qa_decisions
    from defectscan.review.queue import review_queue

    def lots_with_qa(s, filters: Filters, limit: int):  # what `lots list` runs
        page = list_lots(s, filters, limit=limit)
        add_review_figures(s, page.rows, filters)
        return page

    def lot_with_qa(s):  # what `lots show --latest` runs
        summary = lot_summary(s, latest_lot(s))
        add_review_figures(s, summary["models"], Filters(lot=summary["lot"]))
        return summary

    def images_with_qa(s, filters: Filters):  # what `images list` runs
        page = list_images(s, filters, sort="score", limit=100)
        return qa_decisions(s, [row["id"] for row in page.rows])

    cases = {
        "latest lot summary + QA figures (lots show --latest)": lot_with_qa,
        "defects of a lot, class + min area, limit 100 (defects list)": lambda s: list_defects(
            s, Filters(lot=str(rng.choice(lots)), defect_class="scratch", min_area=40), limit=100),
        "defect rate per lot, last 30 days + QA figures (lots list --since)": lambda s: lots_with_qa(s, Filters(since=since), 1000),
        "lots, no filter, limit 50 + QA figures (lots list)": lambda s: lots_with_qa(s, Filters(), 50),
        "failed images of a lot + QA decisions, limit 100 (images list)": lambda s: images_with_qa(
            s, Filters(lot=str(rng.choice(lots)), verdict="fail")),
        "newest defects, no filter, limit 100 (defects list)": lambda s: list_defects(s, Filters(), limit=100),
        "review queue of a lot, 20 sampled passes (review queue)": lambda s: review_queue(s, str(rng.choice(lots)), sample_passed=20),
        "reviews of a lot, limit 50 (review list --lot)": lambda s: list_reviews(s, Filters(lot=str(rng.choice(lots))), limit=50),
        "newest reviews, no filter, limit 50 (review list)": lambda s: list_reviews(s, Filters(), limit=50),
    }
    recorder = Recorder()
    event.listen(engine, "before_cursor_execute", recorder)
    results = {}
    for name, call in cases.items():
        with factory() as session:
            call(session)  # warm-up (and the plans' first parse)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call(session)
                times.append((time.perf_counter() - t) * 1000)
            recorder.statements, recorder.on = [], True
            call(session)
            recorder.on = False
            statements = list(recorder.statements)
        plans = []
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                for statement, parameters in statements:
                    cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                    plans.append({"sql": statement, "plan": "\n".join(r[0] for r in cursor.fetchall())})
        finally:
            raw.close()
        times.sort()
        results[name] = {
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 2),
            "max_ms": round(times[-1], 2),
            "statements": len(statements),
            "plans": plans,
        }
        print(f"{name:66s} p50 {results[name]['p50_ms']:8.2f} ms  p95 {results[name]['p95_ms']:8.2f} ms  ({len(statements)} statements)")
    event.remove(engine, "before_cursor_execute", recorder)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--defects", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--reviewed", type=float, default=0.1, help="Share of the images QA decided (timed before and after).")
    parser.add_argument("--url", help="PostgreSQL server (default: DEFECTSCAN_TEST_POSTGRES_URL)")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--reuse", action="store_true", help="Time the existing database; do not load.")
    parser.add_argument("--plans", action="store_true", help="Print the EXPLAIN ANALYZE plans.")
    args = parser.parse_args()
    if args.images < IMAGES_PER_SET * SETS_PER_LOT or args.defects < args.images:
        sys.exit(f"need at least {IMAGES_PER_SET * SETS_PER_LOT} images and at least as many defects as images")

    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine

    server = _server_url(args.url)
    url = server.set(database=DB_NAME)
    report: dict = {"images": args.images, "defects": args.defects, "repeats": args.repeats}
    if not args.reuse:
        _admin(server, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        _admin(server, f'CREATE DATABASE "{DB_NAME}"')
    engine = make_engine(url)
    try:
        if not args.reuse:
            upgrade(engine)
            t = time.perf_counter()
            timings = load(engine, args.images, args.defects)
            timings["indexes_and_analyze_s"] = round(finish(engine), 1)
            timings["total_load_s"] = round(time.perf_counter() - t, 1)
            report["load"] = timings
            print(f"loaded {args.images:,} images, {args.defects:,} defects in {timings['total_load_s']} s "
                  f"(COPY {timings['copy_s']:.1f} s, indexes + ANALYZE {timings['indexes_and_analyze_s']} s)")
        with engine.connect() as connection:
            report["sizes"] = dict(connection.exec_driver_sql(
                "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class WHERE relname IN "
                "('images', 'inspections', 'defects', 'image_sets', 'inspection_daily')").all())
        # Latency on a shared machine moves with its load: record it next to the figures.
        report["load_average_before"] = os.getloadavg()
        print("before any QA decision:")
        report["queries_without_reviews"] = measure(engine, args.repeats)
        if not args.reuse:
            seconds = fill_reviews(engine, args.reviewed)
            with engine.connect() as connection:
                counts = {table: connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
                          for table in ("image_reviews", "defect_reviews")}
            report["reviews"] = {"fraction_of_images": args.reviewed, **counts, "fill_s": round(seconds, 1)}
            print(f"QA decisions on {100 * args.reviewed:g} % of the images: {counts['image_reviews']:,} image and "
                  f"{counts['defect_reviews']:,} defect decisions ({seconds:.1f} s); again:")
        report["queries"] = measure(engine, args.repeats)
        report["load_average_after"] = os.getloadavg()
        print(f"{'with reviews / without (p95, measured in this run)':66s}")
        for name, result in report["queries"].items():
            before = report["queries_without_reviews"][name]["p95_ms"]
            print(f"  {name:64s} {result['p95_ms'] / before:6.2f}x")
        print(f"load average (1, 5, 15 min) before {report['load_average_before']}, after {report['load_average_after']} "
              f"on {os.cpu_count()} CPUs")
        if args.plans:
            for name, result in report["queries"].items():
                print(f"\n=== {name}")
                for plan in result["plans"]:
                    print(plan["sql"].strip().splitlines()[0][:120], "...")
                    print(plan["plan"])
    finally:
        engine.dispose()
        if not args.keep:
            _admin(server, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_queries.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""QA report build time and memory at 1,000,000 defects, on SQLite and PostgreSQL.

    python benchmarks/bench_report.py [--defects 100000,1000000] [--images-per-defect 0.1] [--backend sqlite,postgres] [--pdf]

For each size, fills a fresh database (SQLite file in a temp dir; PostgreSQL: a database
created on the server at DEFECTSCAN_TEST_POSTGRES_URL and dropped afterwards) with bulk inserts:
one line "A", lots of 10 image sets x 100 images of 512x512, 30 % of images failed carrying all
the defects (5 classes, log-normal areas), 0.1 % errors, one job run per lot. The image set that
holds the worst images is a real Zarr store with a real score map, so the overlays read real
pixels. Then a fresh process builds the report for the whole line (every defect in scope)
through report/build.py, and prints the build time (and its SQL share) and that process's peak RSS
before the PDF step (VmHWM): the same peak
at 100k and 1M defects shows no row-proportional memory. Writes benchmarks/results/bench_report.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_queries import _copy, _drop_constraints_raw, _lines, _strs, finish

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ("scratch", "stain", "crack", "dent", "pit")
CLASS_P = (0.45, 0.25, 0.15, 0.1, 0.05)
IMAGES_PER_SET, SETS_PER_LOT, SIDE = 100, 10, 512
START = np.datetime64("2026-01-01T00:00:00", "s")
SPAN_S = 365 * 86400
CHUNK = 250_000


# --- data ---------------------------------------------------------------------------------------------------------


def plan(n_images: int, n_defects: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_sets = max(1, n_images // IMAGES_PER_SET)
    n_images = n_sets * IMAGES_PER_SET
    n_lots = max(1, n_sets // SETS_PER_LOT)
    set_lot = np.minimum(np.arange(n_sets) // SETS_PER_LOT, n_lots - 1)
    set_seconds = (set_lot * (SPAN_S / n_lots) + (np.arange(n_sets) % SETS_PER_LOT) * 600).astype(np.int64)
    verdict = np.where(rng.random(n_images) < 0.3, 1, 0)
    verdict[rng.random(n_images) < 0.001] = 2
    verdict[:IMAGES_PER_SET:7] = 1  # the real image set has failed images
    failed = np.flatnonzero(verdict == 1)
    counts = np.ones(failed.size, dtype=np.int64)
    counts += np.bincount(rng.integers(0, failed.size, max(0, n_defects - failed.size)), minlength=failed.size)
    n_per_image = np.zeros(n_images, dtype=np.int64)
    n_per_image[failed] = counts
    return {"rng": rng, "n_images": n_images, "n_sets": n_sets, "n_lots": n_lots, "set_lot": set_lot, "set_seconds": set_seconds,
            "verdict": verdict, "n_per_image": n_per_image, "first_defect": np.concatenate(([0], np.cumsum(n_per_image)))}


def _when(seconds: np.ndarray, sqlite: bool) -> list[str]:
    text = np.datetime_as_string(START + seconds.astype("timedelta64[s]"), unit="s")
    return [t.replace("T", " ") + ".000000" for t in text.tolist()] if sqlite else [t + "Z" for t in text.tolist()]


def _set_uri(root: Path, i: int) -> str:
    return str(root / f"set{i:06d}.zarr")


def write_real_set(root: Path, p: dict) -> None:
    """Image set 0 as a real Zarr stack with a real score map (what the overlays read)."""
    import zarr

    rng = np.random.default_rng(1)
    group = zarr.open_group(_set_uri(root, 0), mode="w")
    images = np.clip(rng.normal(128, 20, (IMAGES_PER_SET, SIDE, SIDE)), 0, 255).astype(np.uint8)
    group.create_array("images", data=images, chunks=(1, SIDE, SIDE))
    scores = zarr.open_group(_set_uri(root, 0).replace(".zarr", ".masks.zarr"), mode="w")
    array = scores.create_array("bench/1", shape=(IMAGES_PER_SET, 1, SIDE, SIDE), chunks=(1, 1, SIDE, SIDE), dtype=np.uint8)
    block = np.zeros((IMAGES_PER_SET, 1, SIDE, SIDE), np.uint8)
    block[:, :, 100:160, 200:300] = 240
    array[...] = block


def chunks(p: dict, root: Path, sqlite: bool):
    """Rows per table, CHUNK images at a time: (images, inspections, defects) as column lists of strings/numbers."""
    rng = p["rng"]
    verdicts = np.array(["pass", "fail", "error"])
    names = np.array(CLASSES)
    for start in range(0, p["n_images"], CHUNK):
        stop = min(p["n_images"], start + CHUNK)
        ids = np.arange(start + 1, stop + 1)
        image_set = np.arange(start, stop) // IMAGES_PER_SET
        position = np.arange(start, stop) % IMAGES_PER_SET
        seconds = p["set_seconds"][image_set] + position * 2
        v = p["verdict"][start:stop]
        n = p["n_per_image"][start:stop]
        pixels = n * 40
        pixels[image_set == 0] *= 1000  # the real set's failed images are the worst
        max_score = np.where(v == 1, 0.5 + rng.random(stop - start) * 0.5, rng.random(stop - start) * 0.45).round(4)
        images = (ids, image_set + 1, position, [f"SN{i:09d}" for i in ids.tolist()], _when(seconds, sqlite))
        masks = [_set_uri(root, s).replace(".zarr", ".masks.zarr") for s in image_set.tolist()]
        inspections = (ids, ids, p["set_lot"][image_set] + 1, verdicts[v], n, pixels, max_score, masks, _when(seconds + 7200, sqlite))
        d0, d1 = p["first_defect"][start], p["first_defect"][stop]
        k = d1 - d0
        cls = rng.choice(len(CLASSES), size=k, p=CLASS_P)
        area = np.clip(rng.lognormal(3.5, 1.0, k), 16, 20000).astype(np.int64)
        side = np.ceil(np.sqrt(area)).astype(np.int64).clip(max=SIDE - 1)
        y0, x0 = rng.integers(0, SIDE - side), rng.integers(0, SIDE - side)
        defects = (np.arange(d0 + 1, d1 + 1), np.repeat(ids, n), cls, names[cls], y0, x0, y0 + side, x0 + side, area,
                   (y0 + side / 2).round(1), (x0 + side / 2).round(1), (0.5 + rng.random(k) * 0.3).round(3),
                   (0.8 + rng.random(k) * 0.2).round(3), [f"0 {a}" for a in np.minimum(area, side * side).tolist()])
        yield images, inspections, defects, stop, d1


def _head_rows(p: dict, root: Path, sqlite: bool):
    model = (1, "bench", "1", "/models/bench.keras", "0" * 64, "tinyunet", "{}", json.dumps(list(CLASSES)), 0.5, "production",
             json.dumps({"dataset": "bench", "pixel_auroc": 0.991, "thresholds": {"0.5": {"dice": 0.87, "tpr": 0.97, "tnr": 0.99}}}))
    lots = np.arange(p["n_lots"])
    lot_seconds = (lots * (SPAN_S / p["n_lots"])).astype(np.int64)
    runs = (lots + 1, _when(lot_seconds + 7200, sqlite), _when(lot_seconds + 9000, sqlite))
    sets = np.arange(p["n_sets"])
    image_sets = (sets + 1, [_set_uri(root, s) for s in sets.tolist()], [f"L{lot:05d}" for lot in p["set_lot"].tolist()],
                  _when(p["set_seconds"], sqlite))
    return model, runs, image_sets


def load_sqlite(url: str, p: dict, root: Path) -> None:
    import sqlite3

    model, runs, image_sets = _head_rows(p, root, True)
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    with db:
        db.execute("INSERT INTO models (id, name, version, uri, sha256, architecture, input_spec, classes, threshold, stage, metrics, "
                   "registered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '2026-01-01 00:00:00.000000')", model)
        db.executemany("INSERT INTO job_runs (id, job, model_id, status, started_at, finished_at, n_images, n_inspected, n_skipped, "
                       "n_errors, n_defects) VALUES (?, 'nightly-line', 1, 'succeeded', ?, ?, 1000, 1000, 0, 0, 0)",
                       zip(*(c.tolist() if hasattr(c, "tolist") else c for c in runs)))
        db.executemany("INSERT INTO image_sets (id, uri, array_path, kind, lot, line, product, camera, acquired_at, shape, dtype, chunks, "
                       "n_images, checksum, registered_at) VALUES (?, ?, 'images', 'stack', ?, 'A', 'P1', 'C1', ?, '[100, 512, 512]', "
                       "'uint8', '[1, 512, 512]', 100, '', '2026-01-01 00:00:00.000000')",
                       zip(*(c.tolist() if hasattr(c, "tolist") else c for c in image_sets)))
    for images, inspections, defects, stop, d1 in chunks(p, root, True):
        with db:
            db.executemany("INSERT INTO images (id, image_set_id, position, key, acquired_at, height, width) VALUES (?, ?, ?, ?, ?, 512, 512)",
                           zip(*(c.tolist() if hasattr(c, "tolist") else c for c in images)))
            db.executemany("INSERT INTO inspections (id, image_id, model_id, job_run_id, verdict, n_defects, defect_pixels, max_score, "
                           "mask_uri, mask_array, inspected_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, 'bench/1', ?)",
                           zip(*(c.tolist() if hasattr(c, "tolist") else c for c in inspections)))
            db.executemany("INSERT INTO defects (id, inspection_id, class_index, class_name, bbox_y0, bbox_x0, bbox_y1, bbox_x1, area, "
                           "centroid_y, centroid_x, orientation, eccentricity, mean_score, max_score, rle) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0.0, 0.5, ?, ?, ?)",
                           zip(*(c.tolist() if hasattr(c, "tolist") else c for c in defects)))
        print(f"  loaded images {stop:,}/{p['n_images']:,}, defects {d1:,}", file=sys.stderr, flush=True)
    db.execute("ANALYZE")
    db.close()


def load_postgres(engine, p: dict, root: Path) -> None:
    from defectscan.db.schema import Defect, Image, Inspection

    model, runs, image_sets = _head_rows(p, root, False)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("INSERT INTO models (id, name, version, uri, sha256, architecture, input_spec, classes, threshold, stage, metrics, "
                       "registered_at) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s::jsonb, now())", model)
        n = len(runs[0])
        _copy(cursor, "job_runs", ["id", "job", "model_id", "status", "started_at", "finished_at", "n_images", "n_inspected", "n_skipped",
                                   "n_errors", "n_defects"],
              _lines(_strs(runs[0]), ["nightly-line"] * n, ["1"] * n, ["succeeded"] * n, runs[1], runs[2], ["1000"] * n, ["1000"] * n,
                     ["0"] * n, ["0"] * n, ["0"] * n))
        n = len(image_sets[0])
        _copy(cursor, "image_sets", ["id", "uri", "array_path", "kind", "lot", "line", "product", "camera", "acquired_at", "shape", "dtype",
                                     "chunks", "n_images", "checksum", "registered_at"],
              _lines(_strs(image_sets[0]), image_sets[1], ["images"] * n, ["stack"] * n, image_sets[2], ["A"] * n, ["P1"] * n, ["C1"] * n,
                     image_sets[3], ["[100, 512, 512]"] * n, ["uint8"] * n, ["[1, 512, 512]"] * n, ["100"] * n, [""] * n, image_sets[3]))
        _drop_constraints_raw(cursor, [Image.__table__, Inspection.__table__, Defect.__table__])
        raw.commit()
        for images, inspections, defects, stop, d1 in chunks(p, root, False):
            with raw.cursor() as cursor:
                k = len(images[0])
                _copy(cursor, "images", ["id", "image_set_id", "position", "key", "acquired_at", "height", "width"],
                      _lines(_strs(images[0]), _strs(images[1]), _strs(images[2]), images[3], images[4], ["512"] * k, ["512"] * k))
                _copy(cursor, "inspections", ["id", "image_id", "model_id", "job_run_id", "verdict", "n_defects", "defect_pixels",
                                              "max_score", "mask_uri", "mask_array", "inspected_at"],
                      _lines(_strs(inspections[0]), _strs(inspections[1]), ["1"] * k, _strs(inspections[2]), inspections[3].tolist(),
                             _strs(inspections[4]), _strs(inspections[5]), _strs(inspections[6]), inspections[7], ["bench/1"] * k,
                             inspections[8]))
                m = len(defects[0])
                _copy(cursor, "defects", ["id", "inspection_id", "class_index", "class_name", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
                                          "area", "centroid_y", "centroid_x", "orientation", "eccentricity", "mean_score", "max_score", "rle"],
                      _lines(*[_strs(c) for c in defects[:3]], defects[3].tolist(), *[_strs(c) for c in defects[4:11]], ["0.0"] * m,
                             ["0.5"] * m, _strs(defects[11]), _strs(defects[12]), defects[13]))
            raw.commit()
            print(f"  loaded images {stop:,}/{p['n_images']:,}, defects {d1:,}", file=sys.stderr, flush=True)
    finally:
        raw.close()
    finish(engine)


# --- the measured build (in its own process) --------------------------------------------------------------------------


def child(url: str, out: Path, pdf: bool) -> None:
    from defectscan.db.session import make_engine, session_factory
    from defectscan.report.build import Scope, build_report
    from sqlalchemy import event

    engine = make_engine(url)
    sql: list[tuple[float, str]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _start(conn, cursor, statement, parameters, context, executemany):
        conn.info["t"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _stop(conn, cursor, statement, parameters, context, executemany):
        sql.append((time.perf_counter() - conn.info["t"], " ".join(statement.split())[:90]))

    t = time.perf_counter()
    with session_factory(engine)() as session:
        report = build_report(session, Scope(line="A"))
    out.write_text(report.html, encoding="utf-8")
    build_s = time.perf_counter() - t
    result = {"build_s": round(build_s, 2), "sql_s": round(sum(s for s, _ in sql), 2), "statements": len(sql),
              "slowest_sql": [[round(s, 2), text] for s, text in sorted(sql, reverse=True)[:4]],
              "html_bytes": len(report.html.encode()), "summary": report.summary, "overlays": report.html.count('src="data:image/png'),
              # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (loader) parent across exec
              "peak_rss_mib": _vm_hwm_mib()}
    if pdf:
        from defectscan.report.pdf import print_pdf

        t = time.perf_counter()
        print_pdf(out, out.with_suffix(".pdf"))
        result["pdf_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(result))


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(url: str, out: Path, pdf: bool) -> dict:
    command = [sys.executable, __file__, "--child", url, "--out", str(out)] + (["--pdf"] if pdf else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"report build failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(backend: str, n_defects: int, n_images: int, pdf: bool, work: Path) -> dict:
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    root = work / f"{backend}-{n_defects}"
    root.mkdir()
    p = plan(n_images, n_defects)
    write_real_set(root, p)
    admin = None
    if backend == "sqlite":
        url = f"sqlite:///{root / 'bench.sqlite'}"
    else:
        server = os.environ.get("DEFECTSCAN_TEST_POSTGRES_URL")
        if not server:
            sys.exit("set DEFECTSCAN_TEST_POSTGRES_URL to a PostgreSQL server for --backend postgres")
        server = make_url(server).set(drivername="postgresql+psycopg")
        name = f"defectscan_bench_report_{uuid.uuid4().hex[:8]}"
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = server.set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        t = time.perf_counter()
        if backend == "sqlite":
            engine.dispose()
            load_sqlite(url, p, root)
        else:
            load_postgres(engine, p, root)
            engine.dispose()
        load_s = time.perf_counter() - t
        result = measure(url, root / "report.html", pdf)
    finally:
        if admin is not None:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    result.update(backend=backend, defects=int(p["first_defect"][-1]), images=p["n_images"], lots=p["n_lots"], load_s=round(load_s, 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defects", default="100000,1000000", help="comma-separated defect counts")
    parser.add_argument("--images-per-defect", type=float, default=0.1, help="images per defect (0.1: 100k images for 1M defects)")
    parser.add_argument("--backend", default="sqlite", help="sqlite, postgres or both, comma-separated")
    parser.add_argument("--pdf", action="store_true", help="also time the PDF (headless Chromium)")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.pdf)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-report-") as work:
        for backend in args.backend.split(","):
            for n in (int(x) for x in args.defects.split(",")):
                r = run_size(backend.strip(), n, int(n * args.images_per_defect), args.pdf, Path(work))
                results.append(r)
                print(f"{r['backend']:>8} {r['defects']:>9,} defects {r['images']:>8,} images {r['lots']:>4} lots: load {r['load_s']:6.1f} s, "
                      f"report build {r['build_s']:5.2f} s (SQL {r['sql_s']:.2f} s)" + (f", pdf {r['pdf_s']:.2f} s" if "pdf_s" in r else "")
                      + f", peak RSS {r['peak_rss_mib']:.0f} MiB, {r['html_bytes'] / 1e6:.2f} MB HTML, {r['overlays']} overlays", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_report.json").write_text(json.dumps({"measured_at": dt.datetime.now(dt.UTC).isoformat(),
                                                           "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Pipeline benchmarks: end-to-end vs model-only throughput, 1 vs 2 workers, client memory at 1M images.

    python benchmarks/bench_pipeline.py throughput [--images 96] [--size 512] [--precision bfloat16 | --compare-precisions] [--repeat 3]
    python benchmarks/bench_pipeline.py scaling    [--images 64] [--size 512]
    python benchmarks/bench_pipeline.py million    [--images 1000000]

Prints figures and writes JSON to benchmarks/results/. Ratios are measured in one run on one
cluster, so a busy machine moves both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _database(folder: Path, name: str = "bench"):
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, session_factory

    engine = make_engine(f"sqlite:///{folder / f'{name}.sqlite'}")
    upgrade(engine)
    return session_factory(engine)


def _stack(folder: Path, n: int, size: int, images_per_file: int | None = None) -> Path:
    """A textured stack with bright defects on one image in ten, in the image-set layout."""
    import zarr

    rng = np.random.default_rng(0)
    path = folder / "bench.zarr"
    group = zarr.open_group(path, mode="w")
    chunks = (1, size, size)
    shards = (images_per_file, size, size) if images_per_file else None
    array = group.create_array("images", shape=(n, size, size), chunks=chunks, shards=shards, dtype="uint8")
    block = images_per_file or 64
    for start in range(0, n, block):
        count = min(block, n - start)
        images = np.clip(rng.normal(120, 20, size=(count, size, size)), 0, 200).astype(np.uint8)
        images[::10, size // 4 : size // 4 + size // 16, size // 3 : size // 2] = 250
        array[start : start + count] = images
    group.attrs.update({"lot": "BENCH", "line": "B", "product": "P", "camera": "C"})
    return path


def _save_tinyunet(path: Path) -> Path:
    from defectscan.model.unet import build_model

    model = build_model(seed=0)
    model.build((None, None, None, 1))
    model.save(path)
    return path


def _bench_model(args, folder: Path) -> Path:
    """The shipped demo model (trained: realistic defect counts), or a fresh TinyUNet with --untrained."""
    if args.untrained:
        return _model_file(_save_tinyunet, folder / "tinyunet.keras")
    from defectscan.model.registry import DEMO_MODEL

    return DEMO_MODEL


def _save_threshold(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pipeline_helpers import save_threshold_model

    return save_threshold_model(path)


def _model_file(builder, path: Path) -> Path:
    """Build a model file in a child process: the benchmark is the client and must not load TensorFlow."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(builder, path).result()


class _PeakRss:
    """Samples this process's resident memory in a thread while a block runs."""

    def __enter__(self):
        import threading

        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _register(factory, store: Path, model_path: Path, name: str, precision: str = "float32"):
    from defectscan.data.register import register_store

    with factory() as session:
        image_set = register_store(session, str(store), check_chunks=False).image_set
    return image_set, _add_model(factory, model_path, name, "1", precision)


def _add_model(factory, model_path: Path, name: str, version: str, precision: str = "float32"):
    """A models row for the file as it stands (no parity check: the benchmark measures speed; the figures it prints are the file's own)."""
    from defectscan.db.schema import Model
    from defectscan.model.export import file_sha256

    with factory.begin() as session:
        model = Model(name=name, version=version, uri=str(model_path), sha256=file_sha256(model_path), architecture="tinyunet",
                      input_spec={}, classes=["defect"], threshold=0.5, precision=precision)
        session.add(model)
    return model


def _model_only(ref, size: int, batches: int) -> float:
    """Runs on a worker: images/s of the cached model's compiled program (pixels in, uint8 scores out, as
    inspection calls it) on fixed batches already in memory."""
    from defectscan.pipeline.worker import _score

    x = np.random.default_rng(1).integers(0, 256, size=(ref.batch_size * batches, size, size, 1), dtype=np.uint8)
    _score(ref, x[: ref.batch_size])  # trace and warm up
    began = time.perf_counter()
    _score(ref, x)
    return len(x) / (time.perf_counter() - began)


def _settings(batch_size: int, images_per_shard: int, runtime: str = "tensorflow"):
    from defectscan.config import load_settings

    return load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": str(batch_size),
                                  "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": str(images_per_shard),
                                  "DEFECTSCAN_INSPECTION__RUNTIME": runtime})


def _inspect(factory, client, model, image_set, settings, in_flight: int):
    from defectscan.pipeline.run import inspect_image_sets

    began = time.perf_counter()
    summary = inspect_image_sets(factory, client, model, [image_set], settings.inspection, max_in_flight=in_flight)
    return summary, time.perf_counter() - began


def throughput(args) -> dict:
    """Model only and end to end on one worker, per precision (float32 and bfloat16 in one run with --compare-precisions)."""
    from distributed import Client

    from defectscan.pipeline.cluster import _local_cluster

    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    factory = _database(folder)
    model_path = _bench_model(args, folder)
    precisions = ["float32", "bfloat16"] if args.compare_precisions else [args.precision]
    image_set, model = _register(factory, _stack(folder, args.images, args.size), model_path, "tinyunet-bench", precisions[0])
    settings = _settings(args.batch_size, args.batch_size * 4, args.runtime)
    figures = {"benchmark": "pipeline throughput", "runtime": args.runtime, "images": args.images, "size": args.size,
               "batch_size": args.batch_size, "workers": 1, "cores": os.cpu_count(), "precisions": {}}
    runs: dict[str, list[dict]] = {precision: [] for precision in precisions}
    with _local_cluster(settings.cluster, 1, args.runtime) as cluster, Client(cluster) as client:
        version = 1
        for round_ in range(args.repeat):
            # Alternated: the first measurement after the cluster starts is usually the lowest.
            for precision in precisions if round_ % 2 == 0 else precisions[::-1]:
                if version > 1:  # a version of its own, so that its results are not the previous run's
                    model = _add_model(factory, model_path, "tinyunet-bench", str(version), precision)
                runs[precision].append(_throughput_of(args, factory, client, model, image_set, settings))
                version += 1
    for precision, measured in runs.items():
        figures["precisions"][precision] = _median_run(precision, measured)
    for key in ("model_only_img_s", "end_to_end_img_s", "ratio", "status"):
        figures[key] = figures["precisions"][precisions[-1]][key]
    if args.compare_precisions:
        # Per round (back-to-back measurements), then the median: the two precisions' median runs may be of different rounds.
        for key in ("model_only_img_s", "end_to_end_img_s"):
            per_round = [b[key] / f[key] for b, f in zip(runs["bfloat16"], runs["float32"], strict=True)]
            figures[f"bfloat16_vs_float32_{key[:-6]}"] = round(statistics.median(per_round), 3)
        print(f"bfloat16 / float32: model only x{figures['bfloat16_vs_float32_model_only']:.2f}, "
              f"end to end x{figures['bfloat16_vs_float32_end_to_end']:.2f} (target >= 1.7 end to end)")
    figures["parity"] = _parity_figures(args, model_path, precisions[-1])
    return figures


def _median_run(precision: str, runs: list[dict]) -> dict:
    """The run of median ratio (each run's model only and end to end measured one after the other), with
    every run's figures: on a shared 2-core machine one run's ratio moves by a few hundredths."""
    ordered = sorted(runs, key=lambda run: run["ratio"])
    median = dict(ordered[len(ordered) // 2])
    median["runs"] = runs
    if len(runs) > 1:
        ratios = ", ".join(f"{run['ratio']:.3f}" for run in runs)
        print(f"{precision:<8} median ratio of {len(runs)} runs: {median['ratio']:.3f} (each: {ratios}); "
              f"its model only {median['model_only_img_s']:.2f} img/s, end to end {median['end_to_end_img_s']:.2f}")
    return median


def _throughput_of(args, factory, client, model, image_set, settings) -> dict:
    from defectscan.pipeline.run import model_ref

    ref = model_ref(model, args.batch_size, args.runtime)
    # warm the worker's model cache, so neither side pays the load
    client.submit(_model_only, ref, args.size, 1, pure=False).result()
    model_only = client.submit(_model_only, ref, args.size, args.images // args.batch_size, pure=False).result()
    summary, seconds = _inspect(factory, client, model, image_set, settings, in_flight=2)
    end_to_end = summary.counts.inspected / seconds
    figures = {"model_only_img_s": round(model_only, 2), "end_to_end_img_s": round(end_to_end, 2), "ratio": round(end_to_end / model_only, 3),
               # What the workers ran: asked for bfloat16, a CPU without its fast path runs float32.
               "precision_asked": ref.precision, "precisions_run": dict(summary.precisions_run),
               "status": summary.status, "worker_seconds": {k: round(v, 2) for k, v in summary.worker_seconds.items()}, "wall_seconds": round(seconds, 2)}
    print(f"{ref.precision:<8} model only : {model_only:8.2f} img/s  ({args.size}x{args.size}, batch {args.batch_size}, one worker, {args.runtime})")
    print(f"{ref.precision:<8} end to end : {end_to_end:8.2f} img/s  (Zarr in -> masks + SQLite out, {args.images} images)")
    print(f"{ref.precision:<8} ratio      : {figures['ratio']:.3f}  (target >= 0.95 on CPU)")
    print(f"{ref.precision:<8} end-to-end wall {seconds:.1f} s; on the worker: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["worker_seconds"].items()))
    return figures


def _parity_figures(args, model_path: Path, precision: str) -> dict | None:
    """The parity check recorded with the model file (the demo's sidecar), printed beside the speeds."""
    from defectscan.model.registry import describe_precision, sidecar_metadata

    if precision == "float32":
        return None
    check = sidecar_metadata(model_path).precision_check
    if check and check.get("precision") not in (None, precision):
        print(f"parity: the model file's check is of {check.get('precision')}, not {precision}: not shown")
        return None
    print(f"parity: {describe_precision(precision, check) if check else 'none recorded with this model file (an untrained model has none)'}")
    return check


def scaling(args) -> dict:
    from distributed import Client

    from defectscan.pipeline.cluster import _local_cluster
    from defectscan.pipeline.run import model_ref

    folder = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    store, model_path = _stack(folder, args.images, args.size), _bench_model(args, folder)
    settings = _settings(args.batch_size, args.batch_size * 2)
    cores = len(os.sched_getaffinity(0))
    figures = {"benchmark": "pipeline scaling", "images": args.images, "size": args.size, "cores": cores}
    for workers in (1, 2):
        # A fresh database per worker count: each run writes every row, as a first run on the line does.
        factory = _database(folder, f"workers-{workers}")
        image_set, model = _register(factory, store, model_path, "tinyunet-bench")
        with _local_cluster(settings.cluster, workers) as cluster, Client(cluster) as client:
            client.run(lambda: None)
            ref = model_ref(model, args.batch_size)
            for worker in client.scheduler_info()["workers"]:
                client.submit(_model_only, ref, args.size, 1, workers=[worker], pure=False).result()
            summary, seconds = _inspect(factory, client, model, image_set, settings, in_flight=2 * workers)
        figures[f"workers_{workers}_img_s"] = round(summary.counts.inspected / seconds, 2)
        print(f"{workers} worker(s): {figures[f'workers_{workers}_img_s']:8.2f} img/s end to end ({args.images} images, {args.size}x{args.size})")
    figures["speedup_2_vs_1"] = round(figures["workers_2_img_s"] / figures["workers_1_img_s"], 3)
    print(f"speed-up 2 vs 1 workers: {figures['speedup_2_vs_1']:.3f} on {cores} core(s) this process may use "
          f"(each worker's TensorFlow gets {max(1, cores // 2)} thread(s) with 2 workers, {cores} with 1)")
    return figures


def million(args) -> dict:
    """Plan time and peak client memory for a very large stack of tiny images (a stand-in for 1M real ones)."""
    from distributed import Client

    from defectscan.pipeline.cluster import _local_cluster
    from defectscan.pipeline.plan import plan_stack
    from defectscan.pipeline.run import pending_positions

    folder = Path(tempfile.mkdtemp(prefix="bench-million-"))
    factory = _database(folder)
    began = time.perf_counter()
    store = _stack(folder, args.images, 16, images_per_file=512)
    image_set, model = _register(factory, store, _model_file(_save_threshold, folder / "threshold.keras"), "threshold-bench")
    setup_s = time.perf_counter() - began

    began = time.perf_counter()
    with factory() as session:
        pending, _ = pending_positions(session, image_set, model, redo="none")
    shards = sum(1 for _ in plan_stack(image_set.id, args.images, args.images_per_shard, pending))
    plan_s = time.perf_counter() - began
    del pending

    settings = _settings(min(512, args.images_per_shard), args.images_per_shard)
    with _local_cluster(settings.cluster, 1) as cluster, Client(cluster) as client:
        with _PeakRss() as rss:
            summary, seconds = _inspect(factory, client, model, image_set, settings, in_flight=4)
    mib = 2**20
    figures = {
        "benchmark": "pipeline million", "images": args.images, "shards": shards, "images_per_shard": args.images_per_shard, "setup_s": round(setup_s, 1),
        "plan_s": round(plan_s, 2), "run_s": round(seconds, 1), "img_s": round(summary.counts.inspected / seconds, 1),
        "client_rss_at_start_mib": round(rss.start / mib, 1), "client_peak_rss_mib": round(rss.peak / mib, 1),
        "status": summary.status, "tensorflow_in_client": "tensorflow" in sys.modules,
    }
    print(f"{args.images} images (16x16, stand-in threshold model), {shards} shards of {args.images_per_shard}")
    print(f"plan (pending query + shard plan): {plan_s:.2f} s")
    print(f"run: {seconds:.1f} s, {figures['img_s']} img/s recorded to SQLite")
    print(f"client RSS during the run: start {rss.start / mib:.0f} MiB, peak {rss.peak / mib:.0f} MiB (TensorFlow in client: {figures['tensorflow_in_client']})")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["throughput", "scaling", "million"])
    parser.add_argument("--images", type=int)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images-per-shard", type=int, default=512, help="million: shard size (more shards, same images)")
    parser.add_argument("--untrained", action="store_true", help="a freshly initialised TinyUNet instead of the demo model")
    parser.add_argument("--runtime", choices=["tensorflow", "jax"], default="tensorflow", help="throughput: the workers' Keras backend")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="throughput: the precision recorded with the benchmark's model version (workers fall back to float32 where slow)")
    parser.add_argument("--compare-precisions", action="store_true", help="throughput: float32, then bfloat16, in one run, and their ratio")
    parser.add_argument("--repeat", type=int, default=3, help="throughput: measure each precision this many times, alternating; "
                        "the run of median ratio is reported (default 3)")
    args = parser.parse_args()
    args.images = args.images or {"throughput": 96, "scaling": 64, "million": 1_000_000}[args.which]
    figures = {"throughput": throughput, "scaling": scaling, "million": million}[args.which](args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"pipeline-{args.which}.json"
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

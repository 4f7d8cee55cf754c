"""TinyUNet on a GPU through the JAX runtime: model only at several batch sizes and precisions, then
`defectscan inspect` end to end with one GPU worker, and the ratio of the two.

    bash benchmarks/gpu/run.sh            # on the GPU machine (docs/gpu.md)
    bash benchmarks/gpu/run.sh --cpu      # the same steps on this machine's CPU, small, to prove the script

Runs with KERAS_BACKEND=jax and never imports TensorFlow (the GPU machine has none; run.sh's --cpu
mode blocks the import to prove it). Figures: img/s at 512x512 per (precision, batch), GFLOP/s from
XLA's own cost analysis of the compiled program, against a bfloat16 and a float32 matmul measured
in the same run; end to end: images / seconds of the recorded job run on a warm worker, GPU utilisation sampled by
nvidia-smi while it runs (when readable). Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def log(line: str) -> None:
    print(line, flush=True)


def timed(fn, x, seconds: float) -> float:
    """Seconds per call: one warm-up (compile) call, then as many as fit in `seconds` (at least 3), median."""
    fn(x).block_until_ready()
    samples = []
    began = time.perf_counter()
    while len(samples) < 3 or time.perf_counter() - began < seconds:
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def matmul_reference(jax, jnp, n: int, seconds: float) -> dict[str, float]:
    out = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        f = jax.jit(lambda x, a=a: x @ a)
        out[name] = round(2 * n**3 / timed(f, a, seconds) / 1e9, 1)
    return out


def model_only(args) -> dict:
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from defectscan.model.export import load_model
    from defectscan.model.registry import DEMO_MODEL

    device = jax.devices()[0]
    log(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}, keras {keras.__version__} on {keras.backend.backend()}")
    reference = matmul_reference(jax, jnp, args.matmul, args.seconds)
    log("reference matmul in this run: " + ", ".join(f"{k} {v} GFLOP/s" for k, v in reference.items()))
    shipped = load_model(DEMO_MODEL)
    config = {k: v for k, v in shipped.get_config().items() if k != "dtype"}
    weights = shipped.get_weights()
    rows = []
    for precision in args.precisions:
        keras.config.set_dtype_policy(POLICIES[precision])
        model = type(shipped).from_config(config)
        model(np.zeros((1, 32, 32, 1), np.float32))
        model.set_weights(weights)
        forward = jax.jit(lambda x, model=model: model(x, training=False).astype(jnp.float32))
        for batch in args.batches:
            x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, args.size, args.size, 1)).astype(np.float32))
            try:
                cost = forward.lower(x).compile().cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                flops = float(cost.get("flops", 0.0)) if cost else 0.0
            except Exception:  # noqa: BLE001  (cost analysis is optional on some backends)
                flops = 0.0
            seconds = timed(forward, x, args.seconds)
            row = {"precision": precision, "batch": batch, "images_per_second": round(batch / seconds, 1),
                   "ms_per_batch": round(seconds * 1000, 2), "gflops": round(flops / seconds / 1e9, 1) if flops else None}
            share = f", {row['gflops'] / reference['bfloat16' if precision != 'float32' else 'float32']:.2f} of the matmul" if flops else ""
            log(f"model only {precision:<9} batch {batch:>4}: {row['images_per_second']:>9.1f} img/s  {row['ms_per_batch']:>8.2f} ms/batch"
                f"  {row['gflops'] or '-'} GFLOP/s{share}")
            rows.append(row)
    keras.config.set_dtype_policy("float32")
    return {"device": device.device_kind, "platform": device.platform, "matmul_gflops": reference, "rows": rows}


def write_store(path: Path, n: int, size: int) -> None:
    import numpy as np
    import zarr

    rng = np.random.default_rng(7)
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update({"lot": "GPU-BENCH", "line": "bench", "product": "P", "camera": "C", "acquired_at": "2026-11-30T00:00:00Z"})
    images = group.create_array("images", shape=(n, size, size), chunks=(1, size, size), dtype="uint8")
    block = 256
    for start in range(0, n, block):
        stop = min(n, start + block)
        batch = rng.normal(128, 20, (stop - start, size, size)).clip(0, 255).astype(np.uint8)
        batch[::7, size // 3 : size // 3 + 12, size // 4 : size // 2] = 250  # a bright scratch on every 7th image
        images[start:stop] = batch


class GpuSampler(threading.Thread):
    """nvidia-smi's utilisation.gpu every half second while the end-to-end run goes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples += [float(v) for v in out.split()[:1]]
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self.stopped.wait(0.5)


def end_to_end(args, folder: Path) -> dict:
    """`defectscan inspect` of the images on one long-lived worker (as a plant runs them), after a warm-up inspection of
    one shard of the same shape: the timed run pays neither the model's load nor its first compile, as the model-only
    rows do not (with a fresh local cluster per inspect, the load dominated the figure)."""
    url = f"sqlite:///{folder / 'bench.sqlite'}"
    store, warm = folder / "GPU-BENCH.zarr", folder / "GPU-WARM.zarr"
    began = time.perf_counter()
    write_store(store, args.images, args.size)
    write_store(warm, args.e2e_batch * 4, args.size)
    log(f"wrote {args.images} images of {args.size}x{args.size} to {store} in {time.perf_counter() - began:.1f} s")
    env = {**os.environ, "DEFECTSCAN_INSPECTION__RUNTIME": "jax", "DEFECTSCAN_INSPECTION__BATCH_SIZE": str(args.e2e_batch),
           "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": str(args.e2e_batch * 4), "DEFECTSCAN_INSPECTION__OUTPUT_DIR": str(folder / "masks")}
    if args.cpu:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cli = [sys.executable, "-m", "defectscan", "--database-url", url]
    for step in (["db", "upgrade"], ["models", "register", "--demo"], ["imagesets", "register", str(store)], ["imagesets", "register", str(warm)]):
        subprocess.run(cli + step, env=env, check=True, stdout=subprocess.DEVNULL)
    with dask_worker(folder, env, gpu=not args.cpu) as scheduler:
        inspect = cli + ["inspect", "--model", "demo", "--scheduler", scheduler, "--no-progress", "--imageset"]
        warmed = subprocess.run(inspect + [str(warm)], env=env, capture_output=True, text=True)
        if warmed.returncode != 0:
            log(warmed.stdout + warmed.stderr[-3000:])
            raise SystemExit(f"warm-up inspect failed ({warmed.returncode})")
        sampler = GpuSampler()
        if not args.cpu:
            sampler.start()
        began = time.perf_counter()
        result = subprocess.run(inspect + [str(store)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
        sampler.stopped.set()
    log(result.stdout.strip())
    if result.returncode != 0:
        log(result.stderr[-3000:])
        raise SystemExit(f"inspect failed ({result.returncode})")
    inspected, run_seconds, timings = _last_run(url)
    ran = timings.get("precision_run") or {}
    figures = {"images": args.images, "batch": args.e2e_batch, "inspected": inspected, "wall_s": round(wall, 1),
               "run_s": round(run_seconds, 1), "images_per_second": round(inspected / run_seconds, 1),
               # What the workers ran (the demo version records bfloat16; a device without its fast path runs float32).
               "precision_asked": timings.get("precision", "float32"),
               "precision": max(ran, key=ran.get) if ran else timings.get("precision", "float32"), "precision_run": ran,
               "gpu_utilisation_mean": round(sum(sampler.samples) / len(sampler.samples), 1) if sampler.samples else None}
    log(f"end to end: {figures['images_per_second']} img/s over the job run ({inspected} images in {figures['run_s']} s, a warm worker; "
        f"{figures['wall_s']} s with the client's start), ran {figures['precision']}, GPU utilisation "
        f"{'-' if figures['gpu_utilisation_mean'] is None else str(figures['gpu_utilisation_mean']) + ' %'}")
    return figures


def _last_run(url: str) -> tuple[int, float, dict]:
    import sqlalchemy as sa

    from defectscan.times import parse_iso

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        inspected, started, finished, timings = connection.execute(sa.text(
            "SELECT n_inspected, started_at, finished_at, timings FROM job_runs ORDER BY id DESC LIMIT 1")).one()
    engine.dispose()
    timings = json.loads(timings) if isinstance(timings, str) else (timings or {})
    return inspected, (parse_iso(str(finished)) - parse_iso(str(started))).total_seconds(), timings


@contextlib.contextmanager
def dask_worker(folder: Path, env: dict, *, gpu: bool):
    """`dask scheduler` and one `dask worker` (one thread, the JAX runtime, the GPU as a resource) for the inspections."""
    scheduler_file = folder / "scheduler.json"
    worker_env = {**env, "KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(scheduler_file),
                                   "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0"],
                                  env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        processes.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--name", "bench",
                                           "--host", "127.0.0.1", "--no-dashboard", *(["--resources", "GPU=1"] if gpu else [])],
                                          env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU, to prove the script")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--precisions", nargs="+", choices=list(POLICIES))
    parser.add_argument("--images", type=int)
    parser.add_argument("--e2e-batch", type=int)
    parser.add_argument("--seconds", type=float, help="timing per row")
    parser.add_argument("--matmul", type=int, help="side of the reference matmul")
    args = parser.parse_args()
    small = {"size": 256, "batches": [1, 8], "precisions": ["float32", "bfloat16"], "images": 48, "e2e_batch": 8, "seconds": 0.5, "matmul": 1024}
    full = {"size": 512, "batches": [1, 8, 32, 64, 128], "precisions": ["float32", "bfloat16", "float16"], "images": 4096, "e2e_batch": 64,
            "seconds": 2.0, "matmul": 8192}
    for key, value in (small if args.cpu else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    report = {"cpu": args.cpu, "size": args.size, "model_only": model_only(args)}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as folder:
        report["end_to_end"] = end_to_end(args, Path(folder))
    precision = report["end_to_end"]["precision"]
    same = [r for r in report["model_only"]["rows"] if r["precision"] == precision and r["batch"] == args.e2e_batch]
    if same:
        report["ratio"] = round(report["end_to_end"]["images_per_second"] / same[0]["images_per_second"], 3)
        log(f"ratio end to end / model only ({precision}, batch {args.e2e_batch}): {report['ratio']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("gpu-cpu-proof.json" if args.cpu else "gpu.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

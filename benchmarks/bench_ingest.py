"""Ingest throughput: files -> Zarr image set, against just reading and decoding the same files.

Generates N textured grayscale PNGs (default 2000 of 512x512: smooth texture, grain, a few
defect-like blobs, so compression figures mean something), then times on the same warm files:

  decode   read + decode every file with data/imagefiles.read_image in a thread pool (the floor)
  ingest   data/ingest.ingest_files into a new store (threads, then processes)
  read     every image back from the store, shard by shard (what the pipeline pays instead)

and reports MB/s of decoded pixels, ingest time relative to decoding, and the compression
ratio (decoded bytes / store bytes, and PNG bytes / store bytes).

    .venv/bin/python benchmarks/bench_ingest.py                 # 2000 x 512x512
    .venv/bin/python benchmarks/bench_ingest.py --n 500 --workers 4

Writes benchmarks/results/bench_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _textures(size: int, seed: int, count: int = 4) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    big = 2 * size
    out = []
    for k in range(count):
        smooth = ndimage.gaussian_filter(rng.standard_normal((big, big)), 6 + 4 * k)
        streaks = ndimage.gaussian_filter1d(rng.standard_normal((big, big)), 10, axis=k % 2)
        surface = smooth / smooth.std() + 0.7 * streaks / streaks.std()
        out.append(surface)
    return np.stack(out)


def _write_images(args: tuple[Path, int, int, int, int]) -> int:
    """Write images [start, stop) into folder; returns their PNG bytes."""
    folder, start, stop, size, seed = args
    from PIL import Image

    textures = _textures(size, seed)
    rng = np.random.default_rng(seed + start)
    total = 0
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(start, stop):
        t = textures[i % len(textures)]
        y0, x0 = rng.integers(0, size, size=2)
        surface = t[y0 : y0 + size, x0 : x0 + size].copy()
        surface += 0.35 * rng.standard_normal((size, size))  # sensor grain
        for _ in range(rng.integers(0, 3)):
            cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(4, 30)
            surface[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] -= 2.5
        pixels = np.clip(128 + 28 * surface, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).save(path)
        total += path.stat().st_size
    return total


def generate(folder: Path, n: int, size: int, workers: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    step = max(1, n // (workers * 4))
    jobs = [(folder, s, min(s + step, n), size, 1234) for s in range(0, n, step)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_write_images, jobs))


def time_decode(files: list[Path], workers: int) -> tuple[float, int]:
    from defectscan.data.imagefiles import read_image

    started = time.perf_counter()
    nbytes = 0
    with ThreadPoolExecutor(workers) as pool:
        for image in pool.map(read_image, files, chunksize=16):
            nbytes += image.nbytes
    return time.perf_counter() - started, nbytes


def time_ingest(folder: Path, out: Path, workers: int, processes: bool):
    from defectscan.data.ingest import IngestOptions, ingest_files

    shutil.rmtree(out, ignore_errors=True)
    result = ingest_files([folder], out, IngestOptions(lot="bench", workers=workers, processes=processes))
    assert not result.problems, list(result.problems)
    return result


def time_read_store(uri: str) -> tuple[float, int]:
    """Read every image back, shard by shard, as the pipeline does."""
    import zarr

    images = zarr.open_group(uri, mode="r")["images"]
    step = images.shards[0] if images.shards else images.chunks[0]
    started = time.perf_counter()
    nbytes = 0
    for start in range(0, images.shape[0], step):
        nbytes += images[start : start + step].nbytes
    return time.perf_counter() - started, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoder threads/processes")
    parser.add_argument("--dir", type=Path, help="work folder, kept (its PNGs are reused when there are --n of them); default: a temporary one")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    folder = work / "png"
    try:
        started = time.perf_counter()
        files = sorted(folder.glob("*.png"))
        if len(files) == args.n and args.dir is not None:
            png_bytes = sum(f.stat().st_size for f in files)
            print(f"reusing {args.n} PNGs in {folder} ({png_bytes / 1e6:.0f} MB)")
        else:
            png_bytes = generate(folder, args.n, args.size, args.workers)
            print(f"generated {args.n} PNGs of {args.size}x{args.size} ({png_bytes / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s")
            files = sorted(folder.glob("*.png"))

        time_decode(files[: min(50, len(files))], args.workers)  # warm imports and page cache
        decode_s, decoded = time_decode(files, args.workers)
        decode_1_s, _ = time_decode(files, 1)
        runs = {}
        for name, processes in (("threads", False), ("processes", True)):
            result = time_ingest(folder, work / f"{name}.zarr", args.workers, processes)
            runs[name] = result
        best = min(runs, key=lambda k: runs[k].seconds)
        stored = runs[best].stored_bytes
        read_s, read_bytes = time_read_store(runs[best].uri)
        assert read_bytes == decoded

        figures = {
            "images": args.n,
            "size": args.size,
            "workers": args.workers,
            "decoded_mb": decoded / 1e6,
            "png_mb": png_bytes / 1e6,
            "decode_s": decode_s,
            "decode_mb_s": decoded / 1e6 / decode_s,
            "decode_1_thread_mb_s": decoded / 1e6 / decode_1_s,
            **{f"ingest_{k}_s": r.seconds for k, r in runs.items()},
            **{f"ingest_{k}_mb_s": r.mb_per_second for k, r in runs.items()},
            "ingest_vs_decode": runs[best].seconds / decode_s,
            "read_store_mb_s": decoded / 1e6 / read_s,
            "store_mb": stored / 1e6,
            "compression_ratio_decoded": decoded / stored,
            "compression_ratio_png": png_bytes / stored,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        }
        print(f"decode only      {figures['decode_mb_s']:8.1f} MB/s  ({decode_s:.2f} s, {args.workers} threads; 1 thread {figures['decode_1_thread_mb_s']:.1f} MB/s)")
        for name, r in runs.items():
            print(f"ingest {name:10}{r.mb_per_second:8.1f} MB/s  ({r.seconds:.2f} s, {r.seconds / decode_s:.2f}x decode time)")
        print(f"read back        {figures['read_store_mb_s']:8.1f} MB/s  ({read_s:.2f} s, shard by shard from the store)")
        print(f"store            {stored / 1e6:8.1f} MB: {figures['compression_ratio_decoded']:.2f}x smaller than the pixels, {figures['compression_ratio_png']:.2f}x vs the PNGs")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bench_ingest.json").write_text(json.dumps(figures, indent=2))
        print(f"wrote {RESULTS / 'bench_ingest.json'}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

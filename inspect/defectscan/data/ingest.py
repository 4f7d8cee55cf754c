"""Image files -> a new Zarr image set, decoded in parallel, written shard by shard, then registered.

The store is written under a temporary name next to `out` and renamed only when complete, so an
interrupted ingest never leaves a half-written store where a job could find it. Ingesting the
same files (same names, sizes, modification times and options) into the same store again does
nothing and reuses the registration. Bad files are reported by name and skipped; good ones go in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectscan import __version__
from defectscan.data import imageset as layout
from defectscan.data.imagefiles import WIDE_COLOUR_PNG, open_pillow, read_image, read_mask, wide_colour_png
from defectscan.data.problems import ProblemLog
from defectscan.data.sources import Source, Sources, collect_sources
from defectscan.errors import DataError
from defectscan.times import iso_utc

# (advance, total): called as images are processed, for a progress bar.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class IngestOptions:
    lot: str | None = None
    line: str | None = None
    product: str | None = None
    camera: str | None = None
    # One capture time for every image; None takes each file's modification time.
    acquired_at: dt.datetime | None = None
    kind: str = "stack"
    # Pad smaller images (bottom and right, with 0) to the largest instead of skipping them.
    pad: bool = False
    workers: int | None = None
    # Decode in processes instead of threads (see benchmarks/bench_ingest.py for which is faster).
    processes: bool = False
    # Significant bits of uint16 images (12 for a 12-bit camera), recorded with the set's registration.
    bit_depth: int | None = None

    def provenance(self) -> dict[str, str | None]:
        return {"lot": self.lot, "line": self.line, "product": self.product, "camera": self.camera}


@dataclass
class IngestResult:
    uri: str
    n_images: int
    problems: ProblemLog
    # True when the store already held exactly these files and nothing was written.
    reused: bool = False
    seconds: float = 0.0
    decoded_bytes: int = 0
    stored_bytes: int = 0
    keys: list[str] = field(default_factory=list)
    # The brightest pixel written (None for a reused store): 16-bit images that never pass 4095 are 12-bit data.
    peak: int | None = None
    dtype: str | None = None

    @property
    def mb_per_second(self) -> float:
        return self.decoded_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def bit_depth_problem(self, bit_depth: int | None) -> str | None:
        """Why 16-bit images that look like data of fewer bits are not registered without a bit depth: inspected as
        16-bit, 0..4095 becomes 0..16 of 255, an image nearly black to the model, and a set once registered keeps it."""
        if bit_depth is not None or self.dtype != "uint16" or self.peak is None or self.peak >= 2**12:
            return None
        bits = max(9, int(self.peak).bit_length())
        return (f"{self.uri}: every pixel of these 16-bit images is {self.peak} or less, which inspected as 16-bit data is nearly "
                f"black; the store is kept, not registered: ingest again with --bit-depth {bits} if the camera gives {bits}-bit "
                "data, or --bit-depth 16 if it is 16-bit data")


def ingest(session, paths, out, options: IngestOptions, *, store_dir: Path | None = None, strict: bool = False, on_progress: Progress | None = None):
    """Ingest files into a store and register it: returns (IngestResult, Registration)."""
    from defectscan.data.register import register_store

    result = ingest_files(paths, out, options, store_dir=store_dir, strict=strict, on_progress=on_progress)
    problem = result.bit_depth_problem(options.bit_depth)
    if problem:
        raise DataError(problem)
    try:
        registration = register_store(session, result.uri, bit_depth=options.bit_depth)
    except DataError as exc:
        if result.reused:
            raise
        # Refused (another image set was registered at this location, its store since removed): the store this
        # call wrote goes, so a registered location never holds other images than its records describe.
        shutil.rmtree(result.uri, ignore_errors=True)
        raise DataError(f"{exc}; the store just written was removed") from None
    return result, registration


def ingest_files(
    paths,
    out: str | Path | None,
    options: IngestOptions,
    *,
    store_dir: Path | None = None,
    strict: bool = False,
    on_progress: Progress | None = None,
) -> IngestResult:
    """Write the image files in `paths` into a new image set at `out` (default: under store_dir)."""
    if options.kind not in layout.KINDS:
        raise DataError(f"image set kind {options.kind!r} is not known; expected one of {', '.join(layout.KINDS)}")
    started = time.perf_counter()
    problems = ProblemLog(strict=strict)
    sources = collect_sources(list(paths), problems)
    if not sources.items:
        raise DataError(_nothing_left("no image files to ingest", problems))
    digest = _source_digest(sources, options)
    if out is None:
        if store_dir is None:
            raise DataError("no output store given: pass --out STORE")
        out = _default_store(Path(store_dir), options.lot, digest)
    out = Path(out).expanduser().resolve()
    if out.exists():
        return _reuse(out, digest, problems, started)
    if options.kind == "strip" and len(sources.items) != 1:
        raise DataError(f"a strip image set holds exactly one image; got {len(sources.items)} files")

    workers = options.workers or os.cpu_count() or 1
    pool: Executor
    if options.processes:
        import multiprocessing

        # TensorFlow may be loaded in this process and is not fork-safe.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(workers)
    temporary = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pool:
            accepted, geometry = _probe_all(pool, sources.items, problems, options.pad)
            if not accepted:
                raise DataError(_nothing_left("no usable images", problems))
            _check_bit_depth(str(out), geometry.dtype, options.bit_depth)
            writer = _Writer(temporary, options, sources, geometry, len(accepted))
            try:
                for source, image, label in _decoded(pool, accepted, sources.labelled, problems, on_progress, writer.window):
                    writer.add(source, image, label)
                n_images = writer.finish(digest, problems)
            finally:
                writer.close()
        if n_images == 0:
            raise DataError(_nothing_left("no usable images", problems))
        try:
            os.replace(temporary, out)
        except OSError:
            if not out.exists():
                raise
            # Another ingest of the same target finished first: same inputs are fine, others refused.
            return _reuse(out, digest, problems, started)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return IngestResult(
        uri=str(out),
        n_images=n_images,
        problems=problems,
        seconds=time.perf_counter() - started,
        decoded_bytes=writer.decoded_bytes,
        stored_bytes=_disk_usage(out),
        keys=writer.keys,
        peak=writer.peak,
        dtype=geometry.dtype,
    )


def _default_store(store_dir: Path, lot: str | None, digest: str) -> Path:
    """Under the data directory, named by lot and inputs; where an earlier version named it after the lot as given
    (before `_file_name_part`), that store, so that ingesting the same files again still reuses it."""
    named = store_dir / "imagesets" / f"{_file_name_part(lot) or 'imageset'}-{digest[:12]}.zarr"
    earlier = store_dir / "imagesets" / f"{lot}-{digest[:12]}.zarr"
    if lot and earlier != named and earlier.exists() and earlier.resolve().is_relative_to(store_dir.resolve()):
        return earlier
    return named


def _file_name_part(text: str | None) -> str:
    """A lot as part of a store's file name: a lot `2026/03/L042` made folders, one starting with `/` a store outside
    the data directory. The lot itself is kept as given in the set's attributes and row."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").lstrip("._")[:80]


def _check_bit_depth(uri: str, dtype: str, bit_depth: int | None) -> None:
    """Refused before anything is written, rather than by the registration after."""
    from defectscan.data.register import check_bit_depth

    check_bit_depth(uri, dtype, bit_depth)


def _nothing_left(what: str, problems: ProblemLog) -> str:
    listed = "; ".join(str(p) for p in list(problems)[:10])
    more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    return f"{what} ({problems.summary()}): {listed}{more}" if problems else what


def _source_digest(sources: Sources, options: IngestOptions) -> str:
    """Identifies the inputs: every file's key, size and mtime, the labels and the options."""
    h = hashlib.sha256()
    settings = {
        "format": layout.FORMAT_VERSION,
        "kind": options.kind,
        "pad": options.pad,
        "provenance": options.provenance(),
        "acquired_at": iso_utc(options.acquired_at) if options.acquired_at else None,
        "classes": sources.classes,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for source in sources.items:
        for path in (source.path, source.label_path):
            if path is None:
                h.update(b"-\n")
                continue
            stat = path.stat()
            h.update(os.fsencode(path) + f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        h.update(f"{source.key}\t{source.class_index}\n".encode())
    return h.hexdigest()


def _reuse(out: Path, digest: str, problems: ProblemLog, started: float) -> IngestResult:
    """An existing store: fine if it holds exactly these inputs (idempotent re-ingest), else refused."""
    group = layout.open_group(str(out))
    meta = dict(group.attrs).get(layout.META_ATTR) or {}
    if not isinstance(meta, dict) or meta.get("source_digest") != digest:
        raise DataError(
            f"{out}: already exists and holds other images (from different files or options); "
            "choose another --out, or delete it first"
        )
    layout.describe(group, str(out))
    earlier = ProblemLog()
    for problem in meta.get("skipped", []):
        earlier.add(problem["path"], problem["reason"])
    images = group[layout.IMAGES]
    keys = layout.read_keys(group, images.shape[0] if images.ndim == 3 else 1)
    return IngestResult(str(out), len(keys), earlier, reused=True, seconds=time.perf_counter() - started, stored_bytes=_disk_usage(out), keys=keys,
                        peak=meta.get("peak"), dtype=str(images.dtype))


# ---- probing: sizes and bit depths before anything is decoded --------------------------------


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    dtype: str


def _probe(path: Path) -> tuple[int, int, str] | str:
    """(height, width, dtype) from the file header, or the reason it cannot be an image."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                page = tiff.pages[0]
                return int(page.imagelength), int(page.imagewidth), "uint16" if page.dtype.itemsize == 2 else "uint8"
        from PIL import UnidentifiedImageError

        if wide_colour_png(path):
            return WIDE_COLOUR_PNG

        try:
            with open_pillow(path) as image:
                width, height = image.size
                wide = image.mode.startswith("I;16") or image.mode == "I"
                return height, width, "uint16" if wide else "uint8"
        except UnidentifiedImageError:
            return "not an image file (format not recognised)"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem, not the ingest's
        return f"corrupt or unreadable image header: {exc}"


def _probe_all(pool: Executor, items: list[Source], problems: ProblemLog, pad: bool) -> tuple[list[Source], Geometry | None]:
    """Keep the sources whose size and bit depth fit one stack; report the others by name."""
    probed = []
    for source, found in zip(items, pool.map(_probe, [s.path for s in items], chunksize=64)):
        if isinstance(found, str):
            problems.add(source.path, found)
        elif min(found[0], found[1]) < layout.MIN_IMAGE_SIZE:
            problems.add(
                source.path,
                f"too small: {found[0]}x{found[1]} pixels; the model needs at least {layout.MIN_IMAGE_SIZE}x{layout.MIN_IMAGE_SIZE}",
            )
        else:
            probed.append((source, found))
    if not probed:
        return [], None
    dtype = Counter(found[2] for _, found in probed).most_common(1)[0][0]
    bits = {"uint8": "8-bit", "uint16": "16-bit"}
    same_depth = []
    for source, found in probed:
        if found[2] != dtype:
            problems.add(source.path, f"different bit depth: {bits[found[2]]} image in a stack of {bits[dtype]} images")
        else:
            same_depth.append((source, found))
    if pad:
        height = max(found[0] for _, found in same_depth)
        width = max(found[1] for _, found in same_depth)
        return [s for s, _ in same_depth], Geometry(height, width, dtype)
    # Without padding, the most common size wins; the others are listed, not silently resized.
    height, width = Counter((f[0], f[1]) for _, f in same_depth).most_common(1)[0][0]
    accepted = []
    for source, found in same_depth:
        if (found[0], found[1]) != (height, width):
            problems.add(source.path, f"different size: {found[0]}x{found[1]}, the stack's is {height}x{width} (use --pad to pad to the largest)")
        else:
            accepted.append(source)
    return accepted, Geometry(height, width, dtype)


# ---- decoding ----------------------------------------------------------------------------------


def _decode(source: Source, labelled: bool) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(image, label mask or None, None) or (None, None, reason); runs in a worker."""
    try:
        image = read_image(source.path)
    except DataError as exc:
        return None, None, _reason(exc, source.path)
    label = None
    if labelled:
        if source.label_path is None:
            label = np.zeros(image.shape, dtype=np.uint8)
        else:
            try:
                mask = read_mask(source.label_path)
            except DataError as exc:
                return None, None, f"label image {source.label_path.name}: {_reason(exc, source.label_path)}"
            if mask.shape != image.shape:
                return None, None, f"label image {source.label_path.name} is {mask.shape[0]}x{mask.shape[1]}, the image {image.shape[0]}x{image.shape[1]}"
            label = np.where(mask > 0, np.uint8(source.class_index), np.uint8(0))
    return image, label, None


def _reason(exc: DataError, path: Path) -> str:
    return str(exc).removeprefix(f"{path}: ")


def _decoded(
    pool: Executor,
    items: list[Source],
    labelled: bool,
    problems: ProblemLog,
    on_progress: Progress | None,
    window: int,
) -> Iterator[tuple[Source, np.ndarray, np.ndarray | None]]:
    """Decoded images in input order, at most `window` in flight so memory stays bounded."""
    pending: deque[tuple[Source, Future]] = deque()
    queue = iter(items)
    total = len(items)
    for source in queue:
        pending.append((source, pool.submit(_decode, source, labelled)))
        if len(pending) >= window:
            break
    while pending:
        source, future = pending.popleft()
        following = next(queue, None)
        if following is not None:
            pending.append((following, pool.submit(_decode, following, labelled)))
        image, label, reason = future.result()
        if on_progress is not None:
            on_progress(1, total)
        if reason is not None:
            problems.add(source.path, reason)
            continue
        yield source, image, label


# ---- writing -------------------------------------------------------------------------------------


class _Writer:
    """Buffers one shard of decoded images and writes it whole (a writer owns whole shards)."""

    def __init__(self, path: Path, options: IngestOptions, sources: Sources, geometry: Geometry, capacity: int):
        self.options = options
        self.sources = sources
        self.geometry = geometry
        self.kind = options.kind
        self.keys: list[str] = []
        self.times: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.decoded_bytes = 0
        self.peak = 0
        self.written = 0
        h, w = geometry.height, geometry.width
        self.group = layout.create_image_set(path, self.kind, (h, w), geometry.dtype, n=capacity, labelled=sources.labelled)
        self.images = layout.writable(self.group, layout.IMAGES)
        self.labels = layout.writable(self.group, layout.LABELS) if sources.labelled else None
        self.shard_len = self.images.shards[0] if self.kind == "stack" and self.images.shards else 1
        # Two shard buffers: one is filled while a background thread compresses and writes the
        # other (compression releases the GIL, decoding PNGs mostly does not).
        self._spare: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.buffer, self.label_buffer = self._new_buffers() if self.kind == "stack" else (None, None)
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="ingest-writer")
        self._pending: Future | None = None
        self.filled = 0

    def _new_buffers(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._spare:
            return self._spare.pop()
        h, w = self.geometry.height, self.geometry.width
        labels = np.zeros((self.shard_len, h, w), dtype=np.uint8) if self.labels is not None else None
        return np.zeros((self.shard_len, h, w), dtype=self.geometry.dtype), labels

    @property
    def window(self) -> int:
        """Images decoded ahead of the writer: two shards keep decoding going while one is written
        (measured: one shard ahead left the decoders idle during each write)."""
        return max(2 * self.shard_len, 2 * (self.options.workers or os.cpu_count() or 1))

    def add(self, source: Source, image: np.ndarray, label: np.ndarray | None) -> None:
        h, w = image.shape
        if image.dtype != np.dtype(self.geometry.dtype):
            raise DataError(f"{source.path}: decoded as {image.dtype} though its header said {self.geometry.dtype}")
        self.keys.append(source.key)
        self.times.append(layout.to_micros(self._time(source)))
        self.sizes.append((h, w))
        self.decoded_bytes += image.nbytes
        self.peak = max(self.peak, int(image.max()))
        if self.kind == "strip":
            self.images[:, :] = image
            if self.labels is not None and label is not None:
                self.labels[:, :] = label
            self.written = 1
            return
        slot = self.filled
        if (h, w) != (self.geometry.height, self.geometry.width):
            self.buffer[slot] = 0
            if self.label_buffer is not None:
                self.label_buffer[slot] = 0
        self.buffer[slot, :h, :w] = image
        if self.label_buffer is not None and label is not None:
            self.label_buffer[slot, :h, :w] = label
        self.filled += 1
        if self.filled == self.shard_len:
            self._flush()

    def _time(self, source: Source) -> dt.datetime:
        if self.options.acquired_at is not None:
            return self.options.acquired_at
        return dt.datetime.fromtimestamp(source.path.stat().st_mtime, tz=dt.timezone.utc)

    def _flush(self) -> None:
        if self.filled == 0:
            return
        self._wait()
        start, count = self.written, self.filled
        buffers = (self.buffer, self.label_buffer)
        self._pending = self._writes.submit(self._write, start, count, buffers)
        self.written += count
        self.filled = 0
        self.buffer, self.label_buffer = self._new_buffers()

    def _write(self, start: int, count: int, buffers: tuple[np.ndarray, np.ndarray | None]) -> None:
        images, labels = buffers
        self.images[start : start + count] = images[:count]
        if self.labels is not None:
            self.labels[start : start + count] = labels[:count]
        self._spare.append(buffers)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self._writes.shutdown(wait=True)

    def finish(self, digest: str, problems: ProblemLog) -> int:
        """Write the per-image arrays and the attributes, the last step; returns the image count."""
        if self.kind == "stack":
            self._flush()
            self._wait()
            n = self.written
            if n == 0:
                return 0
            h, w = self.geometry.height, self.geometry.width
            self.images.resize((n, h, w))
            if self.labels is not None:
                self.labels.resize((n, h, w))
        n = self.written
        if n == 0:
            return 0
        acquired = self.options.acquired_at or layout.from_micros(min(self.times[:n]))
        layout.finish_image_set(
            self.group,
            keys=self.keys[:n],
            times=self.times[:n],
            sizes=self.sizes[:n],
            attrs={**self.options.provenance(), "acquired_at": iso_utc(acquired)},
            classes=self.sources.classes if self.sources.labelled else None,
            meta={
                "padded": self.options.pad,
                "source_digest": digest,
                "peak": self.peak,
                "skipped": [{"path": p.path, "reason": p.reason} for p in problems],
                "written_by": f"defectscan {__version__} ingest",
            },
        )
        return n


def _disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

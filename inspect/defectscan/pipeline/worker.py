"""What runs on a Dask worker: the per-process model cache, fixed-shape batches, shard tasks.

The model runtime (TensorFlow, or Keras on JAX) is imported here only, inside functions that run
on workers, never in the client. A worker loads each model once per runtime and precision (cache
keyed by the file's sha256, checked before loading, the runtime and the recorded precision), calls
it through one tf.function or jax.jit with one input shape, and sends back small results.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectscan.data.imageset import vanished_chunks
from defectscan.errors import DataError, ModelError, StorageError
from defectscan.native_logs import quiet_tensorflow_startup
from defectscan.model.export import verify_sha256
from defectscan.model.preprocess import InputContract, scale_ops, to_model_pixels
from defectscan.pipeline.plan import StackShard, Tile, TileShard
from defectscan.model.verdict import ImageResult, VerdictRules, judge, to_uint8_ops


@dataclass(frozen=True)
class ModelRef:
    """Everything a worker needs to load and run a registered model; pickles small."""

    uri: str
    sha256: str
    classes: tuple[str, ...]
    batch_size: int
    # The registered input contract: the multiple inputs are padded to.
    contract: InputContract = InputContract()
    # The Keras backend to run it on (inspection.runtime): "tensorflow" or "jax".
    runtime: str = "tensorflow"
    # The precision recorded with the version (model/precision.py); the worker runs it where its hardware is fast at it.
    precision: str = "float32"
    # inspection.max_batch_pixels: a model call takes fewer than batch_size images when they are large.
    max_batch_pixels: int | None = None


@dataclass(frozen=True)
class ArrayRef:
    uri: str
    path: str
    # Significant bits of a uint16 image array (12 for a 12-bit camera); None: the dtype's own.
    bit_depth: int | None = None
    # Registered with --no-chunk-check (its writer leaves out chunks equal to the fill value): a chunk not
    # stored is read as the fill value, not reported as gone.
    fill_missing: bool = False


@dataclass
class ShardResult:
    image_set_id: int
    results: list[ImageResult]
    timings: dict[str, float] = field(default_factory=dict)
    # The precisions the shard's images were scored in on their workers (recorded bfloat16 runs as
    # float32 on a worker without bfloat16 units); empty when nothing was scored.
    precisions: tuple[str, ...] = ()
    # Why the machinery could not finish the shard (a full disk): returned, not raised, so the
    # worker does not log a traceback for what the client reports in one line; no results then.
    failure: str | None = None


# Worker processes import this module before their first task: TensorFlow loads quietly there too.
quiet_tensorflow_startup()

log = logging.getLogger(__name__)

# (sha256, runtime, precision) -> the model's two compiled programs (_Programs); one per worker process.
_MODELS: dict[tuple[str, str, str], Any] = {}
# Recorded precisions this process runs in float32 instead: said once per process, not per model or batch.
_FELL_BACK: set[str] = set()


@dataclass(frozen=True)
class _Programs:
    # (B, H, W, 1) uint8 pixels -> (B, C, H, W) uint8 scores: scaling, the model and the rounding in one
    # compiled program, so the worker's own numpy work per batch is a copy, and a GPU gets a quarter of the
    # bytes each way that float32 would take.
    scores: Any
    # (B, H, W, 1) float32 model input -> (B, C, H, W) float32 probabilities (runtime parity checks, tiles tests).
    probabilities: Any
    # The precision the model runs in on this worker (worker_precision).
    precision: str


def verify_model_file(ref: ModelRef) -> None:
    """Refuse a model file that is not the one registered (before any work is planned)."""
    verify_sha256(ref.uri, ref.sha256)


# A worker's task threads share its models: one loads a model while the others wait, and one model
# call runs at a time (the runtimes' own thread pools use the cores), while another thread's shard
# reads its first batch or writes its last: shards overlap as batches overlap inside one.
_LOADING = threading.Lock()
_CALLING = threading.Lock()


def cached_model(ref: ModelRef) -> _Programs:
    key = (ref.sha256, ref.runtime, ref.precision)
    with _LOADING:
        programs = _MODELS.get(key)
        if programs is None:
            programs = _load(ref)
            _MODELS[key] = programs
    return programs


def worker_precision(ref: ModelRef) -> str:
    """The precision this worker runs `ref` in: the recorded one where the hardware runs it fast, else float32 (logged once)."""
    from defectscan.model.precision import runnable

    if ref.precision == "float32":
        return "float32"
    precision, reason = runnable(ref.precision, gpu=_has_gpu(ref.runtime))
    if reason and ref.precision not in _FELL_BACK:
        _FELL_BACK.add(ref.precision)
        log.warning("worker pid %d runs models recorded in %s in float32: %s", os.getpid(), ref.precision, reason)
    return precision


def _has_gpu(runtime: str) -> bool:
    from defectscan.pipeline.cluster import jax_gpus, tensorflow_gpus

    return (jax_gpus if runtime == "jax" else tensorflow_gpus)() > 0


def _load(ref: ModelRef) -> _Programs:
    from defectscan.model.precision import load_in_precision

    use_backend(ref.runtime)
    precision = worker_precision(ref)
    model = load_in_precision(ref.uri, precision, expected_sha256=ref.sha256)
    import keras

    def scores(pixels):
        # transposed before the cast: a uint8 transpose falls off oneDNN (and says so on stderr)
        return to_uint8_ops(keras.ops.transpose(model(scale_ops(pixels), training=False), (0, 3, 1, 2)))

    def probabilities(batch):
        return keras.ops.transpose(keras.ops.cast(model(batch, training=False), "float32"), (0, 3, 1, 2))

    return _Programs(_compiled(scores, ref.runtime), _compiled(probabilities, ref.runtime), precision)


def _compiled(function, runtime: str):
    """One compiled program per input shape (every call of a shard has the same one)."""
    if runtime == "jax":
        import jax

        return jax.jit(function)
    import tensorflow as tf

    return tf.function(function, reduce_retracing=True)


def use_backend(runtime: str) -> None:
    """Make Keras in this process run on `runtime`'s backend: chosen before Keras is first imported
    (the worker's first model), and a process already running the other one says so."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = runtime
        return
    import keras

    if keras.backend.backend() != runtime:
        raise ModelError(
            f"inspection.runtime {runtime}: this worker process already runs Keras on {keras.backend.backend()}; a worker runs one "
            f"runtime: start the workers for {runtime} (a local cluster does; `dask worker` with KERAS_BACKEND={runtime})"
        )


def score_images(ref: ModelRef, images: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """(N, H, W) pixels -> (N, C, H, W) uint8 scores, in calls of one fixed (batch_size, H16, W16, 1) shape.

    Scaling and padding are the model's own (defectscan.model.preprocess), so the pipeline and
    `defectscan evaluate` see the same numbers.
    """
    pixels, (height, width) = ref.contract.pad(to_model_pixels(images, bit_depth))
    return _score(ref, pixels)[:, :, :height, :width]


def _score(ref: ModelRef, pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) uint8 padded pixels -> (N, C, H, W) uint8 scores."""
    return _batched(cached_model(ref).scores, pixels, calls_of(ref, pixels.shape[1:3]), len(ref.classes), np.uint8)


def probabilities(ref: ModelRef, x: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) model input -> (N, C, H, W) float32 probabilities, batch by batch."""
    return _batched(cached_model(ref).probabilities, x, calls_of(ref, x.shape[1:3]), len(ref.classes), np.float32)


def calls_of(ref: ModelRef, shape: tuple[int, int]) -> int:
    """Images per model call for images of `shape` (padded): batch_size, fewer where they pass max_batch_pixels, at least one."""
    if ref.max_batch_pixels is None:
        return ref.batch_size
    return max(1, min(ref.batch_size, ref.max_batch_pixels // (int(shape[0]) * int(shape[1]))))


def _batched(program, x: np.ndarray, batch_size: int, channels: int, dtype) -> np.ndarray:
    n = len(x)
    out = np.empty((n, channels, *x.shape[1:3]), dtype=dtype)
    batch = np.zeros((batch_size, *x.shape[1:]), dtype=x.dtype)
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        batch[: len(chunk)] = chunk
        batch[len(chunk) :] = 0  # the last batch is padded to the same shape
        with _CALLING:
            out[start : start + len(chunk)] = np.asarray(program(batch))[: len(chunk)]
    return out


def window_input(image, tile: Tile, shape: tuple[int, int], *, contract: InputContract, bit_depth: int | None = None,
                 fill_missing: bool = False) -> np.ndarray:
    """The model's pixels (H, W, 1) uint8 for one tile's window of a (H, W) image array.

    A window may reach into the padding below/right of the image: it is padded as the whole
    image would be, so tiles see exactly what whole-image inference sees.
    """
    height, width = image.shape
    wy, wx = tile.window
    part = np.asarray(image[wy : min(wy + shape[0], height), wx : min(wx + shape[1], width)])
    import zarr

    gone = vanished_chunks(image, part, (wy, wx)) if isinstance(image, zarr.Array) and not fill_missing else None
    if gone:
        raise DataError(f"{gone.describe()}, stored when the strip was registered")
    return contract.pad(to_model_pixels(part[None], bit_depth))[0][0]


def _open(ref: ArrayRef, mode: str):
    import zarr

    try:
        return zarr.open_array(ref.uri, path=ref.path, mode=mode)
    except Exception as exc:  # zarr raises several types for a missing or foreign store
        raise DataError(f"{ref.uri}: cannot open array '{ref.path}': {exc}") from None


@contextmanager
def _writing(output: ArrayRef) -> Iterator[None]:
    """Name the store and its free space when the filesystem refuses a write (a full disk, above all)."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{output.uri}: cannot write score maps: {exc.strerror or exc}{free_space(output.uri)}") from None


def free_space(uri: str) -> str:
    """"; N MB free on PATH" for a local path (its nearest existing folder), "" for a URL."""
    if "://" in uri:
        return ""
    path = Path(uri)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f"; {free / 1e6:.1f} MB free on {path}"


@contextmanager
def _reading(source: ArrayRef) -> Iterator[None]:
    """A storage fault under the image set (EIO, a network timeout) is the machinery's, not the images':
    a StorageError, which leaves them pending, never an `error` verdict."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{source.uri}: cannot read images: {exc.strerror or exc}") from None


def _read_images(images, start: int, stop: int, fill_missing: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """Read [start, stop); an image whose chunk cannot be decoded, or is no longer stored (unless `fill_missing`),
    is zero-filled and reported (an OSError, the storage's, is raised: see `_reading`)."""
    block, errors = _decode_images(images, start, stop)
    if fill_missing:
        return block, errors
    gone = vanished_chunks(images, block, (start, 0, 0))
    for position in gone.images:
        errors.setdefault(position, f"image {position} of {images.store_path}: {gone.describe()}, stored when the set was registered")
    return block, errors


def _decode_images(images, start: int, stop: int) -> tuple[np.ndarray, dict[int, str]]:
    try:
        return np.asarray(images[start:stop]), {}
    except OSError:
        raise
    except Exception:  # a corrupt chunk somewhere: find which images it hits
        pass
    block = np.zeros((stop - start, *images.shape[1:]), dtype=images.dtype)
    errors: dict[int, str] = {}
    for position in range(start, stop):
        try:
            block[position - start] = images[position]
        except OSError:
            raise
        except Exception as exc:
            errors[position] = f"cannot read image {position} of {images.store_path}: {type(exc).__name__}: {exc}"
    return block, errors


def inspect_stack_shard(shard: StackShard, source: ArrayRef, output: ArrayRef, model: ModelRef, rules: VerdictRules) -> ShardResult:
    """Run the model over whole images [start, stop), write their score maps, judge the `todo` ones.

    Batch by batch, in three overlapping stages: a reader thread decodes the next batch and a writer
    thread writes and judges the previous one while the model computes this one, so the stages'
    seconds hide behind the model's. At most four batches are in memory (one read ahead, one in the
    model, one being written, one waiting for the writer).
    """
    timings = {"read_s": 0.0, "predict_s": 0.0, "write_s": 0.0, "postprocess_s": 0.0}
    began = time.perf_counter()
    images = _open(source, "r")
    with _writing(output):
        scores_out = _open(output, "r+")
    todo = set(shard.todo)
    results: list[ImageResult] = []
    step = model.batch_size
    bounds = [(start, min(start + step, shard.stop)) for start in range(shard.start, shard.stop, step)]

    def read(bound: tuple[int, int]) -> tuple[np.ndarray, dict[int, str]]:
        t0 = time.perf_counter()
        with _reading(source):
            block = _read_images(images, *bound, fill_missing=source.fill_missing)
        timings["read_s"] += time.perf_counter() - t0
        return block

    def write_and_judge(bound: tuple[int, int], scores: np.ndarray, errors: dict[int, str]) -> None:
        t0 = time.perf_counter()
        with _writing(output):
            if todo.issuperset(range(*bound)) and not errors:
                scores_out[bound[0] : bound[1]] = scores
            else:
                # A rerun: the maps of images already recorded stay those their verdicts came from. An image that
                # could not be read keeps its map too: a redo keeps its verdict (pipeline/record.py), not a blank map.
                for position in sorted(todo.intersection(range(*bound)) - set(errors)):
                    scores_out[position] = scores[position - bound[0]]
        t1 = time.perf_counter()
        timings["write_s"] += t1 - t0
        for position in range(*bound):
            if position not in todo:
                continue
            if position in errors:
                results.append(ImageResult(position=position, verdict="error", error=errors[position]))
            else:
                results.append(judge(position, scores[position - bound[0]], list(model.classes), rules))
        timings["postprocess_s"] += time.perf_counter() - t1

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        ahead = reader.submit(read, bounds[0])
        written = None
        try:
            for i, bound in enumerate(bounds):
                block, errors = ahead.result()
                if i + 1 < len(bounds):
                    ahead = reader.submit(read, bounds[i + 1])
                t0 = time.perf_counter()
                scores = score_images(model, block, source.bit_depth)
                for position in errors:
                    scores[position - bound[0]] = 0
                timings["predict_s"] += time.perf_counter() - t0
                if written is not None:
                    written.result()
                written = writer.submit(write_and_judge, bound, scores, errors)
            written.result()
        except StorageError as exc:
            return ShardResult(shard.image_set_id, [], timings, failure=str(exc))
    per_image_ms = 1000.0 * (time.perf_counter() - began) / shard.size
    for result in results:
        if result.verdict != "error":
            result.duration_ms = per_image_ms
    results.sort(key=lambda r: r.position)
    return ShardResult(shard.image_set_id, results, timings, precisions=(cached_model(model).precision,))


def inspect_tiles(shard: TileShard, source: ArrayRef, output: ArrayRef, model: ModelRef) -> dict[str, Any]:
    """Score each tile's window and write its core into the strip's (C, H, W) map; timings, the precision it
    ran in, and a failure (the storage's: reads or writes) or an error (a chunk that cannot be decoded)."""
    began = time.perf_counter()
    image = _open(source, "r")
    try:
        with _reading(source):
            windows = np.stack([window_input(image, tile, shard.window_shape, contract=model.contract, bit_depth=source.bit_depth,
                                             fill_missing=source.fill_missing)
                                for tile in shard.tiles])
    except StorageError as exc:
        return {"read_s": time.perf_counter() - began, "failure": str(exc)}
    except Exception as exc:  # a corrupt chunk: a property of the data, as for a stack's image
        return {"read_s": time.perf_counter() - began, "error": f"cannot read {source.uri}: {type(exc).__name__}: {exc}"}
    read_s = time.perf_counter() - began

    began = time.perf_counter()
    scores = _score(model, windows)
    predict_s = time.perf_counter() - began

    began = time.perf_counter()
    try:
        with _writing(output):
            out = _open(output, "r+")
            for i, tile in enumerate(shard.tiles):
                y0, x0, y1, x1 = tile.core
                wy, wx = tile.window
                out[:, y0:y1, x0:x1] = scores[i, :, y0 - wy : y1 - wy, x0 - wx : x1 - wx]
    except StorageError as exc:
        return {"read_s": read_s, "predict_s": predict_s, "failure": str(exc)}
    return {"read_s": read_s, "predict_s": predict_s, "write_s": time.perf_counter() - began, "precision": cached_model(model).precision}


def judge_strip(image_set_id: int, output: ArrayRef, model: ModelRef, rules: VerdictRules, *tile_timings: dict[str, Any]) -> ShardResult:
    """Label defects over the whole strip map, so a defect across tile borders is one defect.

    Runs after every tile of the strip: the tile tasks' timings are passed in, which makes them dependencies.
    """
    timings: dict[str, float] = {}
    for tile in tile_timings:
        for name, seconds in tile.items():
            if name not in ("failure", "error", "precision"):
                timings[name] = timings.get(name, 0.0) + seconds
    failures = [tile["failure"] for tile in tile_timings if "failure" in tile]
    if failures:
        return ShardResult(image_set_id, [], timings, failure=failures[0])
    errors = [tile["error"] for tile in tile_timings if "error" in tile]
    if errors:
        return ShardResult(image_set_id, [ImageResult(position=0, verdict="error", error=errors[0])], timings)
    began = time.perf_counter()
    scores = np.asarray(_open(output, "r")[...])
    result = judge(0, scores, list(model.classes), rules)
    timings["postprocess_s"] = time.perf_counter() - began
    return ShardResult(image_set_id, [result], timings, precisions=tuple(sorted({tile["precision"] for tile in tile_timings})))


__all__ = [
    "ArrayRef",
    "ModelRef",
    "ShardResult",
    "cached_model",
    "inspect_stack_shard",
    "inspect_tiles",
    "judge_strip",
    "score_images",
    "verify_model_file",
]

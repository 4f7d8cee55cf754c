"""The Zarr image-set layout: constants, opening a store, validating and describing it, its checksum.

An image set is a Zarr group holding an `images` array, either a stack (N, H, W) of equal-size
images or one large strip (H, W), uint8 or uint16. docs/imageset-layout.md is the full contract;
this module is its one definition in code. Stores written by `defectscan ingest` follow all of it;
stores adopted with `defectscan imagesets register` (Zarr v2 or v3, written by an acquisition
system) need only the `images` array (any path) with an accepted rank, dtype and chunking.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectscan import provenance
from defectscan.data.implicit import ImplicitGroup, holds_zarr
from defectscan.errors import DataError
from defectscan.times import as_utc, iso_utc, parse_iso

FORMAT_NAME = "defectscan.imageset"
FORMAT_VERSION = 1
# Group attribute holding defectscan's own bookkeeping (format, kind, completeness, ingest source).
META_ATTR = "defectscan"

IMAGES = "images"
LABELS = "labels"
KEYS = "keys"
TIMES = "acquired_at"
SIZES = "image_shapes"

# Provenance attributes on the group; acquired_at is ISO 8601 UTC.
PROVENANCE_ATTRS = (*provenance.LABELS, provenance.TIME)
CLASSES_ATTR = "classes"

PIXEL_DTYPES = ("uint8", "uint16")
# The smallest image side the UNet accepts: its four 2x2 poolings (input block and three down
# blocks) need 16 pixels; anything smaller cannot be inspected and is refused at ingest.
MIN_IMAGE_SIZE = 16
# Large strips are cut into square tiles of this side (the pipeline tiles along them).
STRIP_TILE = 1024
# A shard of a stack holds whole images up to about this many bytes; a writer buffers one shard.
SHARD_TARGET_BYTES = 16 * 2**20
# Chunks bigger than this would make every pipeline task read too much at once.
MAX_CHUNK_BYTES = 256 * 2**20
# Per-image capture times: int64 microseconds since 1970-01-01T00:00:00Z; this value means unknown.
TIME_UNITS = "microseconds since 1970-01-01T00:00:00Z"
TIME_UNKNOWN = np.iinfo(np.int64).min

KINDS = ("stack", "strip")


def images_per_shard(height: int, width: int, dtype: str | np.dtype) -> int:
    """How many whole images a stack shard holds: about SHARD_TARGET_BYTES, at least one."""
    image_bytes = height * width * np.dtype(dtype).itemsize
    return max(1, SHARD_TARGET_BYTES // image_bytes)


def compressor(dtype: str | np.dtype):
    """Blosc-Zstd; byte shuffle only helps 16-bit pixels (the high bytes compress apart)."""
    from zarr.codecs import BloscCodec

    shuffle = "shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)


def stack_chunking(n: int, height: int, width: int, dtype: str | np.dtype) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) for a stack: one chunk per image; shards of several images when they are small."""
    chunks = (1, height, width)
    per_shard = min(images_per_shard(height, width, dtype), max(n, 1))
    shards = (per_shard, height, width) if per_shard > 1 else None
    return chunks, shards


def strip_chunking(height: int, width: int) -> tuple[int, int]:
    return min(STRIP_TILE, height), min(STRIP_TILE, width)


def resolve_uri(location: str | os.PathLike) -> str:
    """The canonical form recorded in image_sets.uri: an absolute local path, or the URL as given."""
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return str(Path(text).expanduser().resolve())


def is_local(uri: str) -> bool:
    return "://" not in uri


def open_group(uri: str, mode: str = "r"):
    """Open the Zarr group at `uri` (local path or fsspec URL), v2 or v3, or raise DataError.

    Read-only, a store without group metadata (an implicit v3 group, a v2 store written without
    .zgroup) or a store that is one array opens as an `ImplicitGroup`, as other writers make them.
    """
    import zarr
    from zarr.errors import ContainsArrayError, GroupNotFoundError, NodeTypeValidationError

    if is_local(uri) and not Path(uri).exists():
        raise DataError(f"{uri}: does not exist")
    try:
        # Not the consolidated metadata: a writer that changes an array without consolidating again would
        # leave it stale, and registration would record (and validation confirm) the old shape.
        return zarr.open_group(uri, mode=mode, use_consolidated=False)
    except (GroupNotFoundError, FileNotFoundError):
        if mode == "r" and (not is_local(uri) or holds_zarr(Path(uri))):
            return ImplicitGroup(uri)
        raise DataError(f"{uri}: not a Zarr store (no zarr.json, .zgroup or .zarray in it)") from None
    except (ContainsArrayError, NodeTypeValidationError):
        if mode == "r":
            return ImplicitGroup(uri, root_is_array=True)
        raise DataError(f"{uri}: is a Zarr array, not a group") from None
    except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{uri}: not a readable Zarr store: {exc}") from None


def root_array_path(group, array_path: str) -> str:
    """The array to use: "" (the root) for a store that is one array, else `array_path`."""
    if isinstance(group, ImplicitGroup) and group.root_is_array:
        if array_path not in ("", IMAGES):
            raise DataError(f"{group.uri}: the store is one array; it has no array '{array_path}' below it")
        return ""
    return array_path


def open_images(group, uri: str, array_path: str = IMAGES):
    """The image array of the group, or DataError naming what is there instead."""
    import zarr

    try:
        node = group[array_path]
    except KeyError:
        arrays = sorted(name for name, _ in group.arrays())
        listed = ", ".join(arrays) if arrays else "none"
        raise DataError(f"{uri}: no array '{array_path}' in the store (arrays at its root: {listed})") from None
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        # Its metadata empty or cut short (a copy under way, a writer that crashed), or not Zarr's: zarr's own
        # errors are ValueErrors, json's too, and a field of the wrong type is a TypeError.
        raise DataError(f"{uri}: the metadata of array '{array_path}' cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(node, zarr.Array):
        raise DataError(f"{uri}: '{array_path}' is a group, not an array")
    return node


@dataclass(frozen=True)
class ImageSetInfo:
    """What a store holds, as far as defectscan cares: enough to register, plan and check it."""

    uri: str
    array_path: str
    zarr_format: int
    kind: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    group_attrs: dict[str, Any]
    array_attrs: dict[str, Any]
    has_labels: bool = False
    classes: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return self.shape[0] if self.kind == "stack" else 1

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.shape[-2:])  # type: ignore[return-value]

    @property
    def meta(self) -> dict[str, Any]:
        value = self.group_attrs.get(META_ATTR)
        return value if isinstance(value, dict) else {}

    @property
    def checksum(self) -> str:
        return layout_checksum(self.layout())

    def layout(self) -> dict[str, Any]:
        """Everything the checksum covers: a change to any of it after registration is refused."""
        return {
            "array_path": self.array_path,
            "zarr_format": self.zarr_format,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "chunks": list(self.chunks),
            "shards": list(self.shards) if self.shards else None,
            "group_attrs": self.group_attrs,
            "array_attrs": self.array_attrs,
        }

    def provenance(self) -> dict[str, Any]:
        return {name: self.group_attrs.get(name) for name in PROVENANCE_ATTRS}


def layout_checksum(layout: dict[str, Any]) -> str:
    text = json.dumps(_jsonable(layout), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def layout_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two layouts, e.g. "shape [10, 64, 64] -> [12, 64, 64]"."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        before, after = recorded.get(name), current.get(name)
        if name.endswith("attrs") and isinstance(before, dict) and isinstance(after, dict):
            for key in sorted(set(before) | set(after)):
                if _jsonable(before.get(key)) != _jsonable(after.get(key)):
                    changes.append(f"{name}['{key}'] {_short(before.get(key))} -> {_short(after.get(key))}")
        elif _jsonable(before) != _jsonable(after):
            changes.append(f"{name} {_short(before)} -> {_short(after)}")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(_jsonable(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def describe(group, uri: str, array_path: str = IMAGES) -> ImageSetInfo:
    """Validate the image array of an open group and describe it; DataError lists every problem."""
    array = open_images(group, uri, array_path)
    shape = tuple(int(n) for n in array.shape)
    # In native byte order: a v2 writer's big-endian ">u2" is uint16 pixels, which numpy reads as such.
    dtype = str(np.dtype(array.dtype).newbyteorder("="))
    where = f"{uri}: array '{array_path}'"
    problems = []
    if len(shape) not in (2, 3):
        problems.append(f"has rank {len(shape)} (shape {shape}); expected (N, H, W) for a stack or (H, W) for a strip")
    if dtype not in PIXEL_DTYPES:
        problems.append(f"has dtype {dtype}; expected uint8 or uint16")
    if problems:
        raise DataError(f"{where} " + "; ".join(problems))
    kind = "stack" if len(shape) == 3 else "strip"
    chunks = tuple(int(n) for n in array.chunks)
    shards = tuple(int(n) for n in array.shards) if getattr(array, "shards", None) else None
    height, width = shape[-2:]
    if min(height, width) < MIN_IMAGE_SIZE:
        problems.append(f"holds images of {height}x{width} pixels; the model needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}")
    if kind == "stack" and shape[0] == 0:
        problems.append("holds no images (shape starts with 0)")
    if kind == "stack" and chunks[1:] != shape[1:]:
        problems.append(f"has chunks {chunks} that split each {height}x{width} image; a stack needs whole-image chunks (k, {height}, {width})")
    unit = shards or chunks
    if math.prod(unit) * array.dtype.itemsize > MAX_CHUNK_BYTES:
        problems.append(f"has {'shards' if shards else 'chunks'} {unit} of more than {MAX_CHUNK_BYTES // 2**20} MiB each")
    if problems:
        raise DataError(f"{where} " + "; ".join(problems))

    group_attrs = dict(group.attrs)
    meta = group_attrs.get(META_ATTR)
    if isinstance(meta, dict) and meta.get("complete") is False:
        raise DataError(f"{uri}: the store is marked incomplete (attribute {META_ATTR}.complete is false): it is still being written")
    has_labels, classes = _labels(group, array, uri)
    return ImageSetInfo(
        uri=uri,
        array_path=array_path,
        zarr_format=int(array.metadata.zarr_format),
        kind=kind,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        group_attrs=group_attrs,
        array_attrs=dict(array.attrs),
        has_labels=has_labels,
        classes=classes,
    )


def _labels(group, images, uri: str) -> tuple[bool, list[str]]:
    """Labels are optional; a present but malformed `labels` array is an error, not silently ignored."""
    import zarr

    if LABELS not in group or not isinstance(group[LABELS], zarr.Array):
        return False, []
    labels = group[LABELS]
    if labels.shape != images.shape or str(labels.dtype) != "uint8":
        raise DataError(
            f"{uri}: array '{LABELS}' has shape {labels.shape} and dtype {labels.dtype}; "
            f"expected the images' shape {images.shape} and uint8"
        )
    classes = group.attrs.get(CLASSES_ATTR) or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{uri}: group attribute '{CLASSES_ATTR}' must be a list of class names, got {classes!r}")
    return True, list(classes)


def read_keys(group, n: int) -> list[str]:
    """Per-image keys from the `keys` array; without one (acquisition stores), the serial position."""
    keys = _per_image(group, KEYS, (n,))
    if keys is None:
        return [str(i) for i in range(n)]
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys[:]]


def read_times(group, n: int, default: dt.datetime | None) -> list[dt.datetime | None]:
    """Per-image capture times from the `acquired_at` array (int64 microseconds, or datetime64), else
    `default` for all. Another unit would be read as microseconds: epoch seconds became January 1970."""
    times = _per_image(group, TIMES, (n,))
    if times is None:
        return [default] * n
    units = times.attrs.get("units")
    kind = np.dtype(times.dtype).kind
    if kind == "M":
        values = np.asarray(times[:]).astype("datetime64[us]")
        return [None if np.isnat(v) else from_micros(int(v.astype(np.int64))) for v in values]
    if kind not in "iu" or units not in (None, TIME_UNITS):
        raise DataError(f"array '{TIMES}' holds {times.dtype}" + (f" in {units!r}" if units else "")
                        + f"; expected int64 {TIME_UNITS} (or datetime64)")
    values = np.asarray(times[:], dtype=np.int64)
    return [None if v == TIME_UNKNOWN else from_micros(int(v)) for v in values]


def read_sizes(group, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per-image (height, width) before padding; the array's image shape where not recorded."""
    n = shape[0] if len(shape) == 3 else 1
    sizes = _per_image(group, SIZES, (n, 2))
    if sizes is None:
        return [tuple(shape[-2:])] * n  # type: ignore[list-item]
    found = [(int(h), int(w)) for h, w in sizes[:]]
    height, width = shape[-2:]
    for position, (h, w) in enumerate(found):
        if not (1 <= h <= height and 1 <= w <= width):
            raise DataError(f"array '{SIZES}' gives image {position} a size of {h}x{w}; "
                            f"expected 1..{height} x 1..{width} (the image before padding)")
    return found


def _per_image(group, name: str, shape: tuple[int, ...]):
    """The per-image array `name` if the store has one. One of another length is an error: taken as
    absent, keys would silently become positions and times the set's. (Errors name the array; callers
    name the store.)"""
    import zarr

    if name not in group or not isinstance(group[name], zarr.Array):
        return None
    array = group[name]
    if tuple(array.shape) != shape:
        raise DataError(f"array '{name}' has shape {tuple(array.shape)}; expected {shape}, one entry per image")
    return array


def to_micros(when: dt.datetime) -> int:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: image-set times are timezone-aware UTC")
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return delta // dt.timedelta(microseconds=1)


def from_micros(value: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=value)


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO 8601 attribute as an aware UTC datetime; naive times are taken as UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return as_utc(value)
    try:
        return parse_iso(value)
    except ValueError:
        raise DataError(f"acquired_at {value!r} is not an ISO 8601 time such as 2026-03-01T08:00:00Z") from None


# ---- writing -----------------------------------------------------------------------------------


def create_image_set(path: str | os.PathLike, kind: str, image_shape: tuple[int, int], dtype: str, *, n: int = 1, labelled: bool = False):
    """A new local v3 group with empty `images` (and `labels`) arrays chunked by this layout.

    The group is marked incomplete until finish_image_set(); writers fill whole shards (stacks)
    or whole tiles (strips), since Zarr has no locks. Write it under a temporary name and rename.
    """
    import zarr

    if kind not in KINDS:
        raise DataError(f"image set kind {kind!r} is not known; expected one of {', '.join(KINDS)}")
    if str(np.dtype(dtype)) not in PIXEL_DTYPES:
        raise DataError(f"image dtype {dtype} is not supported; expected uint8 or uint16")
    height, width = image_shape
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs[META_ATTR] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "complete": False}
    if kind == "stack":
        shape: tuple[int, ...] = (n, height, width)
        chunks, shards = stack_chunking(n, height, width, dtype)
    else:
        shape, chunks, shards = (height, width), strip_chunking(height, width), None
    common = {"shape": shape, "chunks": chunks, "shards": shards, "fill_value": 0}
    group.create_array(IMAGES, dtype=str(np.dtype(dtype)), compressors=compressor(dtype), **common)
    if labelled:
        group.create_array(LABELS, dtype="uint8", compressors=compressor("uint8"), **common)
    return group


def writable(group, name: str):
    """The array `name` of a set being written, storing every chunk, blank ones too: a missing chunk then always
    means lost data. (Zarr does not keep write_empty_chunks with the array: given at creation, it held for that
    handle only, and writes through group[name] left every all-black image's chunk out, so ingest then dropped
    the image as missing.)"""
    return group[name].with_config({"write_empty_chunks": True})


def finish_image_set(
    group,
    *,
    keys: list[str],
    times: list[int] | None = None,
    sizes: list[tuple[int, int]] | None = None,
    attrs: dict[str, Any] | None = None,
    classes: list[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write the per-image arrays and the group attributes, marking the set complete (the last step).

    `times` are microseconds since the epoch (TIME_UNKNOWN where unknown); `sizes` default to
    the image shape; `attrs` holds lot/line/product/camera/acquired_at (None values left out).
    """
    images = group[IMAGES]
    n = images.shape[0] if images.ndim == 3 else 1
    if len(keys) != n:
        raise ValueError(f"{n} images but {len(keys)} keys")
    step = (max(1, min(n, 65536)),)
    keys_array = group.create_array(KEYS, shape=(n,), dtype=str, chunks=step, fill_value=None)
    keys_array[:] = np.array(keys, dtype=object)
    times_array = group.create_array(TIMES, shape=(n,), dtype="int64", chunks=step, fill_value=TIME_UNKNOWN)
    times_array[:] = np.array(times if times is not None else [TIME_UNKNOWN] * n, dtype=np.int64)
    times_array.attrs["units"] = TIME_UNITS
    sizes_array = group.create_array(SIZES, shape=(n, 2), dtype="int32", chunks=(step[0], 2), fill_value=0)
    sizes_array[:] = np.array(sizes if sizes is not None else [images.shape[-2:]] * n, dtype=np.int32)

    values = {k: v for k, v in (attrs or {}).items() if v is not None}
    unknown = set(values) - set(PROVENANCE_ATTRS)
    if unknown:
        raise ValueError(f"unknown image-set attributes {sorted(unknown)}; expected {', '.join(PROVENANCE_ATTRS)}")
    if classes is not None:
        values[CLASSES_ATTR] = list(classes)
    kind = "stack" if images.ndim == 3 else "strip"
    values[META_ATTR] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, **(meta or {}), "complete": True}
    group.attrs.update(values)


def write_image_set(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    classes: list[str] | None = None,
    keys: list[str] | None = None,
    acquired_at: dt.datetime | None = None,
    **provenance: str | None,
) -> str:
    """Write in-memory images (N, H, W) or one strip (H, W) as a complete image set; returns its URI.

    For tests, generators and small sets; files on disk go through data/ingest.py instead.
    Written under a temporary name and renamed, like ingest.
    """
    import shutil
    import uuid

    images = np.asarray(images)
    kind = "stack" if images.ndim == 3 else "strip"
    if images.ndim not in (2, 3) or min(images.shape[-2:]) < MIN_IMAGE_SIZE:
        raise DataError(f"images of shape {images.shape}: expected (N, H, W) or (H, W) with H, W >= {MIN_IMAGE_SIZE}")
    if labels is not None and (labels.shape != images.shape or labels.dtype != np.uint8):
        raise DataError(f"labels of shape {labels.shape} and dtype {labels.dtype}: expected {images.shape} uint8")
    if labels is not None and not classes:
        raise DataError("labels need class names: pass classes=[...] (label k is the k-th name)")
    n = images.shape[0] if kind == "stack" else 1
    target = Path(path).expanduser().resolve()
    if target.exists():
        raise DataError(f"{target}: already exists")
    temporary = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        group = create_image_set(temporary, kind, images.shape[-2:], str(images.dtype), n=n, labelled=labels is not None)
        writable(group, IMAGES)[...] = images
        if labels is not None:
            writable(group, LABELS)[...] = labels
        when = acquired_at or dt.datetime.now(dt.timezone.utc)
        finish_image_set(
            group,
            keys=keys or [str(i) for i in range(n)],
            times=[to_micros(when)] * n,
            attrs={**provenance, "acquired_at": iso_utc(when)},
            classes=classes if labels is not None else None,
        )
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return str(target)


# ---- chunk presence -------------------------------------------------------------------------


@dataclass(frozen=True)
class MissingChunks:
    """Chunks of the image array that are not stored (zarr would silently read them as fill value)."""

    chunks: list[tuple[int, ...]]
    # For stacks: the image positions touched by a missing chunk.
    images: list[int]

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def describe(self, limit: int = 20) -> str:
        shown = ", ".join(str(tuple(c)) for c in self.chunks[:limit])
        more = f" and {len(self.chunks) - limit} more" if len(self.chunks) > limit else ""
        return f"{len(self.chunks)} chunk(s) missing: {shown}{more}"


def missing_chunks(array, among: Iterable[tuple[int, ...]] | None = None) -> MissingChunks:
    """List every chunk of `array` (or of the inner chunks `among`) that is not stored, looking inside
    shard indexes too.

    One listing of the array's keys finds missing objects (chunks, or whole shards); for sharded
    arrays each present shard's index (a few bytes at its end) says which inner chunks are empty.
    With `among`, only their objects are asked for, one by one, instead of listing the whole array.
    """
    from zarr.core.sync import sync

    return sync(_missing_chunks(array, None if among is None else set(among)))


def vanished_chunks(array, block: np.ndarray, origin: Sequence[int]) -> MissingChunks:
    """The chunks under `block`, read from `array` at `origin`, that read as nothing but the fill value and
    are not stored. Zarr reads a missing chunk (deleted, or its path now a folder) as the fill value, so
    a chunk gone since registration would otherwise be inspected as a blank image."""
    fill = array.fill_value if array.fill_value is not None else 0
    inner = tuple(array.chunks)
    first = [o // c for o, c in zip(origin, inner)]
    last = [(o + n - 1) // c for o, n, c in zip(origin, block.shape, inner)]
    blank = []
    for coords in itertools.product(*(range(a, b + 1) for a, b in zip(first, last))):
        region = tuple(slice(max(i * c - o, 0), min((i + 1) * c - o, n)) for i, c, o, n in zip(coords, inner, origin, block.shape))
        if (block[region] == fill).all():
            blank.append(coords)
    return missing_chunks(array, blank) if blank else MissingChunks([], [])


async def _missing_chunks(array, among: set[tuple[int, ...]] | None) -> MissingChunks:
    import asyncio

    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.codecs import ShardingCodec
    from zarr.core.buffer import default_buffer_prototype

    store, path = array.store_path.store, array.store_path.path
    prefix = f"{path}/" if path else ""
    metadata = array.metadata
    shape = array.shape
    inner = tuple(array.chunks)
    outer = tuple(array.shards) if getattr(array, "shards", None) else inner
    grid = [math.ceil(s / c) for s, c in zip(shape, outer)]
    per_shard = tuple(o // i for o, i in zip(outer, inner))
    sharding = next((c for c in getattr(metadata, "codecs", ()) if isinstance(c, ShardingCodec)), None)
    index_at = _shard_index_at(sharding) if sharding is not None else None
    n_inner = math.prod(per_shard)
    index_bytes = 16 * n_inner + 4
    empty = np.iinfo(np.uint64).max
    # Remote stores answer slowly one by one: read shard indexes a few dozen at a time.
    limit = asyncio.Semaphore(32)

    def inner_chunks(coords: tuple[int, ...]) -> list[tuple[int, ...]]:
        found = []
        for local in itertools.product(*(range(p) for p in per_shard)):
            chunk = tuple(c * p + k for c, p, k in zip(coords, per_shard, local))
            if all(i * n < s for i, n, s in zip(chunk, inner, shape)) and (among is None or chunk in among):
                found.append(chunk)
        return found

    async def empty_in_shard(coords: tuple[int, ...], key: str) -> list[tuple[int, ...]]:
        async with limit:
            where = RangeByteRequest(0, index_bytes) if index_at == "start" else SuffixByteRequest(index_bytes)
            buffer = await store.get(prefix + key, prototype=default_buffer_prototype(), byte_range=where)
        if buffer is None:
            return inner_chunks(coords)
        index = np.frombuffer(buffer.to_bytes()[:-4], dtype="<u8").reshape(per_shard + (2,))
        return [
            chunk
            for chunk in inner_chunks(coords)
            if (index[tuple(i - c * p for i, c, p in zip(chunk, coords, per_shard))] == empty).all()
        ]

    if among is None:
        outers = list(itertools.product(*(range(g) for g in grid)))
        present = {key[len(prefix) :] async for key in store.list_prefix(prefix)}
    else:
        outers = sorted({tuple(c // p for c, p in zip(chunk, per_shard)) for chunk in among})
        keys = [metadata.encode_chunk_key(coords) for coords in outers]
        stored = await asyncio.gather(*(store.exists(prefix + key) for key in keys))
        present = {key for key, there in zip(keys, stored) if there}
    missing: list[tuple[int, ...]] = []
    reads = []
    for coords in outers:
        key = metadata.encode_chunk_key(coords)
        if key not in present:
            missing.extend(inner_chunks(coords))
        elif index_at is not None:
            reads.append(empty_in_shard(coords, key))
    for found in await asyncio.gather(*reads):
        missing.extend(found)
    missing.sort()
    images = sorted({c[0] * inner[0] + k for c in missing for k in range(inner[0]) if c[0] * inner[0] + k < shape[0]}) if len(shape) == 3 else []
    return MissingChunks(missing, images)


def _shard_index_at(codec) -> str | None:
    """Where a shard index defectscan can read itself lies ("start" or "end"): little-endian uint64 pairs +
    crc32c, zarr's default codecs. None for other index codecs: only whole shards are then checked."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    codecs = tuple(codec.index_codecs)
    little = len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
    if not (little and isinstance(codecs[1], Crc32cCodec)):
        return None
    return str(getattr(codec.index_location, "value", codec.index_location))


def describe_missing_for_stack(missing: MissingChunks) -> str:
    shown = ", ".join(str(i) for i in missing.images[:20])
    more = f" and {len(missing.images) - 20} more" if len(missing.images) > 20 else ""
    return f"{len(missing.images)} image(s) with missing chunks at positions {shown}{more}"


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGES",
    "KEYS",
    "LABELS",
    "MIN_IMAGE_SIZE",
    "PIXEL_DTYPES",
    "SIZES",
    "STRIP_TILE",
    "TIMES",
    "ImageSetInfo",
    "MissingChunks",
    "create_image_set",
    "describe",
    "finish_image_set",
    "layout_checksum",
    "layout_changes",
    "missing_chunks",
    "open_group",
    "open_images",
    "read_keys",
    "read_sizes",
    "read_times",
    "resolve_uri",
    "vanished_chunks",
    "write_image_set",
]

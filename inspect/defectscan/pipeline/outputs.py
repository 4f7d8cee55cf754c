"""Where probability maps go: a Zarr store next to the image set, one array per model version.

`/data/L042.zarr` -> `/data/L042.masks.zarr`, array `<model name>/<version>`: uint8 scores
(probability x 255), shape (N, C, H, W) for a stack, (C, H, W) for a strip, chunked like the
pipeline's shards write them (whole images; strip tiles), so every writer owns whole chunks.
Under `inspection.output_dir` the name also carries a digest of the image set's URI
(`L042-1a2b3c4d.masks.zarr`): two lines' `L042.zarr` must not share one score array.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from defectscan.errors import DataError, StorageError
from defectscan.pipeline.worker import ArrayRef, free_space

# The store holds score maps, not defect masks (those are RLE text in `defects`); its suffix, like the
# inspections.mask_uri/mask_array columns that point to it, keeps the name stores and external SQL
# were written with.
SUFFIX = ".masks.zarr"
# Two runs starting on one image set at once both create its score array; the loser reopens it.
_CREATE_ATTEMPTS = 3


def scores_uri(image_set_uri: str, output_dir: Path | None) -> str:
    base = image_set_uri.rstrip("/")
    name = base.rsplit("/", 1)[-1]
    stem = name[: -len(".zarr")] if name.endswith(".zarr") else name
    if output_dir is not None:
        digest = hashlib.sha256(base.encode()).hexdigest()[:8]
        return str(Path(output_dir).expanduser().resolve() / f"{stem}-{digest}{SUFFIX}")
    return f"{base[: len(base) - len(name)]}{stem}{SUFFIX}"


def prepare_output(
    image_set_uri: str,
    kind: str,
    shape: tuple[int, ...],
    n_classes: int,
    model_name: str,
    model_version: str,
    *,
    images_per_file: int,
    images_per_shard: int,
    tile_size: int,
    output_dir: Path | None,
    attributes: dict,
) -> ArrayRef:
    """Create (or reopen, after checking its shape) the score array for one image set and model version."""
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError

    uri = scores_uri(image_set_uri, output_dir)
    path = f"{model_name}/{model_version}"
    if kind == "stack":
        n, height, width = shape
        full = (n, n_classes, height, width)
        chunks = (1, n_classes, height, width)
        shards = (images_per_file, n_classes, height, width)
    else:
        height, width = shape
        full = (n_classes, height, width)
        chunks = (n_classes, tile_size, tile_size)
        shards = None
    try:
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            try:
                group = zarr.open_group(uri, mode="a")
                array = group.require_array(
                    path, shape=full, chunks=chunks, shards=shards, dtype="uint8", fill_value=0,
                    compressors=ZstdCodec(level=3), attributes=attributes,
                )
                break
            except (ContainsArrayError, ContainsGroupError, ContainsArrayAndGroupError, json.JSONDecodeError):
                # Another run created the store or array between our look-up and our creation (or is
                # writing its metadata now): open what it made.
                if attempt == _CREATE_ATTEMPTS:
                    raise
                time.sleep(0.1 * attempt)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{uri}: existing score array '{path}' does not fit this image set ({full}, chunks {chunks}): {exc}") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot create the score array '{path}': {exc.strerror or exc}{free_space(uri)}") from None
    _check_reopened(array, uri, path, attributes, chunks if kind == "strip" else None)
    if kind == "stack" and array.shards is not None and images_per_shard % array.shards[0]:
        # Two pipeline shards writing one Zarr shard would overwrite each other's images.
        raise DataError(
            f"{uri}: score array '{path}' is stored in files of {array.shards[0]} images; "
            f"inspection.images_per_shard ({images_per_shard}) must be a multiple of it"
        )
    return ArrayRef(uri, path)


def _check_reopened(array, uri: str, path: str, attributes: dict, tile_chunks: tuple[int, ...] | None) -> None:
    """Refuse an existing score array made for another image set, or whose strip tiles writers would share."""
    source, wanted = (array.attrs.get("source") or {}).get("uri"), (attributes.get("source") or {}).get("uri")
    if source and wanted and source != wanted:
        raise DataError(f"{uri}: score array '{path}' holds the scores of {source}, not of {wanted}")
    if tile_chunks is not None and tuple(array.chunks) != tile_chunks and tile_chunks[1] % array.chunks[1]:
        # Tiles smaller than (or across) the stored chunks would each rewrite part of a chunk that
        # another task writes too, and lose each other's scores.
        raise DataError(
            f"{uri}: score array '{path}' is stored in {array.chunks[1]}x{array.chunks[2]} tiles; inspection.tile_size "
            f"{tile_chunks[1]} is not a multiple of {array.chunks[1]}: use tile_size {array.chunks[1]} (or a multiple) "
            f"for this image set, or remove the array to write it afresh"
        )

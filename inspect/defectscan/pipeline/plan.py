"""Cut image sets into shards: runs of whole images for stacks, haloed tiles for large strips.

Every shard writes whole chunks of the output array and nothing else, so shards can run on
any worker in any order, and a rerun of a shard rewrites the same chunks with the same bytes.
Tiles sit on the 16-pixel grid of the UNet's four poolings and carry a halo of at least the
model's receptive radius, so a tiled map equals the whole-image map.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from defectscan.model.preprocess import InputContract


@dataclass(frozen=True)
class StackShard:
    """Images [start, stop) of a stack; `todo` are the positions that still need results."""

    image_set_id: int
    start: int
    stop: int
    todo: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Tile:
    """`core` (y0, x0, y1, x1) is written; the model reads the window of fixed size at `window`."""

    core: tuple[int, int, int, int]
    window: tuple[int, int]


@dataclass(frozen=True)
class TileShard:
    image_set_id: int
    tiles: tuple[Tile, ...]
    window_shape: tuple[int, int]


def plan_stack(image_set_id: int, n_images: int, images_per_shard: int, pending: np.ndarray | None = None) -> Iterator[StackShard]:
    """Shards on a fixed grid of `images_per_shard` images, left out where no image is pending.

    `pending` holds the positions that need results (None: all). The grid does not move when
    some images are done, so a shard always owns the same output chunks.
    """
    wanted = np.ones(n_images, dtype=bool) if pending is None else np.zeros(n_images, dtype=bool)
    if pending is not None and len(pending):
        wanted[np.asarray(pending, dtype=np.int64)] = True
    for start in range(0, n_images, images_per_shard):
        stop = min(start + images_per_shard, n_images)
        todo = np.flatnonzero(wanted[start:stop]) + start
        if todo.size:
            yield StackShard(image_set_id, start, stop, tuple(int(p) for p in todo))


def window_shape(height: int, width: int, tile_size: int, halo: int, *, contract: InputContract) -> tuple[int, int]:
    """The one window shape every tile of an image uses (so the model is traced once)."""
    side = tile_size + 2 * halo
    return min(side, contract.padded(height)), min(side, contract.padded(width))


def plan_tiles(height: int, width: int, tile_size: int, halo: int, *, contract: InputContract) -> list[Tile]:
    """Core tiles of `tile_size` covering the image; windows shifted inside the image padded to the model's multiple."""
    if tile_size % contract.multiple_of or halo % contract.multiple_of:
        raise ValueError(f"tile_size ({tile_size}) and halo ({halo}) must be multiples of {contract.multiple_of}")
    win_h, win_w = window_shape(height, width, tile_size, halo, contract=contract)
    padded_h, padded_w = contract.padded(height), contract.padded(width)
    tiles = []
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            core = (y0, x0, min(y0 + tile_size, height), min(x0 + tile_size, width))
            wy = min(max(y0 - halo, 0), padded_h - win_h)
            wx = min(max(x0 - halo, 0), padded_w - win_w)
            tiles.append(Tile(core, (wy, wx)))
    return tiles


def plan_strip(image_set_id: int, height: int, width: int, tile_size: int, halo: int, *, tiles_per_shard: int,
               contract: InputContract) -> Iterator[TileShard]:
    tiles = plan_tiles(height, width, tile_size, halo, contract=contract)
    shape = window_shape(height, width, tile_size, halo, contract=contract)
    for start in range(0, len(tiles), tiles_per_shard):
        yield TileShard(image_set_id, tuple(tiles[start : start + tiles_per_shard]), shape)

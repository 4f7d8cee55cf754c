"""The deep check of an image array: read and decode every chunk, as inspection will.

`missing_chunks` (imageset.py) only looks at which chunk objects exist, which is quick on any
store; a chunk that exists but holds garbage (a torn copy, a bad disk block) passes it and
then becomes an `error` verdict at inspection. Reading every chunk finds those beforehand.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from defectscan.errors import first_line


@dataclass
class UnreadableChunks:
    """Chunks that are stored but cannot be read or decoded, each with the reason."""

    chunks: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    # For stacks: the image positions a bad chunk holds.
    images: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def describe(self, limit: int = 20) -> str:
        shown = "; ".join(f"{tuple(c)}: {reason}" for c, reason in self.chunks[:limit])
        more = f" and {len(self.chunks) - limit} more" if len(self.chunks) > limit else ""
        return f"{len(self.chunks)} chunk(s) cannot be read: {shown}{more}"


def unreadable_chunks(array, on_chunk: Callable[[int, int], None] | None = None) -> UnreadableChunks:
    """Read every (inner) chunk of `array`; list those that fail. `on_chunk(done, total)` reports progress."""
    shape, chunks = tuple(array.shape), tuple(array.chunks)
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
    total = math.prod(len(g) for g in grid)
    found = UnreadableChunks()
    for done, coords in enumerate(itertools.product(*grid), start=1):
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, chunks, shape))
        try:
            array[region]
        except Exception as exc:  # codecs raise many types for damaged bytes
            found.chunks.append((coords, f"{type(exc).__name__}: {first_line(exc)}"[:200]))
            if len(shape) == 3:
                found.images.extend(range(region[0].start, region[0].stop))
        if on_chunk:
            on_chunk(done, total)
    return found

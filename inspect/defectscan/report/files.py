"""Writing a report's files so that a failure never costs the reader the previous good one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write, renamed over `target` when the block succeeds, removed when it fails.

    Beside it, so that the rename stays on one file system and is atomic: a reader sees the old
    file or the new one, and a failed write or render leaves the old one as it was.
    """
    partial = target.with_name(f".{target.stem}.partial-{uuid.uuid4().hex[:8]}{target.suffix}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)

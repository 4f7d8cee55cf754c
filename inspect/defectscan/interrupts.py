"""SIGTERM, what cron, systemd and Kubernetes send to stop a job, handled like Ctrl-C.

Long runs catch KeyboardInterrupt to record themselves `interrupted` and cancel their work
instead of vanishing with a `running` row behind them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into `Interrupted` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

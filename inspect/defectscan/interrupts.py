"""SIGTERM and SIGINT stop a run at its next checkpoint, within a bounded time.

The handlers only set a flag: raising from inside a signal handler lands wherever the main
thread happens to be (SQLAlchemy's pool, distributed's client) and can be swallowed there, and
cron, systemd and Kubernetes then kill a process whose run row says `running`. The run loop
calls `check()` between shards and while it waits for futures, so it cancels its work, records
itself `interrupted` and returns; a watchdog ends the process with the signal's exit status
(128 + signal number) if that takes longer than the grace time.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from defectscan.exitcodes import EXIT_INTERRUPTED, EXIT_SIGINT

log = logging.getLogger(__name__)

EXIT_STATUS = {signal.SIGTERM: EXIT_INTERRUPTED, signal.SIGINT: EXIT_SIGINT}


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal; `exit_code` is what the process should exit with."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        super().__init__(f"signal {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return EXIT_STATUS.get(signal.Signals(self.signum), 128 + self.signum)


class _StopRequest:
    """The signal received (if any) and the watchdog that bounds the time to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.grace_s = 30.0
        self.watchdog: threading.Timer | None = None
        self.depth = 0

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: stopping the run (at most %.0f s)", signal.Signals(signum).name, self.grace_s)
            self.watchdog = threading.Timer(self.grace_s, self._overdue)
            self.watchdog.daemon = True
            self.watchdog.start()

    def _overdue(self) -> None:
        code = Interrupted(self.signum).exit_code
        log.error("the run did not stop within %.0f s of %s; exiting %d", self.grace_s, signal.Signals(self.signum).name, code)
        logging.shutdown()
        os._exit(code)

    def clear(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.signum, self.watchdog = None, None


_stop = _StopRequest()


def check() -> None:
    """Raise `Interrupted` when a stop was requested: call where leaving is safe."""
    if _stop.signum is not None:
        raise Interrupted(_stop.signum)


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask the run to stop as a signal would (the job lock's heartbeat does when it loses the lock)."""
    _stop.request(signum)


@contextmanager
def stop_on_signals(grace_s: float = 30.0) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT set the stop flag instead of raising where they land.

    A signal that arrives after the run's last checkpoint (its row already closed) changes nothing:
    the command ends with the status it recorded, so the exit status always matches the row.
    """
    if threading.current_thread() is not threading.main_thread() or _stop.depth:
        # Nested (a command that wraps a library call that wraps itself too): the outer block owns the flag.
        yield
        return
    _stop.clear()
    _stop.grace_s = grace_s
    previous = {s: signal.signal(s, lambda signum, _frame: _stop.request(signum)) for s in EXIT_STATUS}
    _stop.depth += 1
    try:
        yield
    finally:
        _stop.depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop.clear()

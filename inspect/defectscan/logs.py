"""Logging set-up: one format, and no password ever reaches a log line."""

from __future__ import annotations

import logging

from defectscan.native_logs import quiet_tensorflow_startup
from defectscan.secrets import mask_secrets


class MaskSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


# Libraries that log their own housekeeping ("Worker process still alive after 4.0 seconds,
# killing" when a cluster closes): only their errors reach the user unless --log-level DEBUG.
LIBRARY_LOGGERS = ("distributed", "bokeh", "tornado", "asyncio", "absl")


def quiet_libraries() -> None:
    """Library loggers to ERROR (DEBUG when defectscan's is); call again after importing distributed, which sets its own."""
    debug = logging.getLogger("defectscan").isEnabledFor(logging.DEBUG)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


def configure_logging(level: str) -> None:
    logger = logging.getLogger("defectscan")
    logger.setLevel(level)
    quiet_libraries()
    quiet_tensorflow_startup(quiet=level != "DEBUG")
    if not any(isinstance(f, MaskSecrets) for h in logger.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(MaskSecrets())
        logger.addHandler(handler)
        logger.propagate = False

"""Logging set-up: one format, and no password ever reaches a log line."""

from __future__ import annotations

import logging

from defectscan.secrets import mask_secrets


class MaskSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def configure_logging(level: str) -> None:
    logger = logging.getLogger("defectscan")
    logger.setLevel(level)
    if not any(isinstance(f, MaskSecrets) for h in logger.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(MaskSecrets())
        logger.addHandler(handler)
        logger.propagate = False

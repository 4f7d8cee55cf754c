"""Keep passwords out of everything defectscan prints or logs."""

from __future__ import annotations

import re

_MASK = "***"
# scheme://user:password@host -- the form every database and broker URL uses.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")
# key=value forms in libpq connection strings and driver error messages.
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<password>'[^']*'|\S+)", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Replace any password in URLs or `password=` pairs inside `text` with ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}{m['tail']}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}", text)

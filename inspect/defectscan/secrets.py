"""Keep passwords out of everything defectscan prints or logs."""

from __future__ import annotations

import re

_MASK = "***"
# scheme://user:password@host -- the form every database and broker URL uses (a password may hold a space;
# a slash ends it, so host:port/path is not taken for one).
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@/\n]*)(?P<tail>@)")
# key=value forms in libpq connection strings, URL queries and driver error messages: password, sslpassword (the
# client key's passphrase), any *_secret or *_token. The value ends at a blank, &, a quote or a comma, so that the
# JSON or query around it stays whole.
_KV_PASSWORD = re.compile(r"(?P<head>\b[\w.-]*(?:password|passphrase|secret|token)\s*=\s*)(?P<password>'[^']*'|[^\s&\",]+)", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Replace any password in URLs or `password=` pairs inside `text` with ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}{m['tail']}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}", text)

"""Keep passwords out of everything defectscan prints or logs."""

from __future__ import annotations

import re

_MASK = "***"
# scheme://user:password@host -- the form every database and broker URL uses.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")
# key=value forms in libpq connection strings, URL queries and driver error messages: password, sslpassword (the
# client key's passphrase), *_secret, *_token, *_access_key, *_api_key. The value runs to the next blank (a
# quoted one to its quote): the rest of a query goes with it rather than a part of the password staying out.
_KV_PASSWORD = re.compile(r"(?P<head>\b[\w.-]*(?:password|passphrase|secret|token|access_key|api_key)\s*=\s*)(?P<password>'[^']*'|\S+)",
                          re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Replace any password in URLs or `password=` pairs inside `text` with ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}{m['tail']}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}", text)


def mask_secrets_in(value):
    """`mask_secrets` on every string of a JSON-like structure, one by one: masking its serialised text let a match
    run from one field into the next and broke the JSON."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: mask_secrets_in(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets_in(item) for item in value]
    return value

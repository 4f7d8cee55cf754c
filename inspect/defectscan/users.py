"""Who did something (a review, a promotion): the name given, else the login name. Names are free
text and need not exist anywhere: plants name people and service accounts their own way."""

from __future__ import annotations

import getpass


def user_name(given: str | None = None) -> str:
    if given is not None and given.strip():
        return given.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"

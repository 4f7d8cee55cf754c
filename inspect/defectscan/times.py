"""Times in defectscan: stored and shown as UTC, read from ISO 8601 text (naive times are UTC).

The one parser and the one formatter; callers only add what their input means (a bare date as a
whole day for --until, `7d` windows for jobs) and their own error wording.
"""

from __future__ import annotations

import datetime as dt


def as_utc(when: dt.datetime) -> dt.datetime:
    """An aware UTC datetime; a naive one is taken as UTC (SQLite aggregates come back naive)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc)


def parse_iso(text: str) -> dt.datetime:
    """ISO 8601 date-time text (a `Z` suffix, an offset, or none for UTC) as aware UTC; ValueError when it is not one."""
    return as_utc(dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00")))


def iso_utc(when: dt.datetime | None) -> str | None:
    """`2026-03-01T08:00:00Z`, or None."""
    if when is None:
        return None
    return as_utc(when).isoformat().replace("+00:00", "Z")

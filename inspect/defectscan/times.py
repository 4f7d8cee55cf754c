"""Times in defectscan: stored and shown as UTC, read from ISO 8601 text (naive times are UTC).

The one parser and the one formatter; callers only add what their input means (a bare date as a
whole day for --until, `7d` windows for jobs) and their own error wording.
"""

from __future__ import annotations

import datetime as dt
import re


def as_utc(when: dt.datetime) -> dt.datetime:
    """An aware UTC datetime; a naive one is taken as UTC (SQLite aggregates come back naive)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc)


# A day (extended, basic or week form) and a UTC offset (±hh, ±hhmm or ±hh:mm), nothing between them.
_DAY_IN_ZONE = re.compile(r"^(\d{4}-\d{2}-\d{2}|\d{8}|\d{4}-W\d{2}-\d)([+-]\d{2}(?::?\d{2})?)$")
# The date part of a date-time in extended or basic form, and what must follow it.
_DATE_PART = re.compile(r"^(\d{4}-\d{2}-\d{2}|\d{8})(.)")


def day_in_zone(text: str) -> dt.datetime | None:
    """`2026-03-01-05:00` (a day and an offset) as that day's midnight there; None for other text. Python's
    fromisoformat takes any character between date and time: it read the offset's sign as one and 05:00 as the time."""
    found = _DAY_IN_ZONE.match(str(text).strip())
    if not found:
        return None
    offset = found[2].replace(":", "")
    zone = dt.datetime.strptime(offset if len(offset) == 5 else offset + "00", "%z").tzinfo
    return dt.datetime.combine(dt.date.fromisoformat(found[1]), dt.time(), zone)


def parse_iso(text: str) -> dt.datetime:
    """ISO 8601 date-time text (a `Z` suffix, an offset, or none for UTC) as aware UTC; ValueError when it is not one."""
    given = str(text).strip()
    text = given.replace("Z", "+00:00")
    midnight = day_in_zone(text)
    if midnight is not None:
        return as_utc(midnight)
    date_part = _DATE_PART.match(text)
    if date_part and date_part[2] not in "Tt ":
        raise ValueError(f"{given!r}: expected T or a space between the date and the time")
    return as_utc(dt.datetime.fromisoformat(text))


def iso_utc(when: dt.datetime | None) -> str | None:
    """`2026-03-01T08:00:00Z`, or None."""
    if when is None:
        return None
    return as_utc(when).isoformat().replace("+00:00", "Z")

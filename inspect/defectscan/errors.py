"""Exceptions for failures a user can fix: the CLI prints them as one line, no traceback."""

from defectscan.secrets import mask_secrets


def first_line(exc: BaseException | object) -> str:
    """The first line of an exception's (or a driver error's) text, passwords masked; "" when it has none.

    TensorFlow's errors from inside a tf.function start with "in user code:" and a traceback, and end
    with the error itself: that last line is the one that says what went wrong.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return mask_secrets(lines[-1] if lines[0] == "in user code:" else lines[0])


class DefectscanError(Exception):
    """Base class: a problem with input, settings or stored state that the user can act on."""


class ConfigError(DefectscanError):
    """A setting is unknown, has the wrong type or an unaccepted value."""


class DatabaseError(DefectscanError):
    """The database cannot be reached or its schema does not match this version."""


class DataError(DefectscanError):
    """An input file, dataset or store is missing, unreadable or malformed."""


class ModelError(DefectscanError):
    """A model file is missing, does not match its record, or cannot be loaded."""


class StorageError(DefectscanError):
    """Where results go cannot take them (a full disk, a read-only or vanished filesystem): the machine's fault, not the data's."""


def suggest(value: str, known: list[str]) -> str:
    """"; did you mean A or B?" for close matches of a mistyped name, else the short list of known ones, else ""."""
    import difflib

    close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(close) + "?"
    if 0 < len(known) <= 8:
        return "; known: " + ", ".join(known)
    return ""

"""Bad input files found while reading a dataset or ingesting images.

Readers report each bad file by name with its reason; with `strict` the first one stops the
work, otherwise the file is skipped and counted so that good files still go through.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from defectscan.errors import DataError


def printable_path(path: str | Path) -> str:
    """The path as text that can be printed and stored: a name that is not UTF-8 (a Latin-1 name copied
    from a Windows share) shows its odd bytes as \\xNN escapes instead of breaking the output."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def utf8_name(path: str | Path) -> bool:
    """Whether the path's name can be stored as an image key (keys are UTF-8 text in the store and database)."""
    return printable_path(path) == str(path)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ProblemLog:
    strict: bool = False
    problems: list[Problem] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        problem = Problem(printable_path(path), reason)
        if self.strict:
            raise DataError(str(problem))
        self.problems.append(problem)

    def __len__(self) -> int:
        return len(self.problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def __iter__(self):
        return iter(self.problems)

    def summary(self) -> str:
        """One line: how many files were skipped, by reason."""
        if not self.problems:
            return "no problems"
        counts = Counter(p.reason.split(":")[0] for p in self.problems)
        by_reason = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
        return f"{len(self.problems)} skipped ({by_reason})"

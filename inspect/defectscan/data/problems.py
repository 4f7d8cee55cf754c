"""Bad input files found while reading a dataset or ingesting images.

Readers report each bad file by name with its reason; with `strict` the first one stops the
work, otherwise the file is skipped and counted so that good files still go through.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from defectscan.errors import DataError


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
        problem = Problem(str(path), reason)
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

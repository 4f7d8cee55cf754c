"""Statistical process control for the failed-image fraction: the p-chart.

Each subgroup (a lot, or an hour of one lot) has n judged images of which d failed. The centre
line is the pooled fraction p̄ = Σd / Σn; each subgroup gets its own limits
p̄ ± k·sqrt(p̄(1 − p̄) / n), clipped to [0, 1], so small lots get wider limits than large ones
(Montgomery, Introduction to Statistical Quality Control, ch. 7: variable sample size).
A point is out of control when its fraction lies above its upper or below its lower limit
(the lower test only applies where that limit is above 0). Subgroups with no judged image carry
no information and get no point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

SIGMA = 3.0


@dataclass(frozen=True)
class PPoint:
    label: str
    n: int
    failed: int
    p: float
    lcl: float
    ucl: float
    signal: str | None  # "above", "below" or None

    @property
    def out_of_control(self) -> bool:
        return self.signal is not None


@dataclass(frozen=True)
class PChart:
    center: float
    sigma: float
    points: tuple[PPoint, ...]

    @property
    def signals(self) -> tuple[PPoint, ...]:
        return tuple(p for p in self.points if p.out_of_control)


def p_chart(subgroups: Iterable[tuple[str, int, int]], sigma: float = SIGMA) -> PChart:
    """The p-chart of (label, judged images, failed images) subgroups, in the order given."""
    groups = [(label, int(n), int(d)) for label, n, d in subgroups]
    for label, n, d in groups:
        if n < 0 or d < 0 or d > n:
            raise ValueError(f"subgroup {label!r}: {d} failed of {n} images is not a fraction")
    used = [g for g in groups if g[1] > 0]
    total = sum(n for _, n, _ in used)
    center = sum(d for _, _, d in used) / total if total else 0.0
    spread = center * (1.0 - center)
    points = []
    for label, n, d in used:
        half = sigma * math.sqrt(spread / n)
        lcl, ucl = max(0.0, center - half), min(1.0, center + half)
        p = d / n
        signal = "above" if p > ucl else "below" if lcl > 0 and p < lcl else None
        points.append(PPoint(label, n, d, p, lcl, ucl, signal))
    return PChart(center, sigma, tuple(points))

"""Probability maps -> defect records and a verdict per image.

Works on the uint8 maps that are stored (score = value / 255), so that what the database says
can always be recomputed from the stored masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from defectscan.pipeline import rle


@dataclass(frozen=True)
class VerdictRules:
    threshold: float
    min_defect_area: int
    fail_score: float


@dataclass(frozen=True)
class DefectRecord:
    class_index: int
    class_name: str
    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (half-open), image pixels
    area: int
    centroid: tuple[float, float]  # y, x
    orientation: float  # radians from the row axis to the major axis, -pi/2..pi/2 (scikit-image)
    eccentricity: float
    mean_score: float
    max_score: float
    rle: str


@dataclass
class ImageResult:
    """What a worker sends back for one image: small, no pixel arrays."""

    position: int
    verdict: str
    max_score: float = 0.0
    defect_pixels: int = 0
    defects: list[DefectRecord] = field(default_factory=list)
    error: str | None = None
    duration_ms: float | None = None


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)


def find_defects(scores: np.ndarray, classes: list[str], rules: VerdictRules, origin: tuple[int, int] = (0, 0)) -> list[DefectRecord]:
    """Connected regions (8-connectivity) of each class channel of a (C, H, W) uint8 map.

    Regions smaller than `rules.min_defect_area` are noise and not recorded. `origin` shifts
    coordinates when `scores` is a window of a larger image.
    """
    from skimage.measure import label, regionprops

    if scores.ndim != 3 or scores.shape[0] != len(classes):
        raise ValueError(f"expected a ({len(classes)}, H, W) score map, got shape {scores.shape}")
    cutoff = int(np.ceil(rules.threshold * 255.0 - 1e-9))
    found: list[DefectRecord] = []
    for index, name in enumerate(classes):
        channel = scores[index]
        labels = label(channel >= cutoff, connectivity=2)
        # Drop noise in one vectorised pass: per-region properties are costly when specks are many.
        areas = np.bincount(labels.ravel())
        areas[0] = 0
        labels[areas[labels] < rules.min_defect_area] = 0
        for region in regionprops(labels, intensity_image=channel):
            y0, x0, y1, x1 = region.bbox
            cy, cx = region.centroid
            found.append(
                DefectRecord(
                    class_index=index,
                    class_name=name,
                    bbox=(y0 + origin[0], x0 + origin[1], y1 + origin[0], x1 + origin[1]),
                    area=int(region.area),
                    centroid=(float(cy + origin[0]), float(cx + origin[1])),
                    orientation=float(region.orientation),
                    eccentricity=float(region.eccentricity),
                    mean_score=float(region.intensity_mean) / 255.0,
                    max_score=float(region.intensity_max) / 255.0,
                    rle=rle.encode(region.image),
                )
            )
    return found


def judge(position: int, scores: np.ndarray, classes: list[str], rules: VerdictRules) -> ImageResult:
    """The verdict for one image's (C, H, W) uint8 map: fail when a recorded defect scores at least fail_score."""
    defects = find_defects(scores, classes, rules)
    failed = any(d.max_score >= rules.fail_score for d in defects)
    return ImageResult(
        position=position,
        verdict="fail" if failed else "pass",
        max_score=float(scores.max()) / 255.0 if scores.size else 0.0,
        defect_pixels=sum(d.area for d in defects),
        defects=defects,
    )

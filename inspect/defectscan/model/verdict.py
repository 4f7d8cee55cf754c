"""The verdict rule: a probability map -> defect records and a pass/fail verdict per image.

This is the one rule. `inspect` (pipeline/worker.py) applies it to what it stores, `evaluate`
and training-time validation (model/evaluate.py, model/operating_point.py) apply it to what they
score, so the evaluation predicts what the line will record.

The rule, per class channel of a (C, H, W) uint8 score map (score = value / 255):
  1. pixels scoring at least `threshold` are candidate defect pixels;
  2. their connected regions (8-connectivity) smaller than `min_defect_area` are noise;
  3. the remaining regions are the image's defects;
  4. the image fails when one of its defects has a maximum score of at least `fail_score`.
The image's *verdict score* is the highest maximum score among its defects (0 without defects):
the image fails exactly when its verdict score reaches `fail_score`, so it ranks images for ROC
curves and for choosing `fail_score`.

Works on the uint8 maps that are stored, so that what the database says can always be
recomputed from the stored score maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from defectscan.model import rle


RULE_FIELDS = ("threshold", "min_defect_area", "fail_score")


@dataclass(frozen=True)
class VerdictRules:
    """The operating point: recorded with a model version, overridable per job (inspection settings)."""

    threshold: float
    min_defect_area: int
    fail_score: float
    # Models with several classes: {class name: {field: value}} overriding the fields above for that class.
    per_class: dict[str, dict[str, float]] | None = None

    def __post_init__(self):
        for name, rule in (self.per_class or {}).items():
            unknown = set(rule) - set(RULE_FIELDS)
            if unknown:
                raise ValueError(f"verdict rule for class {name}: unknown field(s) {', '.join(sorted(unknown))}; accepted: {', '.join(RULE_FIELDS)}")
            for key, value in rule.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"verdict rule for class {name}: {key} {value!r} is not a number")
        for rule in (self, *[self.for_class(n) for n in self.per_class or {}]):
            if not 0 < rule.threshold < 1:
                raise ValueError(f"verdict rule: threshold {rule.threshold} must be between 0 and 1")
            if not 0 <= rule.fail_score <= 1:
                raise ValueError(f"verdict rule: fail_score {rule.fail_score} must be within 0..1")
            if int(rule.min_defect_area) < 1:
                raise ValueError(f"verdict rule: min_defect_area {rule.min_defect_area} must be at least 1")

    def for_class(self, name: str) -> VerdictRules:
        """The rule for one class channel (the per-class fields over the common ones)."""
        override = (self.per_class or {}).get(name)
        if not override:
            return self if self.per_class is None else VerdictRules(self.threshold, self.min_defect_area, self.fail_score)
        return VerdictRules(**{f: override.get(f, getattr(self, f)) for f in RULE_FIELDS})

    def describe(self) -> str:
        """One line, per-class rules included: "threshold 0.5, min_defect_area 16, fail_score 0.6; scratch: fail_score 0.95"."""
        text = f"threshold {self.threshold:g}, min_defect_area {self.min_defect_area}, fail_score {self.fail_score:g}"
        for name, rule in (self.per_class or {}).items():
            text += f"; {name}: " + ", ".join(f"{f} {rule[f]:g}" for f in RULE_FIELDS if f in rule)
        return text

    def as_dict(self) -> dict:
        data = {f: getattr(self, f) for f in RULE_FIELDS}
        if self.per_class:
            data["per_class"] = self.per_class
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VerdictRules:
        """The rule of a recorded point; ValueError names a missing or non-numeric field."""
        missing = [f for f in RULE_FIELDS if f not in data]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        for f in RULE_FIELDS:
            if isinstance(data[f], bool) or not isinstance(data[f], (int, float)):
                raise ValueError(f"{f} {data[f]!r} is not a number")
        if data["min_defect_area"] != int(data["min_defect_area"]):
            raise ValueError(f"min_defect_area {data['min_defect_area']!r} is not a whole number of pixels")
        return cls(float(data["threshold"]), int(data["min_defect_area"]), float(data["fail_score"]), data.get("per_class") or None)


# The rule of a model registered without a chosen operating point (the reference's 0.5 threshold).
DEFAULT_RULES = VerdictRules(threshold=0.5, min_defect_area=16, fail_score=0.5)


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


def to_uint8_ops(probabilities):
    """to_uint8 with keras.ops, inside a compiled program (both round half to even, as np.rint)."""
    import keras

    ops = keras.ops
    return ops.cast(ops.round(ops.clip(ops.cast(probabilities, "float32"), 0.0, 1.0) * 255.0), "uint8")


def find_defects(scores: np.ndarray, classes: list[str], rules: VerdictRules, origin: tuple[int, int] = (0, 0)) -> list[DefectRecord]:
    """Connected regions (8-connectivity) of each class channel of a (C, H, W) uint8 map.

    Regions smaller than `rules.min_defect_area` are noise and not recorded. `origin` shifts
    coordinates when `scores` is a window of a larger image.
    """
    from skimage.measure import regionprops

    _check_shape(scores, classes)
    found: list[DefectRecord] = []
    for index, name in enumerate(classes):
        rule = rules.for_class(name)
        above = scores[index] >= score_cutoff(rule.threshold)
        rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
        if not rows.size:
            continue  # most images: nothing to label (a whole-image labelling costs milliseconds a worker needs)
        # Labelled inside the box holding every pixel above the threshold: the same regions, fewer pixels.
        top, left = int(rows[0]), int(cols[0])
        box = (slice(top, int(rows[-1]) + 1), slice(left, int(cols[-1]) + 1))
        channel = scores[index][box]
        labels = _defect_labels(above[box], rule)
        for region in regionprops(labels, intensity_image=channel):
            y0, x0, y1, x1 = (a + b for a, b in zip(region.bbox, (top, left, top, left), strict=True))
            cy, cx = region.centroid
            cy, cx = cy + top, cx + left
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


def _check_shape(scores: np.ndarray, classes: list[str]) -> None:
    if scores.ndim != 3 or scores.shape[0] != len(classes):
        raise ValueError(f"expected a ({len(classes)}, H, W) score map, got shape {scores.shape}")


def score_cutoff(threshold: float) -> int:
    """Step 1 of the rule on the stored uint8 scale: the lowest stored value that reaches `threshold`."""
    return int(np.ceil(threshold * 255.0 - 1e-9))


def _defect_labels(above: np.ndarray, rule: VerdictRules) -> np.ndarray:
    """Step 2 of the rule on step 1's (H, W) mask of pixels at or above the threshold: labelled regions, noise removed (label 0)."""
    from skimage.measure import label

    labels = label(above, connectivity=2)
    # Drop noise in one vectorised pass: per-region properties are costly when specks are many.
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    labels[areas[labels] < rule.min_defect_area] = 0
    return labels


def recorded_mask(defects: list[DefectRecord], shape: tuple[int, int, int]) -> np.ndarray:
    """(C, H, W) bool: the pixels of the recorded defects, from their RLE masks (what Dice at the operating point scores)."""
    mask = np.zeros(shape, bool)
    for d in defects:
        y0, x0, y1, x1 = d.bbox
        mask[d.class_index, y0:y1, x0:x1] |= rle.decode(d.rle, (y1 - y0, x1 - x0))
    return mask


def per_class_without(per_class: dict[str, dict[str, float]] | None, fields) -> dict[str, dict[str, float]] | None:
    """Per-class rules with `fields` taken out (and classes left with none dropped): a value set for every class
    (by a run's settings, or a threshold given at registration) would otherwise lose to a recorded per-class one."""
    kept = {name: {f: v for f, v in rule.items() if f not in fields} for name, rule in (per_class or {}).items()}
    return {name: rule for name, rule in kept.items() if rule} or None


def verdict_score(defects: list[DefectRecord], rules: VerdictRules) -> float:
    """The image's verdict score, 0 without defects: the highest of its defects' maximum scores, each moved by
    how far its class's fail_score lies from the common one, so that the image fails exactly when the score
    reaches the common fail_score (with per-class fail_scores, the raw highest score ranks images against
    their verdicts: a 0.8 scratch under fail_score 0.9 passes, a 0.4 dent under 0.3 fails)."""
    return max((d.max_score + (rules.fail_score - rules.for_class(d.class_name).fail_score) for d in defects), default=0.0)


def fails(defects: list[DefectRecord], rules: VerdictRules) -> bool:
    """Step 4 of the rule: a defect scoring at least its class's fail_score fails the image."""
    return any(d.max_score >= rules.for_class(d.class_name).fail_score for d in defects)


def judge(position: int, scores: np.ndarray, classes: list[str], rules: VerdictRules) -> ImageResult:
    """The verdict for one image's (C, H, W) uint8 map: fail when a recorded defect scores at least fail_score."""
    defects = find_defects(scores, classes, rules)
    failed = fails(defects, rules)
    return ImageResult(
        position=position,
        verdict="fail" if failed else "pass",
        max_score=float(scores.max()) / 255.0 if scores.size else 0.0,
        defect_pixels=sum(d.area for d in defects),
        defects=defects,
    )

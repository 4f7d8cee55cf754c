"""Evaluation metrics (NumPy): Dice and IoU at thresholds, image-level verdicts, pixel AUROC.

Dice at threshold t, per image and class: (2 |P & T| + eps) / (|P| + |T| + eps), P = prob > t,
eps = 1e-5, averaged over images and classes. (The reference calls this "IoU"; it is the Dice
form.) An image with no defect and no predicted pixel scores 1. True IoU is
(|P & T| + eps) / (|P | T| + eps) on the same terms.

Image level: an image is predicted defective at t when its maximum probability (over pixels
and classes) is above t, and is truly defective when any target pixel is set.
TPR = TP / (TP + FN), TNR = TN / (TN + FP); undefined ratios are reported as None.

Pixel AUROC: the probability that a random defect pixel scores above a random background pixel
(ties count one half). `SegmentationScores` accumulates it from 65,536-bin histograms so that it
streams over any number of images; it equals the exact value when no two distinct scores share
a bin (scores quantised to 1/65535).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

THRESHOLDS = (0.05, 0.125, 0.25, 0.5, 0.75, 0.85, 0.95, 0.99)
EPS = 1e-5
_BINS = 65536


def _as_4d(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"expected (N, H, W) or (N, H, W, classes), got shape {array.shape}")
    return array


def dice_per_image(probs: np.ndarray, targets: np.ndarray, threshold: float) -> np.ndarray:
    """(N, classes) Dice scores."""
    pred = _as_4d(probs) > threshold
    true = _as_4d(targets) > 0.5
    intersection = (pred & true).sum(axis=(1, 2), dtype=np.float64)
    total = pred.sum(axis=(1, 2), dtype=np.float64) + true.sum(axis=(1, 2), dtype=np.float64)
    return (2 * intersection + EPS) / (total + EPS)


def iou_per_image(probs: np.ndarray, targets: np.ndarray, threshold: float) -> np.ndarray:
    """(N, classes) intersection-over-union scores."""
    pred = _as_4d(probs) > threshold
    true = _as_4d(targets) > 0.5
    intersection = (pred & true).sum(axis=(1, 2), dtype=np.float64)
    union = (pred | true).sum(axis=(1, 2), dtype=np.float64)
    return (intersection + EPS) / (union + EPS)


def image_confusion(max_scores: np.ndarray, defective: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    predicted = np.asarray(max_scores) > threshold
    truth = np.asarray(defective, bool)
    tp = int((predicted & truth).sum())
    tn = int((~predicted & ~truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    return {
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tpr": tp / (tp + fn) if tp + fn else None,
        "tnr": tn / (tn + fp) if tn + fp else None,
    }


def pixel_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Exact AUROC by ranks (Mann-Whitney U); None when one of the two kinds of pixel is absent."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average ranks over ties.
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = starts + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def _auroc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float | None:
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    negatives_below = np.cumsum(negative) - negative
    wins = (positive * (negatives_below + 0.5 * negative)).sum()
    return float(wins / (n_pos * n_neg))


def _per_image(scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(N,) means of (N, classes) scores over the classes labelled or predicted on each image, 1 where none is: over
    every class, a multi-class model's empty channels scored 1 each (a defect missed entirely gave Dice 0.5)."""
    counted = present.sum(axis=1)
    return np.where(counted > 0, (scores * present).sum(axis=1) / np.maximum(counted, 1), 1.0)


@dataclass
class SegmentationScores:
    """Accumulates per-image scores batch by batch; `result()` gives the metrics dict."""

    thresholds: tuple[float, ...] = THRESHOLDS
    dice: dict[float, list[np.ndarray]] = field(default_factory=dict)
    iou: dict[float, list[np.ndarray]] = field(default_factory=dict)
    # (N, classes): the class is labelled or predicted on the image (its Dice counts in the image's mean).
    present: dict[float, list[np.ndarray]] = field(default_factory=dict)
    max_scores: list[np.ndarray] = field(default_factory=list)
    defective: list[np.ndarray] = field(default_factory=list)
    positive_hist: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, np.int64))
    negative_hist: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, np.int64))

    def update(self, probs: np.ndarray, targets: np.ndarray) -> None:
        probs, targets = _as_4d(probs), _as_4d(targets)
        for t in self.thresholds:
            self.dice.setdefault(t, []).append(dice_per_image(probs, targets, t))
            self.iou.setdefault(t, []).append(iou_per_image(probs, targets, t))
            self.present.setdefault(t, []).append(((probs > t) | (targets > 0.5)).any(axis=(1, 2)))
        self.max_scores.append(probs.max(axis=(1, 2, 3)))
        truth = targets > 0.5
        self.defective.append(truth.any(axis=(1, 2, 3)))
        bins = np.clip(np.round(probs * (_BINS - 1)), 0, _BINS - 1).astype(np.int64)
        self.positive_hist += np.bincount(bins[truth], minlength=_BINS)
        self.negative_hist += np.bincount(bins[~truth], minlength=_BINS)

    def result(self) -> dict:
        if not self.max_scores:
            raise ValueError("no images were scored")
        max_scores = np.concatenate(self.max_scores)
        defective = np.concatenate(self.defective)
        per_threshold = {}
        for t in self.thresholds:
            present = np.concatenate(self.present[t])
            dice, iou = (_per_image(np.concatenate(scores[t]), present) for scores in (self.dice, self.iou))
            row = {
                "dice": float(dice.mean()),
                "dice_defective": float(dice[defective].mean()) if defective.any() else None,
                "iou": float(iou.mean()),
            }
            row.update(image_confusion(max_scores, defective, t))
            per_threshold[f"{t:g}"] = row
        return {
            "images": len(max_scores),
            "defective_images": int(defective.sum()),
            "pixel_auroc": _auroc_from_histograms(self.positive_hist, self.negative_hist),
            "thresholds": per_threshold,
        }

"""Evaluate a model on a labelled dataset: the metrics of model/metrics.py, as a dict, a table and JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

from defectscan.data.dataset import LabelledImages
from defectscan.errors import DataError, ModelError
from defectscan.model.metrics import THRESHOLDS, SegmentationScores


def evaluate_model(model, images: LabelledImages, *, batch_size: int = 4, thresholds=THRESHOLDS) -> dict:
    """Run `model` over every image of `images` (whole images, no augmentation) and score it."""
    import tensorflow as tf

    from defectscan.data.dataset import evaluation_dataset

    if len(images) == 0:
        raise DataError(f"{images.name}: no usable images to evaluate ({images.problems.summary()})")
    outputs = model.output_shape[-1]
    if outputs != len(images.classes):
        raise ModelError(f"the model has {outputs} output classes but the dataset {images.name} has {len(images.classes)} ({', '.join(images.classes)})")
    multiple = getattr(model, "size_multiple", 16)
    height, width = images.shape
    if height % multiple or width % multiple:
        raise DataError(f"{images.name}: images are {height}x{width}; the model needs multiples of {multiple}")

    forward = tf.function(lambda x: model(x, training=False))
    scores = SegmentationScores(thresholds=tuple(thresholds))
    started = time.perf_counter()
    for x, y in evaluation_dataset(images, batch_size=batch_size):
        scores.update(forward(x).numpy(), y.numpy())
    seconds = time.perf_counter() - started
    result = scores.result()
    result.update(
        {
            "dataset": images.name,
            "classes": images.classes,
            "skipped_files": len(images.problems),
            "seconds": round(seconds, 2),
            "images_per_second": round(result["images"] / seconds, 2),
        }
    )
    return result


def format_table(metrics: dict) -> str:
    """The per-threshold table that `defectscan evaluate` prints."""
    header = f"{'threshold':>9}  {'Dice':>6}  {'Dice(def)':>9}  {'IoU':>6}  {'TP':>5}  {'TN':>5}  {'FP':>5}  {'FN':>5}  {'TPR':>6}  {'TNR':>6}"
    lines = [
        (
            f"{metrics['dataset']}: {metrics['images']} images, {metrics['defective_images']} defective; "
            f"pixel AUROC {_f(metrics['pixel_auroc'])}"
        ),
        header,
    ]
    for threshold, row in metrics["thresholds"].items():
        lines.append(
            f"{threshold:>9}  {_f(row['dice']):>6}  {_f(row['dice_defective']):>9}  {_f(row['iou']):>6}  "
            f"{row['tp']:>5}  {row['tn']:>5}  {row['fp']:>5}  {row['fn']:>5}  {_f(row['tpr']):>6}  {_f(row['tnr']):>6}"
        )
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path

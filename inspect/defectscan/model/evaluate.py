"""Evaluate a model on a labelled dataset, as a dict, tables and JSON.

Two views of one pass over the images:
- "verdict_rule": the model's verdicts under the rule `inspect` applies (model/verdict.py), with
  image TPR/TNR, escape and false-call rates, Dice of the recorded defects and image ROC AUC
  (model/operating_point.py): what the line will see;
- "thresholds": the reference's figures (Dice/IoU per threshold, an image is defective when its
  maximum probability passes the threshold; model/metrics.py): for model development.
With `choose_operating_point`, the rule is chosen on these images for a target false-call rate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from defectscan.data.dataset import LabelledImages, image_group
from defectscan.errors import DataError, ModelError
from defectscan.model.metrics import THRESHOLDS, SegmentationScores
from defectscan.model.operating_point import NoOperatingPoint, RuleGrid, RuleScores
from defectscan.model.preprocess import contract_of
from defectscan.model.variants import check_whole_images
from defectscan.model.verdict import DEFAULT_RULES, VerdictRules, to_uint8


def evaluate_model(
    model,
    images: LabelledImages,
    *,
    batch_size: int = 4,
    thresholds=THRESHOLDS,
    rules: VerdictRules = DEFAULT_RULES,
    choose_for: float | None = None,
    chosen_on: str = "evaluation images",
    class_names: list[str] | None = None,
) -> dict:
    """Run `model` over every image of `images` (whole images, no augmentation) and score it.

    `rules` is the verdict rule to score (the model's operating point); with `choose_for` (a target
    false-call rate) an operating point is chosen on these images and scored instead. When no rule
    meets the target, "operating_point" is None, "no_operating_point" says why and `rules` is scored.
    `class_names` are the model's names of its output channels (its per-class rules name them, as
    inspect judges); by default the dataset's, channel by channel.
    """
    import tensorflow as tf

    from defectscan.model.feed import evaluation_dataset

    check_fits(model, images)
    forward = tf.function(lambda x: model(x, training=False))
    reference = SegmentationScores(thresholds=tuple(thresholds))
    classes = list(class_names or images.classes)
    groups = [image_group(key) for key in images.keys]
    started = time.perf_counter()
    # Choosing needs every map twice (the grid, then the chosen rule): they are kept, N x H x W bytes.
    grid, kept = (RuleGrid(), []) if choose_for is not None else (None, None)
    verdicts = RuleScores(rules, classes)
    index = 0
    for x, y in evaluation_dataset(images, batch_size=batch_size):
        probs, targets = forward(x).numpy(), y.numpy()
        reference.update(probs, targets)
        # As inspect stores them: one (C, H, W) uint8 map per image.
        for score_map, truth in zip(to_uint8(probs).transpose(0, 3, 1, 2), targets.transpose(0, 3, 1, 2) > 0.5, strict=True):
            if grid is not None:
                grid.update(score_map, truth)
                kept.append((score_map, truth, groups[index]))
            else:
                verdicts.update(score_map, truth, groups[index])
            index += 1
    chosen = {}
    if grid is not None:
        try:
            chosen["operating_point"] = grid.choose(choose_for, what=chosen_on)
            verdicts = RuleScores(VerdictRules.from_dict(chosen["operating_point"]), classes)
        except NoOperatingPoint as exc:
            # The images were scored all the same: `rules` is scored instead and the caller decides.
            chosen = {"operating_point": None, "no_operating_point": str(exc)}
        for score_map, truth, group in kept:
            verdicts.update(score_map, truth, group)
    seconds = time.perf_counter() - started
    result = {"verdict_rule": verdicts.result(), **reference.result(), **chosen}
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


def check_fits(model, images: LabelledImages) -> None:
    """Refuse images the model cannot score whole: none usable, other classes, sizes off its input multiple."""
    if len(images) == 0:
        raise DataError(f"{images.name}: no usable images to evaluate ({images.problems.summary()})")
    outputs = model.output_shape[-1]
    if outputs != len(images.classes):
        raise ModelError(f"the model has {outputs} output classes but the dataset {images.name} has {len(images.classes)} ({', '.join(images.classes)})")
    check_whole_images(images.name, images.shape, contract_of(model).multiple_of)


def format_table(metrics: dict) -> str:
    """What `defectscan evaluate` prints: the verdict-rule table, then the reference's per-threshold table."""
    return format_verdicts(metrics) + "\n\n" + format_reference(metrics)


def format_verdicts(metrics: dict) -> str:
    figures = metrics["verdict_rule"]
    rule = figures["rule"]
    point = metrics.get("operating_point")
    how = (
        f"chosen on these images for a false-call rate of at most {point['target_false_call_rate']:g}"
        if point
        else "the model's operating point"
    )
    lines = [
        f"{metrics['dataset']}: {figures['images']} images, {figures['defective_images']} defective",
        f"verdict rule ({how}): {VerdictRules.from_dict(rule).describe()}",
        f"{'images':<14} {'TP':>5} {'TN':>5} {'FP':>5} {'FN':>5}  {'TPR':>6} {'TNR':>6}  {'escape':>6} {'f-call':>6}  {'Dice':>6} {'Dice(def)':>9}  {'ROC AUC':>7}",
    ]
    rows = [("all", figures), *figures.get("groups", {}).items()]
    for name, row in rows:
        lines.append(
            f"{name:<14} {row['tp']:>5} {row['tn']:>5} {row['fp']:>5} {row['fn']:>5}  {_f(row['tpr'], 3):>6} {_f(row['tnr'], 3):>6}  "
            f"{_f(row['escape_rate'], 3):>6} {_f(row['false_call_rate'], 3):>6}  {_f(row['dice']):>6} {_f(row['dice_defective']):>9}  {_f(row['image_auroc']):>7}"
        )
    lines.append(f"failed defective images with a defect box overlapping a labelled one: {figures['detected_with_box_overlap']}")
    return "\n".join(lines)


def format_reference(metrics: dict) -> str:
    """The reference's table: an image is defective when its maximum probability passes the threshold."""
    header = f"{'threshold':>9}  {'Dice':>6}  {'Dice(def)':>9}  {'IoU':>6}  {'TP':>5}  {'TN':>5}  {'FP':>5}  {'FN':>5}  {'TPR':>6}  {'TNR':>6}"
    lines = [
        f"reference figures (image defective when its maximum probability passes the threshold); pixel AUROC {_f(metrics['pixel_auroc'])}",
        header,
    ]
    for threshold, row in metrics["thresholds"].items():
        lines.append(
            f"{threshold:>9}  {_f(row['dice']):>6}  {_f(row['dice_defective']):>9}  {_f(row['iou']):>6}  "
            f"{row['tp']:>5}  {row['tn']:>5}  {row['fp']:>5}  {row['fn']:>5}  {_f(row['tpr']):>6}  {_f(row['tnr']):>6}"
        )
    return "\n".join(lines)


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path

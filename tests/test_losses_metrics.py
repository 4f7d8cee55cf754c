"""Losses and metrics against values worked out by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from defectscan.model.losses import adaptive_loss, bce_loss, dice_loss, hard_dice, l2_penalty
from defectscan.model.metrics import (
    THRESHOLDS,
    SegmentationScores,
    dice_per_image,
    image_confusion,
    iou_per_image,
    pixel_auroc,
)


def _4d(rows):
    return np.array(rows, np.float32)[None, ..., None]


def test_dice_loss_by_hand():
    y_true = _4d([[1, 0], [0, 0]])
    y_pred = _4d([[0.5, 0.5], [0, 0]])
    # intersection 0.5, |T| + |P| = 1 + 1: Dice = (2*0.5 + 1) / (2 + 1) = 2/3.
    assert float(dice_loss(y_true, y_pred)) == pytest.approx(1 / 3)
    # Defect-free image, nothing predicted: Dice = (0 + 1) / (0 + 1), no loss.
    assert float(dice_loss(_4d([[0, 0]]), _4d([[0, 0]]))) == pytest.approx(0.0)
    # Per image then averaged: the two images above together.
    both_true = np.concatenate([_4d([[1, 0], [0, 0]]), _4d([[0, 0], [0, 0]])])
    both_pred = np.concatenate([_4d([[0.5, 0.5], [0, 0]]), _4d([[0, 0], [0, 0]])])
    assert float(dice_loss(both_true, both_pred)) == pytest.approx((1 / 3 + 0) / 2)


def test_bce_by_hand():
    # -[log 0.5 + log(1 - 0.25)] / 2
    assert float(bce_loss(_4d([[1, 0]]), _4d([[0.5, 0.25]]))) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, rel=1e-6)


def test_adaptive_loss_switches_below_threshold():
    y_true = _4d([[1, 0], [0, 0]])
    poor = _4d([[0.5, 0.5], [0, 0]])  # Dice loss 1/3 >= 0.3: BCE
    assert float(adaptive_loss(y_true, poor)) == pytest.approx(float(bce_loss(y_true, poor)))
    good = _4d([[0.9, 0.0], [0, 0]])  # Dice = (1.8 + 1) / (1.9 + 1): loss 0.0345 < 0.3: Dice loss
    assert float(adaptive_loss(y_true, good)) == pytest.approx(1 - 2.8 / 2.9, rel=1e-5)
    assert float(adaptive_loss(y_true, poor, switch_at=0.5)) == pytest.approx(1 / 3)


def test_l2_penalty_decays_kernels_not_biases():
    import keras

    layer = keras.layers.Conv2D(1, 1, kernel_initializer=keras.initializers.Constant(2.0), bias_initializer=keras.initializers.Constant(5.0))
    layer.build((None, 4, 4, 3))
    # kernel: three 2.0 values -> sum(w^2)/2 = 6; times 1e-5.
    assert float(l2_penalty(layer.weights, 1e-5)) == pytest.approx(6e-5)
    assert float(l2_penalty(layer.weights, 0.0)) == 0.0


def test_hard_dice_thresholds_prediction():
    y_true = _4d([[1, 1], [0, 0]])
    assert float(hard_dice(y_true, _4d([[0.7, 0.2], [0.6, 0]]))) == pytest.approx((2 * 1 + 1e-5) / (2 + 2 + 1e-5))


def test_dice_and_iou_per_image_by_hand():
    probs = _4d([[0.9, 0.6, 0.2], [0.1, 0.0, 0.0]])
    true = _4d([[1, 0, 1], [1, 0, 0]])
    # At 0.5: P = 2 pixels, T = 3, overlap 1, union 4.
    assert dice_per_image(probs, true, 0.5)[0, 0] == pytest.approx((2 + 1e-5) / (5 + 1e-5))
    assert iou_per_image(probs, true, 0.5)[0, 0] == pytest.approx((1 + 1e-5) / (4 + 1e-5))
    # At 0.05: P = 4 pixels (0.9, 0.6, 0.2, 0.1), overlap 3, union 4.
    assert dice_per_image(probs, true, 0.05)[0, 0] == pytest.approx((6 + 1e-5) / (7 + 1e-5))
    assert iou_per_image(probs, true, 0.05)[0, 0] == pytest.approx((3 + 1e-5) / (4 + 1e-5))
    empty = np.zeros((1, 2, 2, 1))
    assert dice_per_image(empty, empty, 0.5)[0, 0] == 1.0 and iou_per_image(empty, empty, 0.5)[0, 0] == 1.0


def test_image_level_confusion_by_hand():
    max_scores = np.array([0.9, 0.4, 0.6, 0.1, 0.7])
    defective = np.array([True, True, False, False, True])
    assert image_confusion(max_scores, defective, 0.5) == {"tp": 2, "tn": 1, "fp": 1, "fn": 1, "tpr": 2 / 3, "tnr": 1 / 2}
    assert image_confusion(max_scores[:2], defective[:2], 0.95)["tnr"] is None


def test_pixel_auroc_by_hand_with_ties():
    # Positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert pixel_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie counts one half: positive 0.4 vs negatives 0.4, 0.1 -> (0.5 + 1) / 2.
    assert pixel_auroc([0.4, 0.1, 0.4], [0, 0, 1]) == pytest.approx(0.75)
    assert pixel_auroc([0.2, 0.3], [0, 0]) is None


def test_streaming_scores_match_the_direct_computation():
    rng = np.random.default_rng(0)
    probs = rng.random((6, 8, 8, 1))
    targets = (rng.random((6, 8, 8, 1)) < 0.2).astype(np.float32)
    targets[4:] = 0  # two defect-free images
    scores = SegmentationScores()
    scores.update(probs[:4], targets[:4])
    scores.update(probs[4:], targets[4:])
    result = scores.result()
    assert result["images"] == 6 and result["defective_images"] == 4
    assert list(result["thresholds"]) == [f"{t:g}" for t in THRESHOLDS]
    half = result["thresholds"]["0.5"]
    assert half["dice"] == pytest.approx(dice_per_image(probs, targets, 0.5).mean())
    assert half["dice_defective"] == pytest.approx(dice_per_image(probs[:4], targets[:4], 0.5).mean())
    assert half["iou"] == pytest.approx(iou_per_image(probs, targets, 0.5).mean())
    assert {k: half[k] for k in ("tp", "fn", "tpr")} == {"tp": 4, "fn": 0, "tpr": 1.0}
    assert half["tn"] == 0 and half["fp"] == 2
    # Random scores: distinct histogram bins almost surely, so the streamed AUROC is the exact one.
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(probs, targets), abs=1e-4)
    with pytest.raises(ValueError, match="no images"):
        SegmentationScores().result()


def test_cross_entropy_from_logits_keeps_a_gradient_where_probabilities_saturate():
    import tensorflow as tf

    y_true = _4d([[1, 0]])
    logits = tf.constant(np.array([[-40.0, 0.5]], np.float32).reshape(1, 1, 2, 1))
    moderate = tf.constant(np.array([[0.3, 0.5]], np.float32).reshape(1, 1, 2, 1))
    # Same value where nothing is clipped ...
    assert float(bce_loss(y_true, tf.sigmoid(moderate), logits=moderate)) == pytest.approx(float(bce_loss(y_true, tf.sigmoid(moderate))), rel=1e-5)
    # ... but a defect pixel scored p = sigmoid(-40) still pulls its logit up (p - y = -1), where the
    # clipped probability gives it no gradient at all: a saturated model could never recover.
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        from_logits = bce_loss(y_true, tf.sigmoid(logits), logits=logits)
        from_probabilities = bce_loss(y_true, tf.sigmoid(logits))
    assert float(tape.gradient(from_logits, logits)[0, 0, 0, 0]) == pytest.approx(-0.5)
    assert float(tape.gradient(from_probabilities, logits)[0, 0, 0, 0]) == 0.0


def test_pos_weight_multiplies_the_defect_pixels_cross_entropy_from_logits_and_probabilities():
    import tensorflow as tf

    y_true = _4d([[1, 0]])
    logits = tf.constant([[[[0.3], [-0.7]]]])
    p = tf.sigmoid(logits)
    plain = -(math.log(float(p[0, 0, 0, 0])) + math.log(1 - float(p[0, 0, 1, 0]))) / 2
    weighted = -(5 * math.log(float(p[0, 0, 0, 0])) + math.log(1 - float(p[0, 0, 1, 0]))) / 2
    assert float(bce_loss(y_true, p, logits=logits)) == pytest.approx(plain, rel=1e-5)
    assert float(bce_loss(y_true, p, logits=logits, pos_weight=5.0)) == pytest.approx(weighted, rel=1e-5)
    assert float(bce_loss(y_true, p, pos_weight=5.0)) == pytest.approx(weighted, rel=1e-5)

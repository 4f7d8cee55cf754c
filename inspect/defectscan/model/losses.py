"""Training losses of the reference recipe (TensorFlow ops on probability maps).

Shapes: y_true and y_pred are (B, H, W, classes), y_pred being sigmoid probabilities. Training
also passes `logits` (the values before the sigmoid): cross-entropy is then computed from them,
whose gradient (p - y) never vanishes. Through clipped probabilities it does: a model whose
outputs saturate (a Dice-trained one on an unseen surface, p < 1e-7 on a defect) gets no
gradient at all there and never recovers; a fine-tune from such a model collapsed to "no defect
anywhere" within 50 steps.
"""

from __future__ import annotations

import tensorflow as tf

DICE_SMOOTHING = 1.0
SWITCH_AT = 0.3


def dice_loss(y_true, y_pred, smoothing: float = DICE_SMOOTHING, logits=None):
    """1 - soft Dice per image (over H, W and classes), averaged over the batch."""
    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    intersection = tf.reduce_sum(y_true * y_pred, axis=(1, 2, 3))
    total = tf.reduce_sum(y_true, axis=(1, 2, 3)) + tf.reduce_sum(y_pred, axis=(1, 2, 3))
    return 1.0 - tf.reduce_mean((2.0 * intersection + smoothing) / (total + smoothing))


def bce_loss(y_true, y_pred, logits=None, pos_weight: float = 1.0):
    """Mean binary cross-entropy over every pixel and class (from `logits` when given).

    `pos_weight` multiplies the defect pixels' term: defects cover a few per mille of the pixels, and
    unweighted they pull far less than the background does.
    """
    y_true = tf.cast(y_true, tf.float32)
    if logits is not None:
        logits = tf.cast(logits, tf.float32)
        if pos_weight == 1.0:
            return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=logits))
        return tf.reduce_mean(tf.nn.weighted_cross_entropy_with_logits(labels=y_true, logits=logits, pos_weight=pos_weight))
    y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
    return -tf.reduce_mean(pos_weight * y_true * tf.math.log(y_pred) + (1.0 - y_true) * tf.math.log(1.0 - y_pred))


def adaptive_loss(y_true, y_pred, switch_at: float = SWITCH_AT, smoothing: float = DICE_SMOOTHING, logits=None):
    """BCE while the batch's Dice loss is at or above `switch_at`, the Dice loss once it falls below.

    As in the reference, the choice is made per batch: BCE gets the probabilities off the ground,
    Dice then sharpens the overlap without the background pixels dominating.
    """
    dice = dice_loss(y_true, y_pred, smoothing)
    return tf.where(dice < switch_at, dice, bce_loss(y_true, y_pred, logits))


def bce_dice_loss(y_true, y_pred, smoothing: float = DICE_SMOOTHING, bce_weight: float = 1.0, logits=None, pos_weight: float = 1.0):
    """bce_weight x BCE + Dice loss, on every batch.

    The Dice term keeps the overlap sharp on small defects; the BCE term is a proper scoring rule
    on every pixel, so probabilities keep ranking (a Dice loss alone drives them to 0 or 1: the
    same verdicts at every threshold, and no threshold or fail score left to trade with).
    """
    return bce_weight * bce_loss(y_true, y_pred, logits, pos_weight) + dice_loss(y_true, y_pred, smoothing)


LOSSES = {"adaptive": adaptive_loss, "dice": dice_loss, "bce": bce_loss, "bce_dice": bce_dice_loss}


def l2_penalty(variables, weight_decay: float):
    """weight_decay * sum(||w||^2 / 2) over convolution kernels (biases are not decayed)."""
    kernels = [tf.cast(v, tf.float32) for v in variables if "kernel" in v.path]
    if not kernels or weight_decay == 0:
        return tf.constant(0.0)
    return weight_decay * tf.add_n([tf.nn.l2_loss(k) for k in kernels])


def hard_dice(y_true, y_pred, threshold: float = 0.5, eps: float = 1e-5):
    """Dice of the thresholded prediction per image, averaged (the progress bar's Dice)."""
    y_true = tf.cast(y_true > 0.5, tf.float32)
    y_pred = tf.cast(y_pred > threshold, tf.float32)
    intersection = tf.reduce_sum(y_true * y_pred, axis=(1, 2, 3))
    total = tf.reduce_sum(y_true, axis=(1, 2, 3)) + tf.reduce_sum(y_pred, axis=(1, 2, 3))
    return tf.reduce_mean((2.0 * intersection + eps) / (total + eps))

"""Copy-paste of the training set's own defects into other crops of the same product (data.defect_paste_fraction).

With a hundred labelled images a model sees each defect on one background only; pasting it, turned
and mirrored, into other crops shows it on many (Ghiasi et al., "Simple Copy-Paste", 2021). Only the
set's own labelled defects are pasted, never drawn ones, so what the model learns stays what the
line makes; and only into crops of the same group (DAGM class folder: one product or surface), so
a defect is never shown on a surface it cannot occur on. A patch is the square around a defect's
label; the label's region, widened by two pixels and feathered, is blended in and the label goes
with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from defectscan.data.dataset import LabelledImages, image_group

log = logging.getLogger(__name__)

# Pixels by which a pasted region reaches beyond its label, then fades (so no hard seam is left).
FEATHER = 2
# Patches kept at most (a seeded choice beyond it): the bank lives in memory beside the data stream.
MAX_PATCHES = 512


@dataclass
class DefectBank:
    """Squares around the labelled defects of a set, grouped by image group, and each image's group."""

    patches: np.ndarray  # (D, P, P, 1) uint8, sorted by group
    patch_classes: np.ndarray  # (D, P, P, 1) uint8
    image_group: np.ndarray  # (N,) group number of each image of the set
    first: np.ndarray  # (G,) index of each group's first patch
    count: np.ndarray  # (G,) patches of each group

    @classmethod
    def of(cls, images: LabelledImages, size: int, seed: int) -> DefectBank:
        groups = sorted({image_group(key) for key in images.keys})
        number = {group: i for i, group in enumerate(groups)}
        of_image = np.array([number[image_group(key)] for key in images.keys], np.int32)
        donors = [i for i, flag in enumerate(images.defective) if flag]
        if len(donors) > MAX_PATCHES:
            log.info("defect paste: %d of %d defective images (a seeded choice)", MAX_PATCHES, len(donors))
            donors = sorted(np.random.default_rng(seed).choice(donors, MAX_PATCHES, replace=False).tolist())
        loaded = [(i, *images.load(i)) for i in sorted(donors, key=lambda i: of_image[i])]
        # A flag without a labelled pixel (a Labels.txt row whose mask is empty) gives nothing to paste.
        loaded = [(i, image, classes) for i, image, classes in loaded if classes.any()]
        donors = [i for i, _, _ in loaded]
        cuts = [_square_around_defect(image, classes, size) for _, image, classes in loaded]
        patches = np.stack([image for image, _ in cuts]) if cuts else np.zeros((0, size, size), np.uint8)
        classes = np.stack([c for _, c in cuts]) if cuts else np.zeros((0, size, size), np.uint8)
        count = np.bincount(of_image[donors], minlength=len(groups)).astype(np.int32)
        first = (np.cumsum(count) - count).astype(np.int32)
        return cls(patches[..., None], classes[..., None], of_image, first, count)


def _square_around_defect(image: np.ndarray, classes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The size x size square centred on the box of the labelled pixels (shifted inside the image)."""
    rows, cols = np.nonzero(classes)
    height, width = image.shape
    top = int(np.clip((rows.min() + rows.max()) // 2 - size // 2, 0, height - size))
    left = int(np.clip((cols.min() + cols.max()) // 2 - size // 2, 0, width - size))
    return image[top : top + size, left : left + size], classes[top : top + size, left : left + size]


def paste(image, classes, index, bank: DefectBank, fraction: float, seed):
    """`image`/`classes` (H, W, 1) uint8, a crop of image `index`, with, at probability `fraction`, a defect of
    another (or the same) image of its group blended in at a random place, turned and mirrored."""
    import tensorflow as tf

    from defectscan.model.feed import _flip_rotate

    height, width, size = image.shape[0], image.shape[1], bank.patches.shape[1]
    u = tf.random.stateless_uniform([4], seed=seed)
    group = tf.gather(tf.constant(bank.image_group), index)
    count = tf.gather(tf.constant(bank.count), group)
    donor = tf.gather(tf.constant(bank.first), group) + tf.minimum(tf.cast(u[1] * tf.cast(count, tf.float32), tf.int32), count - 1)
    donor = tf.maximum(donor, 0)
    # turned as float32 (class ids too, exact): an integer rot90 falls off oneDNN (and says so on stderr)
    patch, patch_classes = _flip_rotate(tf.cast(tf.gather(tf.constant(bank.patches), donor), tf.float32),
                                        tf.cast(tf.gather(tf.constant(bank.patch_classes), donor), tf.float32), seed + [0, 1])
    top = tf.cast(u[2] * (height - size + 1), tf.int32)
    left = tf.cast(u[3] * (width - size + 1), tf.int32)
    region = tf.cast(patch_classes > 0, tf.float32)[None]
    widened = tf.nn.max_pool2d(region, 2 * FEATHER + 1, 1, "SAME")
    alpha = tf.nn.avg_pool2d(widened, 2 * FEATHER + 1, 1, "SAME")[0]
    padding = [[top, height - size - top], [left, width - size - left], [0, 0]]
    alpha = tf.pad(alpha, padding)
    placed = tf.pad(patch, padding)
    placed_classes = tf.cast(tf.pad(patch_classes, padding), tf.uint8)
    blended = tf.cast(tf.round(alpha * placed + (1.0 - alpha) * tf.cast(image, tf.float32)), tf.uint8)
    relabelled = tf.where(placed_classes > 0, placed_classes, classes)
    chosen = (u[0] < fraction) & (count > 0)
    return tf.where(chosen, blended, image), tf.where(chosen, relabelled, classes)

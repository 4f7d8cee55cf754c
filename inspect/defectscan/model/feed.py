"""The one tf.data pipeline that feeds the model, from a `LabelledImages` (data/dataset.py).

In this order: decode (through the reader, in parallel), cache (memory or a file, so large sets
need not fit in memory), repeat, shuffle, random crop (part of the crops centred on a defect; at
a random scale with `zoom`), one of the set's own defects pasted into part of the crops
(model/paste.py), random horizontal flip + rot90, the model's input scaling (model/preprocess.py),
camera-like photometric changes, one sigmoid target channel per class, batch, prefetch.

The training stream is a pure function of the seed: element i of the stream always gets the
same image and the same augmentation, so a resumed run sees exactly what an uninterrupted one
would (`start_step` skips what was already trained on).
"""

from __future__ import annotations

from dataclasses import dataclass

from defectscan.data.dataset import LabelledImages
from defectscan.errors import DataError
from defectscan.model.preprocess import scale_tensor


def _require_images(images: LabelledImages) -> None:
    if len(images) == 0:
        raise DataError(f"{images.name}: no usable images ({images.problems.summary()})")


def _decode_fn(images: LabelledImages):
    import tensorflow as tf

    height, width = images.shape

    def load(index):
        image, classes = images.load(int(index))
        return image, classes

    def decode(index):
        image, classes = tf.numpy_function(load, [index], (tf.uint8, tf.uint8), stateful=False)
        image = tf.ensure_shape(image, (height, width))[..., None]
        classes = tf.ensure_shape(classes, (height, width))[..., None]
        return image, classes

    return decode


def _targets(classes, num_classes: int):
    import tensorflow as tf

    ids = tf.cast(tf.range(1, num_classes + 1), tf.uint8)
    return tf.cast(tf.equal(classes, ids), tf.float32)


def _crop(image, classes, crop_size: int, defect_fraction: float, seed, zoom: float = 0.0):
    """A crop_size square; with probability defect_fraction it contains a defect pixel (when there is one).

    With `zoom`, the square cut is crop_size x exp(+-zoom) on a side (drawn from its own stream,
    so the crops of a run without zoom stay as they were), resized back to crop_size: the pixels
    bilinearly, the class ids by nearest neighbour.
    """
    import tensorflow as tf

    height, width = image.shape[0], image.shape[1]
    u = tf.random.stateless_uniform([5], seed=seed)
    if zoom:
        scale = tf.exp(zoom * tf.random.stateless_uniform([], seed=seed + [0, 1 << 42], minval=-1.0, maxval=1.0))
        side = tf.clip_by_value(tf.cast(tf.round(crop_size * scale), tf.int32), 1, min(height, width))
    else:
        side = tf.constant(crop_size, tf.int32)
    extent = tf.cast(side, tf.float32)
    foreground = tf.where(classes[..., 0] > 0)
    count = tf.shape(foreground)[0]
    use_defect = tf.logical_and(u[0] < defect_fraction, count > 0)
    pick = tf.minimum(tf.cast(u[1] * tf.cast(count, tf.float32), tf.int32), tf.maximum(count - 1, 0))
    centre = tf.cond(use_defect, lambda: tf.cast(foreground[pick], tf.float32), lambda: tf.constant([-1.0, -1.0]))
    # Defect-centred crops are jittered by up to a quarter crop so the defect is not always central.
    jitter = (u[2:4] - 0.5) * (extent / 2)
    corner_defect = centre - extent / 2 + jitter
    corner_random = u[3:5] * tf.stack([height - extent, width - extent])
    corner = tf.where(use_defect, corner_defect, corner_random)
    top = tf.clip_by_value(tf.cast(corner[0], tf.int32), 0, height - side)
    left = tf.clip_by_value(tf.cast(corner[1], tf.int32), 0, width - side)
    image, classes = image[top : top + side, left : left + side], classes[top : top + side, left : left + side]
    if zoom:
        size = [crop_size, crop_size]
        image = tf.cast(tf.round(tf.image.resize(image, size, "bilinear", antialias=True)), tf.uint8)
        classes = tf.image.resize(classes, size, "nearest")
    return tf.ensure_shape(image, (crop_size, crop_size, 1)), tf.ensure_shape(classes, (crop_size, crop_size, 1))


def _flip_rotate(image, target, seed):
    import tensorflow as tf

    u = tf.random.stateless_uniform([2], seed=seed)
    flip = u[0] < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    target = tf.cond(flip, lambda: tf.reverse(target, [1]), lambda: target)
    k = tf.cast(u[1] * 4, tf.int32)
    # A quarter turn of a non-square image changes its shape, and batching then re-read its pixels in the old
    # shape (image and mask alike: nothing failed, the rows were scrambled). Half turns only, for those.
    k = tf.where(tf.equal(tf.shape(image)[0], tf.shape(image)[1]), k, (k // 2) * 2)
    return tf.image.rot90(image, k), tf.image.rot90(target, k)


@dataclass(frozen=True)
class Photometric:
    """What a camera varies between images: each image gets its own draw of each (0 turns it off).

    brightness: added offset, up to +-this (in the -1..1 model input scale);
    contrast: scale about the image mean by 1 +- this; gamma: exponent exp(+-this) on 0..1 pixels;
    noise: Gaussian pixel noise with a standard deviation drawn up to this (model input scale).
    """

    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    noise: float = 0.0

    @property
    def active(self) -> bool:
        return any((self.brightness, self.contrast, self.gamma, self.noise))


def _photometric(x, photometric: Photometric, seed):
    """Camera variation on a (h, w, 1) float image in -1..1 (after scaling)."""
    import tensorflow as tf

    u = tf.random.stateless_uniform([4], seed=seed, minval=-1.0, maxval=1.0)
    unit = tf.clip_by_value((x + 1.0) / 2.0, 0.0, 1.0)
    unit = tf.pow(unit, tf.exp(photometric.gamma * u[0]))
    x = unit * 2.0 - 1.0
    mean = tf.reduce_mean(x)
    x = (x - mean) * (1.0 + photometric.contrast * u[1]) + mean + photometric.brightness * u[2]
    if photometric.noise:
        sigma = photometric.noise * (u[3] + 1.0) / 2.0
        x = x + sigma * tf.random.stateless_normal(tf.shape(x), seed=seed + [0, 7])
    return tf.clip_by_value(x, -1.0, 1.0)


def training_dataset(
    images: LabelledImages,
    *,
    batch_size: int,
    seed: int,
    crop_size: int | None = None,
    defect_crop_fraction: float = 0.5,
    defect_paste_fraction: float = 0.0,
    zoom: float = 0.0,
    cache: str = "memory",
    shuffle_buffer: int = 1024,
    start_step: int = 0,
    augment: bool = True,
    photometric: Photometric = Photometric(),
    parallel: int | None = None,
):
    """An endless, seeded stream of (x (B, h, w, 1) float32, y (B, h, w, classes) float32) batches.

    cache: "memory", "none", or a file path prefix (TensorFlow's file cache) for sets larger than memory.
    """
    import tensorflow as tf

    _require_images(images)
    height, width = images.shape
    if crop_size is not None and crop_size > min(height, width):
        # (The recipe checks that a crop is a multiple of the model's input multiple.)
        raise DataError(f"{images.name}: crop_size {crop_size} must be at most the image size {height}x{width}")
    num_classes = len(images.classes)
    parallel = parallel or tf.data.AUTOTUNE

    decode = _decode_fn(images)
    decoded = tf.data.Dataset.range(len(images)).map(lambda i: (*decode(i), i), num_parallel_calls=parallel, deterministic=True)
    if cache == "memory":
        decoded = decoded.cache()
    elif cache != "none":
        # TensorFlow reads a cache file back without asking what wrote it: another run's split (its validation
        # images) or another dataset came back as these images. One file per set of images.
        decoded = decoded.cache(f"{cache}-{_cache_tag(images)}")
    stream = decoded.repeat().shuffle(min(shuffle_buffer, len(images)), seed=seed, reshuffle_each_iteration=True)
    stream = stream.enumerate().skip(start_step * batch_size)
    bank = None
    if crop_size is not None and defect_paste_fraction > 0:
        from defectscan.model.paste import DefectBank, paste

        bank = DefectBank.of(images, crop_size // 2, seed)
        if not len(bank.patches):
            bank = None  # no labelled defect to paste

    def prepare(position, sample):
        image, classes, index = sample
        element_seed = tf.stack([tf.constant(seed, tf.int64), position])
        if crop_size is not None:
            image, classes = _crop(image, classes, crop_size, defect_crop_fraction, element_seed + [0, 1 << 40], zoom)
        if bank is not None:
            image, classes = paste(image, classes, index, bank, defect_paste_fraction, element_seed + [0, 1 << 43])
        target = _targets(classes, num_classes)
        # scaled first: the same pixels turned, and a uint8 rot90 falls off oneDNN (and says so on stderr)
        x = scale_tensor(image)
        if augment:
            x, target = _flip_rotate(x, target, element_seed)
        if augment and photometric.active:
            x = _photometric(x, photometric, element_seed + [0, 1 << 41])
        return x, target

    stream = stream.map(prepare, num_parallel_calls=parallel, deterministic=True)
    return stream.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _cache_tag(images: LabelledImages) -> str:
    """A name for these images: the set's name (a Zarr set's bit depth in it), keys, classes and size. Not their
    contents: files rewritten in place under the same names need the cache file removed."""
    import hashlib
    import json

    identity = json.dumps([images.name, list(images.keys), list(images.classes), list(images.shape)])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def evaluation_dataset(images: LabelledImages, *, batch_size: int = 4, parallel: int | None = None):
    """Whole images in order, no augmentation: (x float32, y float32 targets) batches."""
    import tensorflow as tf

    _require_images(images)
    num_classes = len(images.classes)
    decoded = tf.data.Dataset.range(len(images)).map(_decode_fn(images), num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=True)
    batches = decoded.map(lambda image, classes: (scale_tensor(image), _targets(classes, num_classes)))
    return batches.batch(batch_size).prefetch(tf.data.AUTOTUNE)

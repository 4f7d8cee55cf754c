"""A UNet whose probabilities are the mean over several views of the image (test-time augmentation).

Each view flips and/or transposes the image, runs the one UNet on it and undoes the transform on
its probabilities; the model's output is their mean. A defect looks the same in every view and
keeps its score, while a pixel that one view alone calls (a texture the training images never
showed in that orientation) is averaged down. It costs one UNet pass per view.

The views are part of the saved `.keras` model, so `inspect` (either runtime), `evaluate` and the
operating point chosen after training all see the same probabilities: the verdict rule is chosen
on what the line will run. The weights are the UNet's, in its order: a model with views initialises
a plain UNet (`model.init_from`) and the other way round.
"""

from __future__ import annotations

import keras
from keras import layers

from defectscan.model.unet import UNet

# (transform, its inverse) on (batch, H, W, channels) tensors; the first N are a model's views.
# 2: + mirrored; 4: + flipped top to bottom, and both (a half turn); 8: + the four transposed (the
# dihedral group of the square: every flip and quarter turn).
_IDENTITY = (lambda x: x, lambda y: y)
_MIRROR = (lambda x: keras.ops.flip(x, axis=2), lambda y: keras.ops.flip(y, axis=2))
_FLIP = (lambda x: keras.ops.flip(x, axis=1), lambda y: keras.ops.flip(y, axis=1))
_BOTH = (lambda x: keras.ops.flip(x, axis=(1, 2)), lambda y: keras.ops.flip(y, axis=(1, 2)))


def _transposed(view):
    forward, inverse = view
    return (lambda x: keras.ops.transpose(forward(x), (0, 2, 1, 3)), lambda y: inverse(keras.ops.transpose(y, (0, 2, 1, 3))))


_VIEWS = (_IDENTITY, _MIRROR, _FLIP, _BOTH, *(_transposed(view) for view in (_IDENTITY, _MIRROR, _FLIP, _BOTH)))
VIEW_COUNTS = (1, 2, 4, 8)


@keras.saving.register_keras_serializable(package="defectscan")
class ViewAverage(keras.Model):
    """`unet`'s probabilities averaged over the first `views` of _VIEWS."""

    def __init__(self, unet: UNet | dict, views: int = 4, **kwargs):
        if isinstance(unet, dict):
            unet = keras.saving.deserialize_keras_object(unet)
        if views not in VIEW_COUNTS[1:]:
            raise ValueError(f"views must be one of {', '.join(map(str, VIEW_COUNTS[1:]))}, got {views}")
        inputs = keras.Input(shape=(None, None, unet.input_channels), name="image")
        probabilities = [inverse(unet(forward(inputs))) for forward, inverse in _VIEWS[:views]]
        # float32 even under mixed precision, like the UNet's own output.
        outputs = layers.Average(dtype="float32", name="view_average")(probabilities)
        kwargs.setdefault("name", f"{unet.name}_views")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.unet, self.views = unet, views

    @property
    def input_contract(self):
        return self.unet.input_contract

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "unet": keras.saving.serialize_keras_object(self.unet), "views": self.views}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def with_views(unet: UNet, views: int):
    """The model to save and run: `unet` itself for one view, else its view average (same weights)."""
    return unet if views == 1 else ViewAverage(unet, views)


def views_of(model) -> int:
    """How many views a loaded model averages (1: a plain UNet or another model)."""
    return getattr(model, "views", 1)

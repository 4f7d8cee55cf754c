"""UNet: the Keras 3 re-creation of NVIDIA's UNet_Industrial segmentation network ("TinyUNet" is its
`tinyunet` preset, model/variants.py).

Structure (filters = (32, 32, 64, 128, 256) by default, as in NVIDIA's DeepLearningExamples,
TensorFlow/Segmentation/UNet_Industrial):

    input block   conv3x3(f0) x2            -> skip0, maxpool
    down block i  conv3x3(fi) x2            -> skip i, maxpool        (f1, f2, f3)
    bottleneck    conv3x3(f4) x2 -> up-conv(f3)
    up block i    concat(skip i) -> conv3x3(fi) -> conv3x3(fi/2) -> up-conv(fi/2)   (f3, f2, f1)
    output block  concat(skip0) -> conv3x3(f0) x2 -> conv1x1(classes) -> sigmoid

"up-conv" is nearest-neighbour 2x upsampling followed by a 2x2 convolution. Every conv has a
bias, 'same' padding and ReLU; there is no batch normalisation. The input is one channel
already scaled by `defectscan.model.preprocess.to_model_input` (x / 127.5 - 1); height and
width must be multiples of 2 ** (len(filters) - 1) (16 by default).

`filters=(64, 128, 256, 512, 1024)` gives the "original" UNet widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from defectscan.model import variants


@keras.saving.register_keras_serializable(package="defectscan")
class UpConv(layers.Layer):
    """Nearest-neighbour 2x upsampling, then a 2x2 'same' convolution with ReLU."""

    def __init__(self, filters: int, kernel_initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        # === layers ===
        self.upsample = layers.UpSampling2D(size=2, interpolation="nearest", name="upsample", dtype=self.dtype_policy)
        self.conv = layers.Conv2D(
            filters,
            2,
            padding="same",
            activation="relu",
            kernel_initializer=self.kernel_initializer,
            name="conv",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        self.upsample.build(input_shape)
        up_shape = self.upsample.compute_output_shape(input_shape)
        self.conv.build(up_shape)
        self.built = True

    def call(self, inputs):
        return self.conv(self.upsample(inputs))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(self.upsample.compute_output_shape(input_shape))

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)})
        return config


@keras.saving.register_keras_serializable(package="defectscan")
class UNet(keras.Model):
    """Per-pixel defect probabilities, one sigmoid channel per defect class.

    Args:
        num_classes: output channels (one per defect class, in the order of the class names).
        filters: widths of the input block, each down block and the bottleneck.
        input_channels: channels of the input image (1 for grayscale).
        seed: seed of the He-normal initialiser, so that two builds with one seed are equal.
    """

    def __init__(
        self,
        num_classes: int = 1,
        filters: Sequence[int] = variants.TINY_FILTERS,
        input_channels: int = 1,
        seed: int | None = None,
        **kwargs,
    ):
        filters = tuple(int(f) for f in filters)
        if len(filters) < 3:
            raise ValueError(f"filters must list the input block, at least one down block and the bottleneck, got {filters}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        init_seed = [seed]

        def initializer():
            # A distinct seed per layer: one shared seed would give every same-shaped kernel the same values.
            if init_seed[0] is None:
                return keras.initializers.HeNormal()
            init_seed[0] += 1
            return keras.initializers.HeNormal(seed=init_seed[0])

        def conv(x, width, name, kernel=3, activation="relu"):
            return layers.Conv2D(width, kernel, padding="same", activation=activation, kernel_initializer=initializer(), name=name)(x)

        # === functional model ===
        inputs = keras.Input(shape=(None, None, input_channels), name="image")
        x = conv(inputs, filters[0], "input_conv1")
        x = conv(x, filters[0], "input_conv2")
        skips = [x]
        x = layers.MaxPooling2D(2, name="input_pool")(x)
        down = filters[1:-1]
        for level, width in enumerate(down, start=1):
            x = conv(x, width, f"down{level}_conv1")
            x = conv(x, width, f"down{level}_conv2")
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
        x = conv(x, filters[-1], "bottleneck_conv1")
        x = conv(x, filters[-1], "bottleneck_conv2")
        x = UpConv(down[-1], kernel_initializer=initializer(), name="bottleneck_upconv")(x)
        for level in range(len(down), 0, -1):
            width = down[level - 1]
            x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
            x = conv(x, width, f"up{level}_conv1")
            x = conv(x, width // 2, f"up{level}_conv2")
            x = UpConv(width // 2, kernel_initializer=initializer(), name=f"up{level}_upconv")(x)
        x = layers.Concatenate(name="output_concat")([x, skips[0]])
        x = conv(x, filters[0], "output_conv1")
        x = conv(x, filters[0], "output_conv2")
        x = conv(x, num_classes, "output_logits", kernel=1, activation=None)
        # float32 even under mixed precision: probabilities near 0 and 1 need the precision.
        outputs = layers.Activation("sigmoid", dtype="float32", name="probabilities")(x)
        kwargs.setdefault("name", "tinyunet")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === config ===
        self.num_classes = num_classes
        self.filters = filters
        self.input_channels = input_channels
        self.seed = seed

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return variants.size_multiple(self.filters)

    @property
    def input_contract(self):
        from defectscan.model.preprocess import InputContract

        return InputContract(multiple_of=self.size_multiple, receptive_radius=variants.receptive_radius(self.filters))

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "filters": list(self.filters),
            "input_channels": self.input_channels,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="defectscan")
class TinyUNet(UNet):
    """The class name files saved before the rename carry (the shipped demo model's among them): they load as a UNet."""


def build_model(variant: str = "tinyunet", num_classes: int = 1, filters: Sequence[int] | None = None, seed: int | None = None) -> UNet:
    """The named variant (a preset of widths), or explicit `filters` when given."""
    return UNet(num_classes=num_classes, filters=variants.widths(variant, filters), seed=seed, name=variant)

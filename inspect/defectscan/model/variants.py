"""The UNet variants and what their structure means for inputs, without loading Keras.

Recipes validate against these (crop sizes, variant names) before TensorFlow is imported; the
network (model/unet.py) is built from the same widths and reports the same figures in its input
contract.
"""

from __future__ import annotations

from collections.abc import Sequence

TINY_FILTERS = (32, 32, 64, 128, 256)
ORIGINAL_FILTERS = (64, 128, 256, 512, 1024)
VARIANTS = {"tinyunet": TINY_FILTERS, "unet": ORIGINAL_FILTERS}


def widths(variant: str, filters: Sequence[int] | None = None) -> tuple[int, ...]:
    """Explicit `filters` (input block, down blocks..., bottleneck), else the named variant's."""
    if filters is not None:
        return tuple(filters)
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown model variant {variant!r}; accepted: {', '.join(VARIANTS)}") from None


def size_multiple(filters: Sequence[int]) -> int:
    """Input height and width must be multiples of this: one 2x2 pooling per level below the input block."""
    return 2 ** (len(filters) - 1)


def check_whole_images(name: str, shape: Sequence[int], multiple: int, uses: str = "") -> None:
    """Refuse images a model must take whole (evaluation, validation, whole-image training) whose height or
    width is not a multiple of its size multiple; `uses` says which of these needs them whole."""
    from defectscan.errors import DataError

    height, width = shape
    if height % multiple or width % multiple:
        needs = f"{uses} score(s) whole images, which this model needs in" if uses else "the model needs"
        raise DataError(f"{name}: images are {height}x{width}; {needs} multiples of {multiple}"
                        + (" (crop or pad the images, or train on crops without validation)" if uses else ""))


def receptive_radius(filters: Sequence[int]) -> int:
    """Pixels on either side of an output pixel that can change it.

    Per side, on the grid of stride s (1, 2, 4, ... 2 ** poolings): each 3x3 convolution reaches s
    further; each 2x2 pooling, and each up-conv's 2x2 'same' convolution (TensorFlow pads an even
    kernel after), reaches s further on one side. With S = 2 ** poolings - 1, the sum of the strides
    below the bottom: the input block's two convolutions 2, the down blocks' and bottleneck's 4S, the up
    and output blocks' 2S, poolings and up-convs 2S on the far side: 2 + 8S (122 for four poolings).
    Tiles are placed on the size multiple, so pooling grids line up as in the whole image.
    """
    return 2 + 8 * (size_multiple(filters) - 1)

"""UNet (TinyUNet preset): reference structure, parameter count, any multiple-of-16 size, config and .keras round trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from defectscan.model.preprocess import pad_to_multiple, predict_probabilities, to_model_input
from defectscan.model.unet import UNet, UpConv, build_model

SMALL = (4, 4, 8, 8, 16)


def _conv_widths(model) -> list[tuple[str, int, tuple[int, int]]]:
    return [(layer.name, layer.filters, layer.kernel_size) for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_default_tinyunet_has_the_reference_parameter_count_and_structure():
    model = build_model()
    # Input 32, blocks 32/64/128, bottleneck 256, output 32; hand count in DESIGN.md's terms:
    # conv3x3 params = 9 * in * out + out; up-conv 2x2 = 4 * in * out + out.
    expected = (
        (9 * 1 * 32 + 32) + (9 * 32 * 32 + 32)  # input block
        + (9 * 32 * 32 + 32) + (9 * 32 * 32 + 32)  # down 32
        + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64)  # down 64
        + (9 * 64 * 128 + 128) + (9 * 128 * 128 + 128)  # down 128
        + (9 * 128 * 256 + 256) + (9 * 256 * 256 + 256) + (4 * 256 * 128 + 128)  # bottleneck + up-conv
        + (9 * 256 * 128 + 128) + (9 * 128 * 64 + 64) + (4 * 64 * 64 + 64)  # up 128
        + (9 * 128 * 64 + 64) + (9 * 64 * 32 + 32) + (4 * 32 * 32 + 32)  # up 64
        + (9 * 64 * 32 + 32) + (9 * 32 * 16 + 16) + (4 * 16 * 16 + 16)  # up 32
        + (9 * 48 * 32 + 32) + (9 * 32 * 32 + 32) + (32 * 1 + 1)  # output block
    )
    assert model.count_params() == expected == 1_850_305
    widths = _conv_widths(model)
    assert [w for _, w, _ in widths] == [32, 32, 32, 32, 64, 64, 128, 128, 256, 256, 128, 64, 64, 32, 32, 16, 32, 32, 1]
    assert widths[-1] == ("output_logits", 1, (1, 1))
    upconvs = [layer for layer in model.layers if isinstance(layer, UpConv)]
    assert [(u.name, u.filters) for u in upconvs] == [("bottleneck_upconv", 128), ("up3_upconv", 64), ("up2_upconv", 32), ("up1_upconv", 16)]
    assert all(u.upsample.interpolation == "nearest" and u.conv.kernel_size == (2, 2) for u in upconvs)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert model.layers[-1].activation is keras.activations.sigmoid and model.layers[-1].dtype_policy.name == "float32"
    assert model.size_multiple == 16


def _expected_params(filters, classes):
    """Count from the structure rules alone: conv3x3 = 9*in*out+out, up-conv 2x2 = 4*in*out+out."""

    def conv(k, n_in, n_out):
        return k * k * n_in * n_out + n_out

    first, *down, bottleneck = filters
    total = conv(3, 1, first) + conv(3, first, first)
    n_in = first
    for width in down:
        total += conv(3, n_in, width) + conv(3, width, width)
        n_in = width
    total += conv(3, n_in, bottleneck) + conv(3, bottleneck, bottleneck) + conv(2, bottleneck, down[-1])
    coming = down[-1]
    for width in reversed(down):
        total += conv(3, coming + width, width) + conv(3, width, width // 2) + conv(2, width // 2, width // 2)
        coming = width // 2
    return total + conv(3, coming + first, first) + conv(3, first, first) + conv(1, first, classes)


def test_original_unet_variant_and_multi_class_heads():
    model = build_model("unet", num_classes=3)
    assert model.filters == (64, 128, 256, 512, 1024)
    assert model.output_shape == (None, None, None, 3)
    assert model.count_params() == _expected_params((64, 128, 256, 512, 1024), 3)
    assert _expected_params((32, 32, 64, 128, 256), 1) == 1_850_305
    with pytest.raises(ValueError, match="unknown model variant 'resnet'"):
        build_model("resnet")


@pytest.mark.parametrize("height,width", [(16, 16), (32, 48), (64, 16)])
def test_any_multiple_of_16_gives_a_same_sized_probability_map(height, width):
    model = UNet(num_classes=2, filters=SMALL, seed=0)
    out = model(np.zeros((2, height, width, 1), np.float32)).numpy()
    assert out.shape == (2, height, width, 2)
    assert ((out > 0) & (out < 1)).all()


def test_other_sizes_are_padded_and_cropped_back():
    model = UNet(filters=SMALL, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (3, 37, 50), dtype=np.uint8)
    padded, original = pad_to_multiple(to_model_input(images))
    assert padded.shape == (3, 48, 64, 1) and original == (37, 50)
    probs = predict_probabilities(model, images, batch_size=2)
    assert probs.shape == (3, 37, 50, 1)
    direct = model(padded).numpy()[:, :37, :50]
    np.testing.assert_allclose(probs, direct, atol=1e-6)


def test_input_scaling_and_16_bit_images():
    assert to_model_input(np.array([[[0, 255]]], np.uint8)).ravel().tolist() == [-1.0, 1.0]
    scaled16 = to_model_input(np.array([[[0, 65535, 257 * 100]]], np.uint16)).ravel()
    np.testing.assert_allclose(scaled16, [-1.0, 1.0, 100 / 127.5 - 1], atol=1e-6)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        to_model_input(np.zeros((1, 4, 4), np.float32))


def test_seeded_builds_are_identical_and_seeds_differ():
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 1)).astype(np.float32)
    a, b, c = (UNet(filters=SMALL, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.array_equal(a(x), c(x))


def test_config_round_trip_rebuilds_the_same_architecture():
    model = UNet(num_classes=2, filters=SMALL, seed=3, name="custom")
    config = model.get_config()
    assert config == {"name": "custom", "trainable": True, "num_classes": 2, "filters": list(SMALL), "input_channels": 1, "seed": 3}
    clone = UNet.from_config(config)
    assert clone.get_config() == config
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    layer = UpConv(8, name="u")
    assert UpConv.from_config(layer.get_config()).get_config() == layer.get_config()


def test_keras_file_round_trip_in_safe_mode_gives_identical_outputs(tmp_path):
    model = UNet(num_classes=2, filters=SMALL, seed=5)
    x = np.random.default_rng(2).normal(size=(2, 32, 48, 1)).astype(np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, UNet) and loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_a_file_saved_under_the_old_class_name_loads_as_a_unet():
    """The shipped demo model was saved as defectscan>TinyUNet; it loads, is a UNet, and knows its input contract."""
    from defectscan.model.export import load_model
    from defectscan.model.preprocess import contract_of
    from defectscan.model.registry import DEMO_MODEL

    model = load_model(DEMO_MODEL)
    assert isinstance(model, UNet)
    assert (contract_of(model).multiple_of, contract_of(model).receptive_radius) == (16, 122)

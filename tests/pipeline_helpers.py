"""Small real models and image sets for the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL_FILTERS = (4, 4, 8, 8, 16)


def save_small_unet(path: Path, num_classes: int = 1, seed: int = 0) -> Path:
    """A real TinyUNet with narrow layers (same depth, same receptive field), saved as .keras."""
    from defectscan.model.unet import build_model

    model = build_model(num_classes=num_classes, filters=SMALL_FILTERS, seed=seed)
    model.build((None, None, None, 1))
    model.save(path)
    return path


def textured(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 20, size=shape)
    return np.clip(base, 0, 255).astype(np.uint8)

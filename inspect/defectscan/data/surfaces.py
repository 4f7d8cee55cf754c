"""A DAGM-2007-layout dataset on real photographs: crops of photos that ship with scikit-image and
matplotlib, each with one drawn defect and a weak ellipse label.

Where `synth` draws its surfaces from filtered noise, here each class folder is one real surface
(a lunar regolith photo, a stained tissue section, a terrain relief, a deep-sky exposure), cut into
random crops at random scales and orientations, with a camera's brightness, contrast and gamma
varying a little per image. Defective images carry one defect of `synth`'s kinds (scratch, spot,
crack, stain), its contrast set from the surface's own local spread so that it is visible but not
trivially so on a busy photo. Everything follows from the seed: one seed, one dataset, byte for byte.

    <root>/ClassN/{Train,Test}/NNNN.PNG, Label/Labels.txt, Label/NNNN_label.PNG   (as `synth` writes)
    <root>/surfaces.json                                                          {"ClassN": surface name}

Every image loads without a network: scikit-image's bundled files and matplotlib's sample data.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from defectscan.data.synth import _SHAPES, DEFECT_KINDS, SynthSummary, blend_defect, check_split_spec, ellipse_label, empty_folder, write_dagm_split
from defectscan.errors import DataError

# The only scikit-image photo files the surfaces read; some of the others are kept unseen for an
# independent check, so a new surface adds its file here on purpose (tests/test_surfaces.py).
SKIMAGE_SOURCES = ("data/moon.png", "data/ihc.png", "data/hubble_deep_field.jpg")

SURFACES_FILE = "surfaces.json"

# A random crop's side, as a fraction of the photo's short side.
CROP_SCALE = (0.35, 0.8)
# A defect's contrast, in standard deviations of the surface around it (the sign is random). From
# 2: at 1..2 a stain on tissue or a pit on the moon could not be found by eye at full size even
# with its label drawn around it, and a defect a QA person cannot see is not a labelled defect.
DEFECT_CONTRAST = (2.0, 4.0)


# ---- surfaces: real photos as float gray arrays in 0..1 ----


def _moon() -> np.ndarray:
    """Lunar regolith (skimage `moon`): a matte, granular field with small pits, like a sand-cast or
    shot-blasted part seen from above."""
    from skimage import data

    return data.moon().astype(np.float64) / 255.0


def _tissue() -> np.ndarray:
    """A stained tissue section (skimage `immunohistochemistry`) in gray: dense fibrous and cellular
    structure, like a fibre composite, felt or paper web."""
    from skimage import color, data

    return color.rgb2gray(data.immunohistochemistry())


def _terrain() -> np.ndarray:
    """A hillshade of a digital elevation model (matplotlib `jacksboro_fault_dem.npz`): ridged relief
    under raking light, like rough cast or forged metal."""
    from matplotlib import cbook
    from matplotlib.colors import LightSource

    dem = cbook.get_sample_data("jacksboro_fault_dem.npz")
    # Grid spacing in metres, so that one vertical exaggeration gives natural relief.
    dy = 111_200 * float(dem["dy"])
    dx = 111_200 * float(dem["dx"]) * np.cos(np.radians(float(dem["ymin"])))
    return LightSource(azdeg=315, altdeg=45).hillshade(dem["elevation"].astype(np.float64), vert_exag=1.0, dx=dx, dy=dy)


def _deep_field() -> np.ndarray:
    """The Hubble deep field (skimage `hubble_deep_field`) in gray, asinh-stretched so that the sky's
    grain shows: a dark, grainy coating with bright inclusions, like speckled powder coat or granite."""
    from skimage import color, data

    stretched = np.arcsinh(color.rgb2gray(data.hubble_deep_field()) / 0.03)
    return stretched / stretched.max()


# Registry: surface name -> loader of its photo. Not used, and why: `coffee` (the wood grain around the
# cup is a strip too narrow to crop at scale), `retina` (its vessels look like cracks), the small or
# object photos (topobathy, cell, coins, camera...): they are objects, not surfaces.
SURFACES: dict[str, Callable[[], np.ndarray]] = {
    "moon": _moon,
    "tissue": _tissue,
    "terrain": _terrain,
    "deep_field": _deep_field,
}


# ---- the dataset's spec ----


@dataclass(frozen=True)
class SurfaceSpec:
    """One dataset: a class folder per surface (in this order), `train` and `test` images in each."""

    surfaces: tuple[str, ...] = tuple(SURFACES)
    defects: tuple[str, ...] = DEFECT_KINDS
    train: int = 40
    test: int = 40
    size: int = 512
    defect_fraction: float = 0.5
    seed: int = 0
    contrast: tuple[float, float] = DEFECT_CONTRAST

    def __post_init__(self):
        object.__setattr__(self, "surfaces", _names(self.surfaces))
        object.__setattr__(self, "contrast", tuple(float(x) for x in self.contrast))
        object.__setattr__(self, "defects", _names(self.defects))
        if not self.surfaces:
            raise DataError("surface dataset: surfaces must name at least one surface, got none")
        for name in self.surfaces:
            if name not in SURFACES:
                raise DataError(f"surface dataset: surfaces: unknown surface {name!r}; known: {', '.join(SURFACES)}")
        if len(set(self.surfaces)) != len(self.surfaces):
            raise DataError(f"surface dataset: surfaces must not repeat, got {', '.join(self.surfaces)}")
        if not self.defects:
            raise DataError("surface dataset: defects must name at least one defect kind, got none")
        for kind in self.defects:
            if kind not in _SHAPES:
                raise DataError(f"surface dataset: defects: unknown defect kind {kind!r}; known: {', '.join(_SHAPES)}")
        check_split_spec("surface dataset", self.size, self.defect_fraction, self.train, self.test, self.seed)
        if len(self.contrast) != 2 or not 0 < self.contrast[0] <= self.contrast[1]:
            raise DataError(f"surface dataset: contrast must be LOW, HIGH with 0 < LOW <= HIGH (standard deviations), got {self.contrast}")


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


# ---- one image ----


def make_surface_sample(
    rng: np.random.Generator, photo: np.ndarray, size: int, defects: Sequence[str], defective: bool,
    contrast: tuple[float, float] = DEFECT_CONTRAST,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8) cut from `photo` and, when defective, its weak label (uint8, 0 or 255).

    The crop and the camera are drawn before the defect: the same stream gives the same picture
    with and without it.
    """
    surface = _crop(rng, photo, size)
    camera = _camera(rng)
    if not defective:
        return camera(surface), None
    kind = defects[int(rng.integers(len(defects)))]
    defect = _SHAPES[kind](rng, size)
    label = ellipse_label(defect)
    offset = rng.uniform(*contrast) * rng.choice([-1.0, 1.0]) * _spread_around(surface, label)
    return camera(blend_defect(surface, defect, offset)), (label * 255).astype(np.uint8)


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """A random square crop, flipped and turned at random, resized to size x size and normalised:
    the 2nd..98th percentile spans about 0.25..0.75 around a median of 0.5."""
    from skimage import transform

    side = int(round(rng.uniform(*CROP_SCALE) * min(photo.shape)))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    patch = transform.resize(crop, (size, size), order=1, anti_aliasing=True)
    low, median, high = np.percentile(patch[::2, ::2], [2, 50, 98])
    return 0.5 + 0.5 * (patch - median) / max(high - low, 1e-6)


def _camera(rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A camera's exposure for one image: gamma, then contrast and brightness, to uint8."""
    gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    gain = rng.uniform(0.85, 1.15)
    offset = rng.uniform(-0.06, 0.06)

    def expose(surface: np.ndarray) -> np.ndarray:
        lit = np.clip(surface, 0.0, 1.0) ** gamma
        return np.clip(np.round(((lit - 0.5) * gain + 0.5 + offset) * 255), 0, 255).astype(np.uint8)

    return expose


def _spread_around(surface: np.ndarray, label: np.ndarray) -> float:
    """The surface's standard deviation in the label's box widened by a sixteenth of the image,
    floored at a quarter of the whole image's (a defect on a flat patch still shows); the whole
    image's for an empty label."""
    rows, cols = np.nonzero(label)
    if not rows.size:
        return float(surface.std())
    pad = surface.shape[0] // 16
    r0, c0 = max(rows.min() - pad, 0), max(cols.min() - pad, 0)
    window = surface[r0 : rows.max() + pad + 1, c0 : cols.max() + pad + 1]
    return max(float(window.std()), 0.25 * float(surface.std()))


# ---- the dataset ----


def write_surfaces_dagm(root: str | Path, spec: SurfaceSpec) -> SynthSummary:
    """Write Class1..ClassN/{Train,Test} in the DAGM 2007 layout under `root`, one surface per class
    in spec order, and surfaces.json naming each class's surface."""
    root = empty_folder(root)
    images = defective_count = 0
    folders = {}
    for class_index, name in enumerate(spec.surfaces):
        folder = f"Class{class_index + 1}"
        folders[folder] = name
        photo = SURFACES[name]()
        sample = partial(_sample, photo=photo, size=spec.size, defects=spec.defects, contrast=spec.contrast)
        for split_index, (split, count) in enumerate((("Train", spec.train), ("Test", spec.test))):
            # One stream per (seed, surface, split): a surface's images do not depend on the others asked for.
            rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode()), split_index])
            defective_count += write_dagm_split(root / folder / split, rng, count, spec.defect_fraction, sample)
            images += count
    (root / SURFACES_FILE).write_text(json.dumps(folders, indent=2) + "\n")
    return SynthSummary(root=root, images=images, defective=defective_count)


def _sample(
    rng: np.random.Generator, defective: bool, *, photo: np.ndarray, size: int, defects: Sequence[str],
    contrast: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray | None]:
    return make_surface_sample(rng, photo, size, defects, defective, contrast)

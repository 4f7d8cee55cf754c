"""A DAGM-2007-like synthetic dataset: textured surfaces with defects and weak ellipse labels.

Like DAGM, each class folder holds one surface texture and one kind of defect (scratches,
spots, cracks, stains, in turn), split into Train and Test, with Label/Labels.txt and an
ellipse label image around each defect rather than an exact mask. Everything follows from
the seed: one seed, one dataset, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import draw

from defectscan.errors import DataError

DEFECT_KINDS = ("scratch", "spot", "crack", "stain")

# Makes one image (uint8) and its weak label (uint8 0/255, None when defect-free) from the stream.
SampleMaker = Callable[[np.random.Generator, bool], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class SynthSpec:
    classes: int = 3
    train: int = 100
    test: int = 50
    size: int = 512
    defect_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.classes < 1:
            raise DataError(f"synthetic dataset: classes must be at least 1, got {self.classes}")
        check_split_spec("synthetic dataset", self.size, self.defect_fraction, self.train, self.test, self.seed)


def check_split_spec(what: str, size: int, defect_fraction: float, train: int, test: int, seed: int) -> None:
    """The checks every generated DAGM-layout dataset shares: image size, defective share, split sizes, seed."""
    if size < 32 or size % 16:
        raise DataError(f"{what}: size must be a multiple of 16 and at least 32, got {size}")
    if not 0.0 <= defect_fraction <= 1.0:
        raise DataError(f"{what}: defect_fraction must be within 0..1, got {defect_fraction}")
    if train < 0 or test < 0:
        raise DataError(f"{what}: train and test counts must not be negative, got {train}, {test}")
    if seed < 0:
        raise DataError(f"{what}: seed must not be negative, got {seed}")


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    images: int
    defective: int


def texture(rng: np.random.Generator, size: int, class_index: int) -> np.ndarray:
    """A float surface in 0..1: filtered noise whose grain and pattern depend on the class."""
    style = class_index % 4
    grain = 1.0 + (class_index % 3)
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), grain)
    noise /= noise.std() + 1e-9
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if style == 0:  # brushed metal: streaks along one direction
        streaks = ndimage.gaussian_filter1d(rng.standard_normal((size, size)), 12.0, axis=1)
        surface = 0.5 * noise + 2.0 * streaks / (streaks.std() + 1e-9)
    elif style == 1:  # woven: two crossed gratings
        period = rng.uniform(10, 18)
        surface = 0.6 * noise + np.sin(2 * np.pi * xx / period) + np.sin(2 * np.pi * yy / period)
    elif style == 2:  # mottled: coarse blobs
        coarse = ndimage.gaussian_filter(rng.standard_normal((size, size)), 8.0)
        surface = 0.5 * noise + 2.0 * coarse / (coarse.std() + 1e-9)
    else:  # fine grain with a slow gradient
        angle = rng.uniform(0, 2 * np.pi)
        surface = noise + 1.5 * ((np.cos(angle) * xx + np.sin(angle) * yy) / size)
    surface = (surface - surface.mean()) / (surface.std() + 1e-9)
    return 0.5 + 0.12 * surface


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin, slightly curved line."""
    mask = np.zeros((size, size), bool)
    length = rng.uniform(0.15, 0.35) * size
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    t = np.linspace(-0.5, 0.5, int(length))
    bend = rng.uniform(-0.15, 0.15) * length
    ys = cy + t * length * np.sin(angle) + bend * (1 - 4 * t**2) * np.cos(angle)
    xs = cx + t * length * np.cos(angle) - bend * (1 - 4 * t**2) * np.sin(angle)
    rr, cc = np.clip(np.round(ys).astype(int), 0, size - 1), np.clip(np.round(xs).astype(int), 0, size - 1)
    mask[rr, cc] = True
    return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))


def _spot(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular round blob."""
    radius = rng.uniform(0.03, 0.07) * size
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.15 * np.sin(5 * angle + rng.uniform(0, 6.3))
    return np.hypot(yy - cy, xx - cx) < radius * wobble


def _crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """A jagged random walk with one branch."""
    mask = np.zeros((size, size), bool)

    def walk(y: float, x: float, heading: float, steps: int) -> list[tuple[float, float]]:
        points = [(y, x)]
        for _ in range(steps):
            heading += rng.normal(0, 0.35)
            y, x = y + 3 * np.sin(heading), x + 3 * np.cos(heading)
            points.append((y, x))
        return points

    steps = int(rng.uniform(0.2, 0.4) * size / 3)
    trunk = walk(*(rng.uniform(0.3, 0.7, 2) * size), rng.uniform(0, 2 * np.pi), steps)
    fork_y, fork_x = trunk[int(rng.integers(steps // 3, 2 * steps // 3 + 1))]
    branch = walk(fork_y, fork_x, rng.uniform(0, 2 * np.pi), steps // 3)
    for points in (trunk, branch):
        pts = np.clip(np.round(np.array(points)), 0, size - 1).astype(int)
        for (y0, x0), (y1, x1) in pairwise(pts):
            rr, cc = draw.line(y0, x0, y1, x1)
            mask[rr, cc] = True
    return ndimage.binary_dilation(mask, iterations=1)


def _stain(rng: np.random.Generator, size: int) -> np.ndarray:
    """A large, soft-edged smudge."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 40)
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    yy, xx = np.mgrid[0:size, 0:size]
    window = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.07 * size) ** 2)))
    score = window * (1 + field / (field.std() + 1e-9) * 0.3)
    return score > 0.5


_SHAPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "stain": _stain,
}


def ellipse_label(defect: np.ndarray, margin: float = 4.0) -> np.ndarray:
    """A filled ellipse along the defect's principal axes that covers all of it (a DAGM weak label)."""
    rows, cols = np.nonzero(defect)
    if rows.size == 0:
        return np.zeros_like(defect, bool)
    centre = np.array([rows.mean(), cols.mean()])
    coords = np.stack([rows, cols]) - centre[:, None]
    axes = np.linalg.eigh(np.cov(coords))[1] if rows.size > 2 else np.eye(2)
    # Semi-axes sqrt(2) x the half extents: the ellipse then covers the defect's box in its own frame.
    semi = np.sqrt(2.0) * np.abs(axes.T @ coords).max(axis=1) + margin
    reach = int(np.ceil(semi.max()))
    r0, c0 = np.maximum(np.floor(centre).astype(int) - reach, 0)
    r1, c1 = np.minimum(np.ceil(centre).astype(int) + reach + 1, defect.shape)
    rr, cc = np.mgrid[r0:r1, c0:c1]
    local = axes.T @ np.stack([rr.ravel() - centre[0], cc.ravel() - centre[1]])
    inside = ((local / semi[:, None]) ** 2).sum(axis=0) <= 1.0
    label = np.zeros_like(defect, bool)
    label[r0:r1, c0:c1] = inside.reshape(rr.shape)
    return label


def make_sample(rng: np.random.Generator, size: int, class_index: int, defective: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8) and, when defective, its weak label (uint8, 0 or 255)."""
    surface = texture(rng, size, class_index)
    if not defective:
        return _to_uint8(surface), None
    kind = DEFECT_KINDS[class_index % len(DEFECT_KINDS)]
    defect = _SHAPES[kind](rng, size)
    contrast = rng.uniform(0.12, 0.25) * rng.choice([-1.0, 1.0])
    return _to_uint8(blend_defect(surface, defect, contrast)), (ellipse_label(defect) * 255).astype(np.uint8)


def blend_defect(surface: np.ndarray, defect: np.ndarray, contrast: float) -> np.ndarray:
    """`surface` with the defect mask added at `contrast` (signed), its edge softened over about a pixel."""
    soft = ndimage.gaussian_filter(defect.astype(np.float64), 0.8)
    return surface + contrast * soft


def _to_uint8(surface: np.ndarray) -> np.ndarray:
    return np.clip(np.round(surface * 255), 0, 255).astype(np.uint8)


def write_synthetic_dagm(root: str | Path, spec: SynthSpec) -> SynthSummary:
    """Write Class1..ClassN/{Train,Test} in the DAGM 2007 layout under `root`."""
    root = empty_folder(root)
    images = defective_count = 0
    for class_index in range(spec.classes):
        for split, count in (("Train", spec.train), ("Test", spec.test)):
            # One stream per (seed, class, split): adding classes never changes the existing ones.
            rng = np.random.default_rng([spec.seed, class_index, 0 if split == "Train" else 1])
            sample = partial(_class_sample, size=spec.size, class_index=class_index)
            defective_count += write_dagm_split(root / f"Class{class_index + 1}" / split, rng, count, spec.defect_fraction, sample)
            images += count
    return SynthSummary(root=root, images=images, defective=defective_count)


def _class_sample(rng: np.random.Generator, defective: bool, *, size: int, class_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    return make_sample(rng, size, class_index, defective)


def empty_folder(root: str | Path) -> Path:
    """`root`, created, refused if it holds anything: an earlier dataset's images and class folders (a Class4
    of a 4-class run under a 2-class one) would silently join the new one."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: already exists and is not an empty folder; write the dataset to a new folder, or delete it first")
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_dagm_split(split_dir: Path, rng: np.random.Generator, count: int, defect_fraction: float, sample: SampleMaker) -> int:
    """Write one split folder (NNNN.PNG, Label/Labels.txt, Label/NNNN_label.PNG); the number of defective images.

    round(count x defect_fraction) images, picked at random from `rng`, are defective; then
    `sample(rng, defective)` makes each image and its label (None when defect-free), in order.
    """
    from defectscan.data.dagm import write_split

    n_defective = round(count * defect_fraction)
    flags = np.zeros(count, bool)
    flags[rng.permutation(count)[:n_defective]] = True
    write_split(split_dir, (sample(rng, bool(flags[i])) for i in range(count)))
    return n_defective

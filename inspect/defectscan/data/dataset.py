"""Labelled images for training and evaluation: what every reader produces, and opening one.

Every reader (DAGM folders, image + mask folders, Zarr image sets) produces a `LabelledImages`:
keys, class names and a `load(i)` returning (image uint8 (H, W), class map uint8 (H, W)), 0 being
no defect and k the k-th class. model/feed.py turns one into the tf.data stream the model trains on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectscan.data.problems import ProblemLog
from defectscan.errors import DataError


@dataclass
class LabelledImages:
    """A dataset of same-sized images with per-pixel class maps, read lazily by index."""

    name: str
    keys: list[str]
    classes: list[str]
    shape: tuple[int, int]
    loader: Callable[[int], tuple[np.ndarray, np.ndarray]]
    defective: list[bool]
    problems: ProblemLog = field(default_factory=ProblemLog)

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.loader(index)

    def subset(self, indices: Sequence[int], name: str) -> LabelledImages:
        """The images at `indices`, read through this dataset's loader."""
        indices = [int(i) for i in indices]
        return LabelledImages(
            name=name,
            keys=[self.keys[i] for i in indices],
            classes=self.classes,
            shape=self.shape,
            loader=lambda i: self.loader(indices[i]),
            defective=[self.defective[i] for i in indices],
            problems=self.problems,
        )

    def describe(self) -> str:
        return f"{self.name}: {len(self)} images {self.shape[0]}x{self.shape[1]}, {sum(self.defective)} defective, classes {', '.join(self.classes)}; {self.problems.summary()}"


def image_group(key: str) -> str:
    """The stratum of an image: its DAGM class folder (the first part of its key), "" without one."""
    return key.split("/", 1)[0] if "/" in key else ""


def split_validation(images: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """(training, validation): a reproducible, stratified share of the images held out for validation.

    Strata are (group, defective) with group the image's class folder (the first part of its key,
    DAGM's ClassN), so every class contributes good and defective images in its own proportions;
    a stratum of at least two images gives at least one to each side. The same images, seed and
    fraction always give the same split, whatever order the images were listed in.
    """
    if not 0 < fraction < 1:
        raise DataError(f"{images.name}: validation fraction {fraction} must be strictly between 0 and 1")
    strata: dict[tuple[str, bool], list[int]] = {}
    for index, (key, defective) in enumerate(zip(images.keys, images.defective, strict=True)):
        strata.setdefault((image_group(key), defective), []).append(index)
    held: list[int] = []
    for (group, defective), members in sorted(strata.items()):
        members = sorted(members, key=lambda i: images.keys[i])
        rng = np.random.default_rng([seed, len(members), int(defective)] + [ord(c) for c in group])
        order = rng.permutation(len(members))
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        held.extend(members[i] for i in order[:count])
    held_set = set(held)
    train = [i for i in range(len(images)) if i not in held_set]
    validation = sorted(held_set)
    return (
        images.subset(train, f"{images.name} [training part]"),
        images.subset(validation, f"{images.name} [validation part, {fraction:g} held out, seed {seed}]"),
    )


def keep_common_shape(candidates: list[tuple[Any, tuple[int, int]]], problems: ProblemLog, path_of=lambda item: item) -> tuple[list[Any], tuple[int, int]]:
    """Keep the items whose image has the dataset's most common (H, W); report the others by name.

    The majority decides, so one odd file early in the listing cannot make all the others "wrong".
    """
    if not candidates:
        return [], (0, 0)
    shape = Counter(s for _, s in candidates).most_common(1)[0][0]
    kept = []
    for item, item_shape in candidates:
        if item_shape != shape:
            problems.add(path_of(item), f"wrong size: {item_shape[0]}x{item_shape[1]}, expected {shape[0]}x{shape[1]} like the rest of the dataset")
        else:
            kept.append(item)
    return kept, shape


def merge_class_names(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))


def open_dataset(
    path: str,
    *,
    format: str = "dagm",
    split: str = "Train",
    masks: str | None = None,
    classes: list[str] | None = None,
    per_class: bool = False,
    strict: bool = False,
    tile: int = 512,
    bit_depth: int | None = None,
    fill_missing_chunks: bool = False,
) -> LabelledImages:
    """Labelled images in one of the three layouts (a recipe's `data` section names them)."""
    if format == "dagm":
        from defectscan.data.dagm import read_dagm

        return read_dagm(path, split=split, classes=classes, per_class=per_class, strict=strict)
    if format == "folders":
        from defectscan.data.folders import read_folders

        if masks is None:
            raise DataError(f"{path}: the folders format needs the masks folder (data.masks, --masks)")
        return read_folders(path, masks, classes=classes or ["defect"], strict=strict)
    if format == "zarr":
        from defectscan.data.zarrset import read_zarr

        return read_zarr(path, tile=tile, bit_depth=bit_depth, fill_missing_chunks=fill_missing_chunks)
    raise DataError(f"{path}: unknown dataset format {format!r} (expected dagm, folders or zarr)")

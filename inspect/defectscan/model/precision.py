"""The precision a model version runs in, the parity check that admits one, and what hardware runs it.

Models are trained and saved in float32. bfloat16 doubles TinyUNet's speed on CPUs with AVX512-BF16
or AMX, but moves single pixels by up to 0.86 near decision edges while the mean moves by 1.7e-4:
a precision is a property of a model version, admitted by a parity check against float32 on
labelled images under the version's own verdict rule (model/verdict.py), on what the line sees:

    agreement   share of images whose verdict is the same in both precisions   >= MIN_AGREEMENT
    Dice        of the recorded defects against the labels, in each precision  within MAX_DICE_DELTA

The figures are stored with the version (models.precision_check) or in a model file's sidecar.

Running: `load_in_precision` loads a `.keras` file with Keras's mixed policy for the precision
(variables stay float32, layers compute in bfloat16/float16; the model's final sigmoid is float32
by construction). `runnable` decides what a worker actually runs: on a GPU both run; on a CPU
bfloat16 only with AVX512-BF16 or AMX, float16 never (no CPU has a fast path): float32 otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscan.db.schema import PRECISIONS, utcnow
from defectscan.errors import DataError, ModelError
from defectscan.times import iso_utc
from defectscan.model.verdict import VerdictRules, to_uint8

POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
MIN_AGREEMENT = 0.995
MAX_DICE_DELTA = 0.005
# CPU flags (as /proc/cpuinfo names them) of vector units that compute bfloat16 natively.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionRefused(ModelError):
    """The parity check failed: the precision would change what the line sees."""


def check_precision_name(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


# === running ===


def load_in_precision(path: str | Path, precision: str, expected_sha256: str | None = None):
    """The `.keras` model with its layers computing in `precision` (a float32 file needs no conversion)."""
    import keras

    from defectscan.model.export import load_model

    check_precision_name(precision)
    previous = keras.config.dtype_policy()
    # The UNet builds its layers in its constructor, under the policy in force while the file loads.
    keras.config.set_dtype_policy(POLICIES[precision])
    try:
        model = load_model(path, expected_sha256=expected_sha256)
    finally:
        keras.config.set_dtype_policy(previous)
    computes = compute_dtype(model)
    if computes != precision:
        raise ModelError(f"{path}: the model's layers compute in {computes} whatever the policy (their dtype is fixed in the file); "
                         f"it cannot run in {precision}")
    return model


def compute_dtype(model) -> str:
    """What the model's first layer with weights computes in (its convolutions)."""
    layer = next(layer for layer in model.layers if layer.weights)
    return str(layer.compute_dtype)


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (Linux); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def runnable(precision: str, *, gpu: bool, flags: set[str] | None = None) -> tuple[str, str | None]:
    """(the precision to run, why it is not the recorded one or None) on this worker's hardware."""
    if precision == "float32" or gpu:
        return precision, None
    if precision == "bfloat16":
        flags = cpu_flags() if flags is None else flags
        if set(BFLOAT16_CPU_FLAGS) & flags:
            return precision, None
        return "float32", f"this CPU has neither {' nor '.join(BFLOAT16_CPU_FLAGS)}: bfloat16 would be slower than float32"
    return "float32", f"CPUs have no fast {precision} path"


# === parity check ===


@dataclass(frozen=True)
class ParityCheck:
    """The figures of one parity check; `as_dict` is what is stored."""

    precision: str
    agreement: float
    dice_float32: float
    dice: float
    images: int
    flips: int
    check_data: str
    sha256: str
    checked_at: str
    min_agreement: float = MIN_AGREEMENT
    max_dice_delta: float = MAX_DICE_DELTA

    @property
    def dice_delta(self) -> float:
        return self.dice - self.dice_float32

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and abs(self.dice_delta) <= self.max_dice_delta

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dice_delta": self.dice_delta, "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityCheck:
        """A recorded check, judged against today's limits: a stored min_agreement or max_dice_delta (looser, or
        written into a metadata file by hand) would otherwise pass it."""
        fields = set(cls.__dataclass_fields__) - {"min_agreement", "max_dice_delta"}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def describe(self) -> str:
        """One line: the figures against the thresholds (and a caution when the images are too few to measure them)."""
        needed = int(np.ceil(1 / (1 - self.min_agreement) - 1e-9))
        caution = (f" (caution: one flip among {self.images} images is {100 / self.images:.2f} %: at least {needed} images are needed to "
                   f"measure {100 * self.min_agreement:g} %)") if self.images < needed else ""
        return (f"{self.precision} against float32 on {self.images} images of {self.check_data}: verdicts agree on "
                f"{100 * self.agreement:.2f} % ({self.flips} flipped; at least {100 * self.min_agreement:g} % needed), Dice "
                f"{self.dice:.4f} vs {self.dice_float32:.4f} (delta {self.dice_delta:+.4f}; at most {self.max_dice_delta:g} allowed){caution}")


def check_parity(path: str | Path, precision: str, images, rules: VerdictRules, *, batch_size: int = 4,
                 expected_sha256: str | None = None, class_names: list[str] | None = None) -> ParityCheck:
    """Run the model file in float32 and in `precision` over `images` (LabelledImages) and compare what inspection would record."""
    import tensorflow as tf

    from defectscan.model.evaluate import check_fits
    from defectscan.model.export import file_sha256, load_model
    from defectscan.model.feed import evaluation_dataset
    from defectscan.model.operating_point import RuleScores

    check_precision_name(precision)
    defective = sum(images.defective)
    if not defective or defective == len(images):
        # A check that saw no defect says nothing about escapes; one without a good image nothing about false calls.
        raise DataError(f"{images.name}: a precision check needs defective and defect-free images; these {len(images)} are all "
                        f"{'defect-free' if not defective else 'defective'}")
    sha256 = expected_sha256 or file_sha256(path)
    reference = load_model(path, expected_sha256=sha256)
    candidate = load_in_precision(path, precision, expected_sha256=sha256)
    check_fits(reference, images)
    forwards = [tf.function(lambda x, m=m: m(x, training=False), reduce_retracing=True) for m in (reference, candidate)]
    scores = [RuleScores(rules, list(class_names or images.classes)) for _ in forwards]  # the model's names: its per-class rules use them
    for x, y in evaluation_dataset(images, batch_size=batch_size):
        truth = y.numpy().transpose(0, 3, 1, 2) > 0.5
        for forward, scored in zip(forwards, scores, strict=True):
            maps = to_uint8(np.asarray(forward(x), np.float32)).transpose(0, 3, 1, 2)
            for score_map, labels in zip(maps, truth, strict=True):
                scored.update(score_map, labels)
    flips = int((np.array(scores[0].failed) != np.array(scores[1].failed)).sum())
    n = len(scores[0].failed)
    dice = [scored.result()["dice"] for scored in scores]
    return ParityCheck(precision=precision, agreement=(n - flips) / n, dice_float32=dice[0], dice=dice[1], images=n, flips=flips,
                       check_data=images.name, sha256=sha256, checked_at=iso_utc(utcnow().replace(microsecond=0)))


def require_passed(check: ParityCheck) -> ParityCheck:
    if not check.passed:
        raise PrecisionRefused(f"refused: {check.describe()}")
    return check


def check_recorded_check(recorded: Any, source: str | Path) -> None:
    """A precision check as a metadata file records it: its counts and figures numbers (a wrong one, stored, broke
    registration after the row was written)."""
    if not isinstance(recorded, dict):
        raise ModelError(f"{source}: precision_check must be a mapping (the check's figures), got {type(recorded).__name__}")
    for key in ("images", "flips"):
        value = recorded.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (key == "images" and value == 0):
            raise ModelError(f"{source}: precision_check: {key} must be a count{' of at least 1' if key == 'images' else ''}, got {value!r}")
    for key in ("agreement", "dice", "dice_float32"):
        value = recorded.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ModelError(f"{source}: precision_check: {key} must be a number, got {value!r}")


def recorded_check(recorded: dict[str, Any] | None, precision: str, sha256: str) -> ParityCheck | None:
    """A passed check recorded for this precision and this very file (a sidecar's), else None."""
    if not recorded:
        return None
    try:
        check = ParityCheck.from_dict(recorded)
    except TypeError:
        return None
    return check if check.precision == precision and check.sha256 == sha256 and check.passed else None


# === labelled images to check on ===


def check_images(check_data: str | Path | None, training: dict[str, Any] | None, n_classes: int = 1):
    """The labelled images a check runs on: `check_data` (a DAGM folder, its Test split, or Train when it has none,
    as a review export; one class per folder for a model of several classes), else the validation part recorded
    with the model's training (the images its operating point was chosen on)."""
    from defectscan.model.recipe import DataSpec

    if check_data is not None:
        split = "Test" if any(p.is_file() for p in Path(check_data).glob("*/Test/*")) else "Train"
        return DataSpec(format="dagm", path=str(check_data), per_class=n_classes > 1).open(split)
    images = _recorded_validation(training)
    if images is None:
        raise DataError("no labelled images to check the precision on: the model records no validation split whose data is "
                        "here; give --check-data DIR (a DAGM folder; its Test split is used, or Train when it has none)")
    return images


def _recorded_validation(training: dict[str, Any] | None):
    """The validation part of the last training stage, reproduced from its recipe; None where it cannot be."""
    from pydantic import ValidationError

    from defectscan.data.dataset import split_validation
    from defectscan.model.recipe import Recipe

    stages = (training or {}).get("stages") or [training or {}]
    recorded = stages[-1].get("recipe")
    if not recorded:
        return None
    try:
        recipe = Recipe.model_validate(recorded)
    except ValidationError:
        return None
    if recipe.validation.fraction is None or recipe.data.path is None or not Path(recipe.data.path).exists():
        return None
    _, validation = split_validation(recipe.data.open(), recipe.validation.fraction, recipe.train.seed)
    return validation

"""The training recipe: a YAML file (configs/model/*.yaml) validated into typed settings.

configs/model/tinyunet-dagm.yaml holds the reference recipe; any field can be overridden with
`--set section.key=value` (the value is read as YAML, so numbers, booleans and lists work).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from defectscan.db.model_refs import version_text
from defectscan.errors import ConfigError
from defectscan.model import variants
from defectscan.model.operating_point import DEFAULT_TARGET_FALSE_CALL_RATE
from defectscan.yamlfile import Section, load_yaml, read_mapping


class ModelSpec(Section):
    variant: Literal["tinyunet", "unet"] = "tinyunet"
    # Explicit widths (input block, down blocks..., bottleneck) override the variant's.
    filters: list[int] | None = None
    name: str = "tinyunet-defects"
    version: str = "1"
    threshold: float = Field(0.5, gt=0, lt=1)
    # A .keras model (same structure and classes) whose weights start the run instead of He init:
    # fine-tuning, e.g. on a new line's images ("demo": the shipped demo model's file; a registered
    # version as NAME:VERSION or NAME:STAGE, e.g. line3:production, read through the registry with
    # its checksum checked). A resumed run restores its checkpoint instead.
    init_from: str | None = None
    # Views of each image the saved model averages (model/views.py): 1 (the image), 2 (+ mirrored),
    # 4 (+ flipped top to bottom, and both) or 8 (+ the four transposed). Inspection then costs one
    # UNet pass per view. Training and the choice of the best step use the plain UNet; the
    # operating point is chosen on the saved model's views.
    test_time_views: Literal[1, 2, 4, 8] = 1

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return version_text(value)


class PhotometricSpec(Section):
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, lt=1)
    gamma: float = Field(0.0, ge=0, le=1)
    noise: float = Field(0.0, ge=0, le=1)


class DataSpec(Section):
    format: Literal["dagm", "folders", "zarr"] = "dagm"
    path: str | None = None
    # folders: where the masks are; dagm: which ClassN folders (all when empty).
    masks: str | None = None
    classes: list[str] | None = None
    # dagm: one output class per ClassN folder instead of one merged "defect" class.
    per_class: bool = False
    split: Literal["Train", "Test"] = "Train"
    tile: int = 512
    crop_size: int | None = None
    defect_crop_fraction: float = Field(0.5, ge=0, le=1)
    # Share of crops that get one of the training images' own labelled defects (of the crop's group:
    # its DAGM class folder) pasted in, turned and mirrored, at a random place (model/paste.py): each
    # defect seen on many backgrounds of its product.
    defect_paste_fraction: float = Field(0.0, ge=0, le=1)
    # Each crop cut at a random scale, a side of crop_size x exp(+-zoom), resized to crop_size (the
    # camera's distance to the part varies); 0 = off. Crops only: whole images are never resized.
    zoom: float = Field(0.0, ge=0, le=1)
    cache: str = "memory"
    shuffle_buffer: int = Field(1024, ge=1)
    strict: bool = False
    # zarr: the bits a 16-bit store's pixels hold (12 for a 12-bit camera), as `imagesets register --bit-depth`
    # records for inspection; without it 0..4095 would train as 0..16 while inspection sees 0..255.
    bit_depth: int | None = Field(None, ge=9, le=16)
    # zarr: chunks the writer left out because they equal the fill value (zarr-python's write_empty_chunks=False)
    # are read as that value, as `imagesets register --no-chunk-check` takes them; by default a missing chunk is refused.
    fill_missing_chunks: bool = False
    # Camera variation per training image (model/feed.py: Photometric); all 0 = off.
    photometric: PhotometricSpec = PhotometricSpec()

    @model_validator(mode="after")
    def _fields_of_the_format(self) -> DataSpec:
        if self.format == "zarr" and (self.classes is not None or self.per_class):
            raise ValueError("data.classes and data.per_class do not apply to a zarr set: its classes are the store's own (attribute 'classes')")
        if self.format != "zarr" and (self.bit_depth is not None or self.fill_missing_chunks):
            raise ValueError(f"data.bit_depth and data.fill_missing_chunks apply to zarr sets, not to {self.format} files")
        return self

    def open(self, split: str | None = None):
        """The labelled images this section names (its own split unless another is given, for evaluation)."""
        from defectscan.data.dataset import open_dataset

        if self.path is None:
            raise ConfigError("data.path is not set: give --data PATH or set data.path in the recipe")
        if self.format == "folders" and self.masks is None:
            raise ConfigError("data.masks is not set: the folders format needs the masks folder")
        return open_dataset(self.path, format=self.format, split=split or self.split, masks=self.masks, classes=self.classes,
                            per_class=self.per_class, strict=self.strict, tile=self.tile, bit_depth=self.bit_depth,
                            fill_missing_chunks=self.fill_missing_chunks)


class OptimizerSpec(Section):
    # rmsprop: the reference's (rho, momentum, centered apply); adam: Keras's Adam (beta 0.9/0.999).
    name: Literal["rmsprop", "adam"] = "rmsprop"
    learning_rate: float = Field(1e-4, gt=0)
    # exponential: x decay_rate every decay_steps (staircase: in steps), the reference's;
    # cosine: from learning_rate down to learning_rate x final_fraction along a half cosine over
    # train.steps, so the last steps move the weights little (decay_rate/decay_steps unused).
    schedule: Literal["exponential", "cosine"] = "exponential"
    final_fraction: float = Field(0.0, ge=0, le=1)
    decay_rate: float = Field(0.8, gt=0, le=1)
    decay_steps: int = Field(500, ge=1)
    staircase: bool = True
    # null: the weights trained are the weights validated and saved. A number in (0, 1): an
    # exponential moving average of the weights, new = m x old + (1 - m) x trained, kept beside them
    # (Keras's use_ema); validation scores it and the best step's average is the model saved.
    ema_momentum: float | None = Field(None, gt=0, lt=1)
    rho: float = 0.9
    momentum: float = 0.8
    centered: bool = True
    epsilon: float = 1e-7


class LossSpec(Section):
    name: Literal["adaptive", "bce", "dice", "bce_dice"] = "adaptive"
    switch_at: float = 0.3
    smoothing: float = 1.0
    # bce_dice: loss = bce_weight x BCE + Dice loss.
    bce_weight: float = Field(1.0, ge=0)
    # bce, bce_dice: weight of the defect pixels' cross-entropy against the background's.
    pos_weight: float = Field(1.0, gt=0)
    weight_decay: float = Field(1e-5, ge=0)


class ValidationSpec(Section):
    """Held-out images for checkpoint selection and the operating point (model/operating_point.py)."""

    # Share of the training images carved out (stratified by class folder and defective/good,
    # reproducible from train.seed) and never trained on; null: no validation, the last step is
    # kept and the model gets the default verdict rule.
    fraction: float | None = Field(0.2, gt=0, lt=1)
    # Validate every this many steps (and at the end); the best step by the validation figure
    # (escape rate, then false-call rate at the operating point, then Dice of the defective
    # images, then the later step) is the model saved.
    every: int = Field(100, ge=1)
    # Which step's weights the run saves: "best" by the validation figure above, or "last" (the
    # steps are still validated, for the record, and the operating point is chosen on the last).
    # With a few dozen validation images the best of many steps is often a lucky one: in the
    # fine-tune recipe's trials the last step of a cosine schedule did as well or better on Test.
    keep: Literal["best", "last"] = "best"
    target_false_call_rate: float = Field(DEFAULT_TARGET_FALSE_CALL_RATE, gt=0, lt=1)


class TrainSpec(Section):
    batch_size: int = Field(16, ge=1)
    steps: int = Field(2500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    jit_compile: bool = False
    distribute: Literal["none", "mirrored"] = "none"
    # mirrored: devices to replicate over, e.g. ["/gpu:0", "/gpu:1"]; empty = all GPUs (or the CPU).
    devices: list[str] | None = None
    deterministic: bool = True
    # The learning rate rises linearly from 0 over these first steps: a cold centered RMSProp
    # moves every weight by about 3x the rate at first, which undoes a donor's training.
    warmup_steps: int = Field(0, ge=0)
    # The last steps train on whole images (true borders, whole-image context) instead of crops,
    # this many at a time (default: batch_size).
    whole_image_steps: int = Field(0, ge=0)
    whole_image_batch_size: int | None = Field(None, ge=1)
    # Layers whose weights stay as model.init_from gave them, by name prefix (e.g. ["input_",
    # "down1_"]: the full-resolution encoder). Frozen first layers also need no backward pass.
    freeze: list[str] = []


class Recipe(Section):
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    loss: LossSpec = LossSpec()
    train: TrainSpec = TrainSpec()
    validation: ValidationSpec = ValidationSpec()

    @model_validator(mode="after")
    def _crop_fits(self):
        multiple = variants.size_multiple(variants.widths(self.model.variant, self.model.filters))
        if self.data.crop_size is not None and self.data.crop_size % multiple:
            raise ValueError(f"data.crop_size {self.data.crop_size} must be a multiple of {multiple}, the model's input multiple")
        if self.train.whole_image_steps > self.train.steps:
            raise ValueError(f"train.whole_image_steps {self.train.whole_image_steps} is more than train.steps {self.train.steps}")
        if self.train.freeze and self.model.init_from is None:
            raise ValueError(f"train.freeze {self.train.freeze} keeps layers as model.init_from gives them; without init_from they would stay random")
        return self


def _text_field(path: list[str]) -> bool:
    """Whether the recipe field at `path` holds text: its --set value is taken as written (a version 2.10 stays
    "2.10", a name `on` stays "on"), not read as YAML."""
    import types
    import typing

    model: Any = Recipe
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    kinds = set(typing.get_args(model)) - {type(None)} if isinstance(model, types.UnionType) or typing.get_origin(model) is typing.Union else {model}
    return kinds == {str}


def _section(node: dict, name: str):
    """node[name], made an empty section when absent or left empty (a bare `data:` line is None in YAML)."""
    if node.get(name) is None:
        node[name] = {}
    return node[name]


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data_path: str | None = None) -> Recipe:
    """Read a recipe file, apply `key.sub=value` overrides, validate; errors name the file and key."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_mapping(Path(path), what="training recipe", contents="recipe sections", error=ConfigError)
    given: dict[str, str] = {}  # dotted key -> the --set that gave it, named in a validation error rather than the file
    for item in overrides:
        key, sep, value = item.partition("=")
        given[key] = item
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = _section(node, part)
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[leaf] = value if _text_field([*parents, leaf]) and value not in ("null", "~") else load_yaml(value)
    if data_path is not None:
        data = _section(raw, "data")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: data is not a section (got {data!r}); cannot set its path to {data_path}")
        data["path"] = data_path
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "recipe"
            # A check across sections (loc empty) would echo the whole recipe as its input.
            got = f" (got {error.get('input')!r})" if error["loc"] else ""
            origin = f"--set {given[where]}: " if where in given else ""
            problems.append(f"{origin}{where}: {error['msg']}{got}")
        raise ConfigError(f"{source}: invalid training recipe: " + "; ".join(problems)) from None

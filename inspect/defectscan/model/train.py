"""Train a TinyUNet from a recipe: custom loop with checkpoints, resume, TensorBoard and a progress bar.

Output folder layout:
    checkpoints/        tf.train checkpoints (model + optimizer, step = optimizer iterations)
    tensorboard/        scalar logs: loss, dice, learning rate, images per second
    model.keras         the trained model (saved at the end)
    run.json            recipe and training images, written before the first step: what a resume must match
    training.json       recipe, steps, time, last loss/Dice, dataset summary

A run that finds checkpoints in its folder continues from the latest: the step counter goes on
and, because the data stream is a function of the seed and the step (data/dataset.py), the
result is the one an uninterrupted run would have reached.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from defectscan.data.dataset import LabelledImages
from defectscan.errors import ConfigError, DataError, ModelError
from defectscan.model.recipe import Recipe

log = logging.getLogger("defectscan.train")


@dataclass
class TrainResult:
    model_path: Path
    out_dir: Path
    step: int
    resumed_from: int
    finished: bool
    seconds: float
    images_per_second: float
    last_loss: float | None
    last_dice: float | None
    # What the convolutions computed in (float16 under mixed_float16); the saved model loads as float32.
    compute_dtype: str = "float32"
    # The validated step whose weights were saved (None without validation).
    best_step: int | None = None


def applied_rate(optimizer, step: int) -> float:
    """The learning rate the optimizer applied in training step `step` (1-based): its schedule at iteration
    step - 1. Its `learning_rate`, read after the step, is already the next step's (TensorBoard showed that)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer wraps the one with the schedule
    schedule = inner._learning_rate  # Keras keeps the schedule object here; `learning_rate` is its current value
    return float(schedule(step - 1) if callable(schedule) else schedule)


def write_scalars(values: dict[str, float]) -> None:
    """TensorBoard scalars through core TensorFlow (tf.summary.scalar needs the tensorboard package).

    The metadata is what tensorboard's own scalar summary writes: plugin "scalars", empty content.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    for tag, value in values.items():
        tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)


def _set_determinism(deterministic: bool, jit_compile: bool) -> None:
    """Deterministic kernels make a seeded CPU run repeat exactly; XLA has none for MaxPool gradients."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    if deterministic and jit_compile:
        raise ConfigError(
            "train.jit_compile=true needs train.deterministic=false: XLA has no deterministic MaxPool gradient"
        )
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # Determinism is process-wide; a previous deterministic run must not leak into this one.
        tf_config.disable_op_determinism()


def _strategy(recipe: Recipe):
    import tensorflow as tf

    if recipe.train.distribute == "none":
        return tf.distribute.get_strategy()
    devices = recipe.train.devices
    if not devices:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or ["/cpu:0"]
    return tf.distribute.MirroredStrategy(devices=devices)


def _optimizer(recipe: Recipe):
    import keras

    o = recipe.optimizer
    if o.schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(o.learning_rate, recipe.train.steps, alpha=o.final_fraction)
    else:
        schedule = keras.optimizers.schedules.ExponentialDecay(o.learning_rate, o.decay_steps, o.decay_rate, staircase=o.staircase)
    if recipe.train.warmup_steps:
        from defectscan.model.schedules import WarmUp

        schedule = WarmUp(schedule, recipe.train.warmup_steps)
    ema = {"use_ema": True, "ema_momentum": o.ema_momentum} if o.ema_momentum is not None else {}
    if o.name == "adam":
        optimizer = keras.optimizers.Adam(schedule, epsilon=o.epsilon, **ema)
    else:
        optimizer = keras.optimizers.RMSprop(schedule, rho=o.rho, momentum=o.momentum, centered=o.centered, epsilon=o.epsilon, **ema)
    if recipe.train.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _freeze(model, prefixes: list[str]) -> None:
    """Make the layers named with one of `prefixes` untrainable; every prefix must name a layer with weights."""
    weighted = [layer.name for layer in model.layers if layer.weights]
    for prefix in prefixes:
        matched = [name for name in weighted if name.startswith(prefix)]
        if not matched:
            raise ConfigError(f"train.freeze: {prefix!r} names no layer with weights; the model's are {', '.join(weighted)}")
        for name in matched:
            model.get_layer(name).trainable = False


def init_weights(model, source: str | Path) -> None:
    """Copy the weights of the .keras model `source` into `model`; both must have one structure."""
    from defectscan.model.export import load_model
    from defectscan.model.registry import DEMO_MODEL

    # "demo": the demo model shipped inside the package, wherever it is installed.
    source = DEMO_MODEL if str(source) == "demo" else source
    donor = load_model(source)
    theirs, ours = donor.get_weights(), model.get_weights()
    if donor.output_shape[-1] != model.output_shape[-1]:
        raise ModelError(f"{source}: cannot initialise from it: it has {donor.output_shape[-1]} output classes, the recipe's dataset {model.output_shape[-1]}")
    shapes = [w.shape for w in theirs], [w.shape for w in ours]
    if shapes[0] != shapes[1]:
        raise ModelError(
            f"{source}: cannot initialise from it: its layers differ from the recipe's model "
            f"({len(theirs)} weight arrays, {donor.count_params():,} parameters; the recipe builds {len(ours)}, {model.count_params():,})"
        )
    model.set_weights(theirs)


def _loss(recipe: Recipe):
    """The recipe's loss as a function of (y_true, y_pred)."""
    from functools import partial

    from defectscan.model.losses import LOSSES

    spec = recipe.loss
    kwargs = {}
    if spec.name != "bce":
        kwargs["smoothing"] = spec.smoothing
    if spec.name == "adaptive":
        kwargs["switch_at"] = spec.switch_at
    if spec.name == "bce_dice":
        kwargs["bce_weight"] = spec.bce_weight
    if spec.name in ("bce", "bce_dice"):
        kwargs["pos_weight"] = spec.pos_weight
    return partial(LOSSES[spec.name], **kwargs)


def _split(recipe: Recipe, images: LabelledImages) -> tuple[LabelledImages, LabelledImages | None]:
    """(images to train on, validation images or None): the validation part is never trained on."""
    from defectscan.data.dataset import split_validation

    _check_whole_sizes(recipe, images)
    if recipe.validation.fraction is None:
        return images, None
    training, validation = split_validation(images, recipe.validation.fraction, recipe.train.seed)
    kinds = sum(validation.defective), len(validation) - sum(validation.defective)
    if not kinds[0] or not kinds[1]:
        missing = "defective" if not kinds[0] else "defect-free"
        raise DataError(
            f"{images.name}: the validation part ({len(validation)} of {len(images)} images) has no {missing} image; "
            f"the operating point needs both (add {missing} images or raise validation.fraction)"
        )
    if len(training) == 0:
        raise DataError(f"{images.name}: no image left to train on after holding out validation.fraction {recipe.validation.fraction}")
    return training, validation


def _check_whole_sizes(recipe: Recipe, images: LabelledImages) -> None:
    """Whole images (validation, whole-image steps, no crop) must be multiples of the model's size multiple: said
    before the first step, where it failed after `validation.every` steps or with a shape error from Keras."""
    from defectscan.model.variants import check_whole_images, size_multiple, widths

    uses = [what for what, used in (("validation", recipe.validation.fraction is not None), ("whole-image steps", recipe.train.whole_image_steps),
                                    ("training without data.crop_size", recipe.data.crop_size is None)) if used]
    if uses:
        check_whole_images(images.name, images.shape, size_multiple(widths(recipe.model.variant, recipe.model.filters)), ", ".join(uses))


class _Phases:
    """The training stream: crops until the last `whole_image_steps`, then whole images."""

    def __init__(self, recipe: Recipe, images: LabelledImages, strategy):
        from defectscan.model.feed import Photometric

        self.recipe, self.images, self.strategy = recipe, images, strategy
        spec = recipe.train
        whole = spec.whole_image_steps if recipe.data.crop_size is not None else 0
        self.switch_at = spec.steps - whole
        self.photometric = Photometric(**recipe.data.photometric.model_dump())

    def batches(self, step: int):
        """The stream from `step` on (a pure function of the seed and the step, so a resumed run matches)."""
        from defectscan.model.feed import training_dataset

        spec, data = self.recipe.train, self.recipe.data
        whole = step >= self.switch_at
        stream = training_dataset(
            self.images,
            batch_size=(spec.whole_image_batch_size or spec.batch_size) if whole else spec.batch_size,
            seed=spec.seed + (1 if whole else 0),
            crop_size=None if whole else data.crop_size,
            defect_crop_fraction=data.defect_crop_fraction,
            defect_paste_fraction=data.defect_paste_fraction,
            zoom=data.zoom,
            cache=data.cache,
            shuffle_buffer=data.shuffle_buffer,
            start_step=step - self.switch_at if whole else step,
            photometric=self.photometric,
        )
        return iter(self.strategy.experimental_distribute_dataset(stream))


class _Validator:
    """Scores the model on the validation images every `validation.every` steps; keeps the best weights.

    The figure is the verdict rule's at the operating point chosen on the validation images for the
    target false-call rate: lowest escape rate, then lowest false-call rate, then highest Dice of the
    defective images (good images without a recorded pixel score 1 and would favour a step that finds
    little), a later step on a tie. With validation.keep "last" every step is validated and the last
    one kept. The history and the kept step survive an interruption (validation.json beside the
    checkpoints).
    """

    def __init__(self, recipe: Recipe, images: LabelledImages, out_dir: Path):
        self.recipe, self.images = recipe, images
        self.state_path = out_dir / "validation.json"
        self.weights_path = out_dir / "best.weights.h5"
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.history: list[dict] = state.get("history", [])
        self.best: dict | None = state.get("best")

    @staticmethod
    def key(entry: dict) -> tuple:
        figures = entry["operating_point"]["figures"] if entry.get("operating_point") else None
        if figures is None:
            return (1.0, 1.0, -(entry.get("dice") or 0.0), -entry["step"])
        return (figures["escape_rate"], figures["false_call_rate"], -round(figures["dice_defective"], 4), -entry["step"])

    def due(self, step: int, end: bool) -> bool:
        done = {entry["step"] for entry in self.history}
        return step not in done and (end or step % self.recipe.validation.every == 0)

    def _evaluate(self, model) -> dict:
        from defectscan.model.evaluate import evaluate_model

        return evaluate_model(model, self.images, choose_for=self.recipe.validation.target_false_call_rate, chosen_on=self.images.name)

    def choose(self, model) -> dict | None:
        """The operating point of `model` on the validation images (None: no rule meets the target)."""
        metrics = self._evaluate(model)
        if metrics["operating_point"] is None:
            log.warning("saved model: %s", metrics["no_operating_point"])
        return metrics["operating_point"]

    def run(self, model, step: int) -> dict:
        metrics = self._evaluate(model)
        point = metrics["operating_point"]
        if point is None:  # no rule of the grid meets the target: the worst figure, Dice decides among such steps
            log.info("step %d: %s", step, metrics["no_operating_point"])
        entry = {"step": step, "operating_point": point, "dice": metrics["verdict_rule"]["dice"], "pixel_auroc": metrics["pixel_auroc"]}
        self.history.append(entry)
        if self.best is None or self.recipe.validation.keep == "last" or self.key(entry) < self.key(self.best):
            self.best = entry
            model.save_weights(self.weights_path)
        self.state_path.write_text(json.dumps({"history": self.history, "best": self.best}, indent=2) + "\n")
        figures = (point or {}).get("figures") or metrics["verdict_rule"]
        log.info(
            "step %d validation: escape %.3f, false calls %.3f, Dice %.4f, on defective images %.4f (kept: step %d)",
            step, figures["escape_rate"] or 0.0, figures["false_call_rate"] or 0.0, figures["dice"], figures["dice_defective"] or 0.0,
            self.best["step"],
        )
        return entry


def write_sidecar(recipe: Recipe, classes: list[str], model_path: Path, summary: dict, best: dict | None) -> Path:
    """model.json beside model.keras: what `models register` records (name, version, classes, operating point, training)."""
    from defectscan.model.registry import default_point, sidecar_path

    point = (best or {}).get("operating_point")
    if point is not None:
        point = {**point, "step": best["step"]}
    else:
        reason = "no validation images (validation.fraction is null)" if best is None else "no rule met the target false-call rate on the validation images"
        point = default_point(recipe.model.threshold, reason)
    metadata = {
        "name": recipe.model.name,
        "version": recipe.model.version,
        "classes": classes,
        "threshold": point["threshold"],
        "operating_point": point,
        "training": {k: summary[k] for k in ("recipe", "dataset", "validation_dataset", "steps", "best_step", "seconds_this_run")},
    }
    path = sidecar_path(model_path)
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    return path


def _output_folder(recipe: Recipe, out_dir: str | Path) -> Path:
    """`out_dir`, created once nothing in the recipe stops the run before it starts."""
    from defectscan.model.registry import is_registered_reference

    if is_registered_reference(recipe.model.init_from):
        raise ModelError(f"model.init_from {recipe.model.init_from} names a registered version, not a file: resolve it first "
                         f"(defectscan.model.registry.resolve_init_from, as `defectscan train` does)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    dataset: LabelledImages | None = None,
    stop_at: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train until recipe.train.steps (or `stop_at`, to pause a run); resumes from checkpoints in out_dir.

    With validation (recipe.validation.fraction), a stratified share of the images is held out; the model
    saved is the validation.keep step's, its sidecar (model.json) has the operating point chosen on them.
    """
    import keras

    from defectscan.model.unet import build_model

    spec = recipe.train
    out_dir = _output_folder(recipe, out_dir)
    images = _usable_images(dataset if dataset is not None else recipe.data.open())
    training_images, validation_images = _split(recipe, images)

    keras.utils.set_random_seed(spec.seed)
    _set_determinism(spec.deterministic, spec.jit_compile)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(spec.precision)
    try:
        strategy = _strategy(recipe)
        with strategy.scope():
            model = build_model(recipe.model.variant, num_classes=len(images.classes), filters=recipe.model.filters, seed=spec.seed)
            _freeze(model, spec.freeze)
            optimizer = _optimizer(recipe)
            optimizer.build(model.trainable_variables)
        manager = _resume(recipe, model, optimizer, training_images, out_dir)
        start = int(optimizer.iterations.numpy())
        end = min(spec.steps, stop_at) if stop_at is not None else spec.steps

        phases = _Phases(recipe, training_images, strategy)
        batches = phases.batches(start)  # the stream checks its own settings: a run that cannot start leaves the folder as it was
        validator = _validator(recipe, validation_images, training_images, out_dir, new_run=manager.latest_checkpoint is None)
        step = _step_function(recipe, model, optimizer, strategy)
        report = _StepReport(spec, out_dir, end, progress)
        current = start
        try:
            while current < end:
                if current == phases.switch_at and current > start:
                    batches = phases.batches(current)
                loss, dice = step(next(batches))
                current = int(optimizer.iterations.numpy())
                report.step(current, end, loss, dice, optimizer)
                if current % spec.checkpoint_every == 0:
                    manager.save(checkpoint_number=current)
                if validator is not None and validator.due(current, current >= spec.steps):
                    with _kept_weights(recipe, model, optimizer):
                        validator.run(model, current)
        except KeyboardInterrupt:
            manager.save(checkpoint_number=int(optimizer.iterations.numpy()))
            raise
        if current != start and (manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{current}")):
            manager.save(checkpoint_number=current)
        seconds = report.close()
        with _kept_weights(recipe, model, optimizer):
            summary = _finish(recipe, model, out_dir, validator, images=images, training_images=training_images,
                              validation_images=validation_images, start=start, current=current, seconds=seconds, report=report)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return TrainResult(
        model_path=out_dir / "model.keras",
        out_dir=out_dir,
        step=current,
        resumed_from=start,
        finished=summary["finished"],
        seconds=seconds,
        images_per_second=summary["images_per_second"] or 0.0,
        last_loss=report.last_loss,
        last_dice=report.last_dice,
        compute_dtype=model.get_layer("output_conv1").compute_dtype,
        best_step=summary["best_step"],
    )


def _finish(recipe: Recipe, model, out_dir: Path, validator, *, images: LabelledImages, training_images: LabelledImages,
            validation_images: LabelledImages | None, start: int, current: int, seconds: float, report: _StepReport) -> dict:
    """training.json (what this run did); once the last step is done, also the model (the best validated
    step's, when validating) and its sidecar."""
    import keras
    import tensorflow as tf

    spec = recipe.train
    finished = current >= spec.steps
    best = validator.best if validator is not None else None
    summary = {
        "recipe": recipe.model_dump(mode="json"),
        "classes": images.classes,
        "dataset": training_images.describe(),
        "validation_dataset": validation_images.describe() if validation_images is not None else None,
        "steps": current,
        "best_step": best["step"] if best else None,
        "resumed_from": start,
        "finished": finished,
        "seconds_this_run": round(seconds, 2),
        "images_per_second": round((current - start) * spec.batch_size / seconds, 2) if current != start else None,
        "last_loss": report.last_loss,
        "last_dice": report.last_dice,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    if finished:
        from defectscan.model.views import with_views

        model_path = out_dir / "model.keras"
        if best is not None:
            model.load_weights(validator.weights_path)
        saved = with_views(model, recipe.model.test_time_views)
        if best is not None and saved is not model:
            # The rule the line applies is chosen on the probabilities it will see: the views' mean.
            best = {**best, "operating_point": validator.choose(saved)}
        saved.save(model_path)
        write_sidecar(recipe, images.classes, model_path, summary, best)
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@contextmanager
def _kept_weights(recipe: Recipe, model, optimizer):
    """Within: the model holds the weights a run validates and saves, the trained ones or, with
    optimizer.ema_momentum, their moving average; after: the trained ones again, so training goes on
    from where it was."""
    if recipe.optimizer.ema_momentum is None:
        yield
        return
    trained = [variable.numpy() for variable in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, trained, strict=True):
            variable.assign(value)


def _usable_images(images: LabelledImages) -> LabelledImages:
    """The dataset, its skipped files logged; refused when nothing is left to train on."""
    if images.problems:
        log.warning("%s", images.problems.summary())
        for problem in images.problems:
            log.warning("skipped %s", problem)
    if len(images) == 0:
        raise DataError(f"{images.name}: no usable training images ({images.problems.summary()})")
    return images


# What a resumed run may change: how far it goes and how often it reports and checkpoints.
_RESUMABLE = {"train.steps", "train.log_every", "train.checkpoint_every"}


# What a run is (recipe and training images), written before its first step: training.json comes at the end of a
# run (or a pause), and a run stopped by Ctrl-C or a crash left checkpoints that any recipe then resumed.
RUN_RECORD = "run.json"


def _resume(recipe: Recipe, model, optimizer, training_images: LabelledImages, out_dir: Path):
    """The run's checkpoint manager, the folder's own run resumed (or nothing yet, for a new run)."""
    _check_same_run(recipe, training_images, out_dir)
    return _restore_or_initialise(recipe, model, optimizer, out_dir)


def _validator(recipe: Recipe, validation_images: LabelledImages | None, training_images: LabelledImages, out_dir: Path, *,
               new_run: bool) -> _Validator | None:
    """The run's validator; a new run is recorded first (and an earlier run's validation state cleared)."""
    if new_run:
        _start_record(recipe, training_images, out_dir)
    return _Validator(recipe, validation_images, out_dir) if validation_images is not None else None


def _start_record(recipe: Recipe, training_images: LabelledImages, out_dir: Path) -> None:
    """A new run in `out_dir`: its record, and no validation history or kept weights of an earlier run there
    (they were read back as this run's: a fresh run in a used folder saved the old run's weights)."""
    for stale in ("validation.json", "best.weights.h5"):
        (out_dir / stale).unlink(missing_ok=True)
    record = {"recipe": recipe.model_dump(mode="json"), "dataset": training_images.describe()}
    (out_dir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _check_same_run(recipe: Recipe, training_images: LabelledImages, out_dir: Path) -> None:
    """A folder with checkpoints resumes the run it holds, not another: the same recipe (but `_RESUMABLE`) and
    training images as its run.json (or, from before it, training.json) records; else the model it saves would be
    labelled with what it was not trained on."""
    recorded = next((path for path in (out_dir / RUN_RECORD, out_dir / "training.json") if path.is_file()), None)
    if not (out_dir / "checkpoints").is_dir() or recorded is None:
        return
    before = json.loads(recorded.read_text())
    was, now = _flat(before.get("recipe") or {}), _flat(recipe.model_dump(mode="json"))
    changed = sorted(key for key in set(was) | set(now) if key not in _RESUMABLE and was.get(key) != now.get(key))
    if before.get("dataset") != training_images.describe():
        changed.append(f"the training images ({before.get('dataset')})")
    if changed:
        raise ModelError(f"{out_dir}: holds checkpoints of another run (it differs in {', '.join(changed[:6])}): resume it with "
                         "its own recipe and data, or train into another folder (--out)")


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _restore_or_initialise(recipe: Recipe, model, optimizer, out_dir: Path):
    """The run's checkpoint manager, after resuming from its latest checkpoint; a new run starts from
    `model.init_from` when given."""
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(checkpoint, out_dir / "checkpoints", max_to_keep=3)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        log.info("resuming from %s", manager.latest_checkpoint)
        if int(optimizer.iterations.numpy()) >= recipe.train.steps:
            log.info("already trained to step %d", int(optimizer.iterations.numpy()))
    elif recipe.model.init_from is not None:
        init_weights(model, recipe.model.init_from)
        log.info("weights initialised from %s", recipe.model.init_from)
    return manager


def _step_function(recipe: Recipe, model, optimizer, strategy):
    """One optimiser step on a (distributed) batch; returns the mean loss and hard Dice over replicas."""
    import keras
    import tensorflow as tf

    from defectscan.model.losses import hard_dice, l2_penalty

    loss_fn = _loss(recipe)
    replicas = strategy.num_replicas_in_sync
    # The same layers, also giving the logits: the losses take cross-entropy from them (model/losses.py).
    with_logits = keras.Model(model.inputs, [model.outputs[0], model.get_layer("output_logits").output])

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            probs, logits = with_logits(x, training=True)
            loss = loss_fn(y, probs, logits=logits)
            total = (loss + l2_penalty(model.trainable_variables, recipe.loss.weight_decay)) / replicas
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                total = optimizer.scale_loss(total)
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss, hard_dice(y, probs)

    @tf.function(jit_compile=recipe.train.jit_compile)
    def compiled_step(x, y):
        return replica_step(x, y)

    @tf.function
    def step(batch):
        loss, dice = strategy.run(compiled_step, args=batch)
        mean = tf.distribute.ReduceOp.MEAN
        return strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, dice, axis=None)

    return step


class _StepReport:
    """Every `log_every` steps (and the last): loss, Dice, learning rate and speed to TensorBoard and the progress bar."""

    def __init__(self, spec, out_dir: Path, end: int, progress: bool) -> None:
        import keras
        import tensorflow as tf

        self.spec = spec
        self.writer = tf.summary.create_file_writer(str(out_dir / "tensorboard"))
        self.bar = keras.utils.Progbar(end, stateful_metrics=["loss", "dice", "img/s"], verbose=1 if progress else 0)
        self.started = self.window_start = time.perf_counter()
        self.window_steps = 0
        self.last_loss: float | None = None
        self.last_dice: float | None = None

    def step(self, current: int, end: int, loss, dice, optimizer) -> None:
        self.window_steps += 1
        if current % self.spec.log_every and current != end:
            return
        self.last_loss, self.last_dice = float(loss), float(dice)
        now = time.perf_counter()
        rate = self.window_steps * self.spec.batch_size / max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, 0
        with self.writer.as_default(step=current):
            write_scalars({
                "loss": self.last_loss,
                "dice": self.last_dice,
                "learning_rate": applied_rate(optimizer, current),
                "images_per_second": rate,
            })
        self.bar.update(current, [("loss", self.last_loss), ("dice", self.last_dice), ("img/s", rate)])

    def close(self) -> float:
        """Seconds since the first step began."""
        self.writer.flush()
        return time.perf_counter() - self.started

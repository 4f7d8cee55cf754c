"""Train a TinyUNet from a recipe: custom loop with checkpoints, resume, TensorBoard and a progress bar.

Output folder layout:
    checkpoints/        tf.train checkpoints (model + optimizer, step = optimizer iterations)
    tensorboard/        scalar logs: loss, dice, learning rate, images per second
    model.keras         the trained model (saved at the end)
    training.json       recipe, steps, time, last loss/Dice, dataset summary

A run that finds checkpoints in its folder continues from the latest: the step counter goes on
and, because the data stream is a function of the seed and the step (data/dataset.py), the
result is the one an uninterrupted run would have reached.
"""

from __future__ import annotations

import json
import logging
import time
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


def open_dataset(recipe: Recipe, split: str | None = None) -> LabelledImages:
    """The recipe's training data (or another split of it, for evaluation)."""
    data = recipe.data
    if data.path is None:
        raise ConfigError("data.path is not set: give --data PATH or set data.path in the recipe")
    if data.format == "dagm":
        from defectscan.data.dagm import read_dagm

        return read_dagm(data.path, split=split or data.split, classes=data.classes, per_class=data.per_class, strict=data.strict)
    if data.format == "folders":
        from defectscan.data.folders import read_folders

        if data.masks is None:
            raise ConfigError("data.masks is not set: the folders format needs the masks folder")
        return read_folders(data.path, data.masks, classes=data.classes or ["defect"], strict=data.strict)
    from defectscan.data.zarrset import read_zarr

    return read_zarr(data.path, tile=data.tile)


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
    schedule = keras.optimizers.schedules.ExponentialDecay(o.learning_rate, o.decay_steps, o.decay_rate, staircase=o.staircase)
    optimizer = keras.optimizers.RMSprop(schedule, rho=o.rho, momentum=o.momentum, centered=o.centered, epsilon=o.epsilon)
    if recipe.train.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def init_weights(model, source: str | Path) -> None:
    """Copy the weights of the .keras model `source` into `model`; both must have one structure."""
    from defectscan.model.export import load_model

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


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    dataset: LabelledImages | None = None,
    stop_at: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train until recipe.train.steps (or `stop_at`, to pause a run); resumes from checkpoints in out_dir."""
    import keras
    import tensorflow as tf

    from defectscan.data.dataset import training_dataset
    from defectscan.model.losses import LOSSES, hard_dice, l2_penalty
    from defectscan.model.unet import build_model

    spec = recipe.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = dataset if dataset is not None else open_dataset(recipe)
    if images.problems:
        log.warning("%s", images.problems.summary())
        for problem in images.problems:
            log.warning("skipped %s", problem)
    if len(images) == 0:
        raise DataError(f"{images.name}: no usable training images ({images.problems.summary()})")

    keras.utils.set_random_seed(spec.seed)
    _set_determinism(spec.deterministic, spec.jit_compile)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(spec.precision)
    try:
        strategy = _strategy(recipe)
        with strategy.scope():
            model = build_model(recipe.model.variant, num_classes=len(images.classes), filters=recipe.model.filters, seed=spec.seed)
            optimizer = _optimizer(recipe)
            optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        manager = tf.train.CheckpointManager(checkpoint, out_dir / "checkpoints", max_to_keep=3)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            log.info("resuming from %s", manager.latest_checkpoint)
        elif recipe.model.init_from is not None:
            init_weights(model, recipe.model.init_from)
            log.info("weights initialised from %s", recipe.model.init_from)
        start = int(optimizer.iterations.numpy())
        end = min(spec.steps, stop_at) if stop_at is not None else spec.steps
        if start >= spec.steps:
            log.info("already trained to step %d", start)

        data = training_dataset(
            images,
            batch_size=spec.batch_size,
            seed=spec.seed,
            crop_size=recipe.data.crop_size,
            defect_crop_fraction=recipe.data.defect_crop_fraction,
            cache=recipe.data.cache,
            shuffle_buffer=recipe.data.shuffle_buffer,
            start_step=start,
        )
        batches = iter(strategy.experimental_distribute_dataset(data))
        loss_fn = LOSSES[recipe.loss.name]
        loss_kwargs = {"switch_at": recipe.loss.switch_at} if recipe.loss.name == "adaptive" else {}
        if recipe.loss.name != "bce":
            loss_kwargs["smoothing"] = recipe.loss.smoothing
        replicas = strategy.num_replicas_in_sync

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                loss = loss_fn(y, probs, **loss_kwargs)
                total = (loss + l2_penalty(model.trainable_variables, recipe.loss.weight_decay)) / replicas
                if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                    total = optimizer.scale_loss(total)
            grads = tape.gradient(total, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss, hard_dice(y, probs)

        @tf.function(jit_compile=spec.jit_compile)
        def compiled_step(x, y):
            return replica_step(x, y)

        @tf.function
        def step(batch):
            loss, dice = strategy.run(compiled_step, args=batch)
            mean = tf.distribute.ReduceOp.MEAN
            return strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, dice, axis=None)

        writer = tf.summary.create_file_writer(str(out_dir / "tensorboard"))
        bar = keras.utils.Progbar(end, stateful_metrics=["loss", "dice", "img/s"], verbose=1 if progress else 0)
        started = time.perf_counter()
        window_start, window_steps = started, 0
        last_loss = last_dice = None
        rate = 0.0
        current = start
        try:
            while current < end:
                loss, dice = step(next(batches))
                current = int(optimizer.iterations.numpy())
                window_steps += 1
                if current % spec.log_every == 0 or current == end:
                    last_loss, last_dice = float(loss), float(dice)
                    now = time.perf_counter()
                    rate = window_steps * spec.batch_size / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    lr = optimizer.learning_rate
                    with writer.as_default(step=current):
                        write_scalars(
                            {
                                "loss": last_loss,
                                "dice": last_dice,
                                "learning_rate": float(lr(current) if callable(lr) else lr),
                                "images_per_second": rate,
                            }
                        )
                    bar.update(current, [("loss", last_loss), ("dice", last_dice), ("img/s", rate)])
                if current % spec.checkpoint_every == 0:
                    manager.save(checkpoint_number=current)
        except KeyboardInterrupt:
            manager.save(checkpoint_number=int(optimizer.iterations.numpy()))
            raise
        if current != start and (manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{current}")):
            manager.save(checkpoint_number=current)
        writer.flush()
        seconds = time.perf_counter() - started
        trained = current - start
        finished = current >= spec.steps
        model_path = out_dir / "model.keras"
        if finished:
            model.save(model_path)
        summary = {
            "recipe": recipe.model_dump(mode="json"),
            "classes": images.classes,
            "dataset": images.describe(),
            "steps": current,
            "resumed_from": start,
            "finished": finished,
            "seconds_this_run": round(seconds, 2),
            "images_per_second": round(trained * spec.batch_size / seconds, 2) if trained else None,
            "last_loss": last_loss,
            "last_dice": last_dice,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        }
        (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return TrainResult(
        model_path=model_path,
        out_dir=out_dir,
        step=current,
        resumed_from=start,
        finished=finished,
        seconds=seconds,
        images_per_second=summary["images_per_second"] or 0.0,
        last_loss=last_loss,
        last_dice=last_dice,
        compute_dtype=model.get_layer("output_conv1").compute_dtype,
    )

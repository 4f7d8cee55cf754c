"""Training: resume after an interruption, seeded repeatability, XLA and MirroredStrategy on CPU, recipes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from defectscan.data.synth import SynthSpec, write_synthetic_dagm
from defectscan.errors import ConfigError
from defectscan.model.export import load_model
from defectscan.model.recipe import load_recipe
from defectscan.model.train import train
from defectscan.paths import CONFIGS_DIR

CPU_RECIPE = CONFIGS_DIR / "model" / "tinyunet-cpu-test.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dagm(root, SynthSpec(classes=2, train=4, test=2, size=32, seed=0))
    return root


def _weights(path):
    return [w.copy() for w in load_model(path).get_weights()]


def _scalar_tags(folder):
    import tensorflow as tf

    tags = {}
    for event_file in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return {tag: sorted(steps) for tag, steps in tags.items()}


@pytest.fixture(scope="module")
def uninterrupted(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a")
    result = train(load_recipe(CPU_RECIPE, data_path=str(synth)), out, progress=False)
    return result, out


def test_a_run_writes_model_checkpoints_logs_and_summary(uninterrupted):
    result, out = uninterrupted
    assert result.finished and result.step == 6 and result.resumed_from == 0
    assert result.model_path == out / "model.keras" and result.model_path.is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.index")) == ["ckpt-3.index", "ckpt-6.index"]
    tags = _scalar_tags(out / "tensorboard")
    assert set(tags) == {"loss", "dice", "learning_rate", "images_per_second"}
    assert tags["loss"] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 6 and summary["classes"] == ["defect"] and summary["recipe"]["train"]["batch_size"] == 4
    assert np.isfinite(result.last_loss) and 0 <= result.last_dice <= 1


def test_resume_after_interruption_continues_the_step_count_and_matches(uninterrupted, synth, tmp_path):
    recipe = load_recipe(CPU_RECIPE, data_path=str(synth))
    paused = train(recipe, tmp_path, stop_at=3, progress=False)
    assert (paused.step, paused.finished) == (3, False)
    assert not (tmp_path / "model.keras").exists()
    resumed = train(recipe, tmp_path, progress=False)
    assert (resumed.resumed_from, resumed.step, resumed.finished) == (3, 6, True)
    assert _scalar_tags(tmp_path / "tensorboard")["loss"] == [1, 2, 3, 4, 5, 6]
    # Same seed, same data stream from step 3 on, optimizer state restored: the same weights.
    for a, b in zip(_weights(uninterrupted[0].model_path), _weights(resumed.model_path)):
        np.testing.assert_array_equal(a, b)
    again = train(recipe, tmp_path, progress=False)
    assert (again.resumed_from, again.step) == (6, 6)


def test_a_folder_resumes_only_its_own_run(synth, tmp_path):
    from defectscan.errors import ModelError

    recipe = load_recipe(CPU_RECIPE, data_path=str(synth))
    train(recipe, tmp_path / "run", stop_at=3, progress=False)
    recorded = (tmp_path / "run" / "training.json").read_text()
    with pytest.raises(ModelError, match=r"run: holds checkpoints of another run \(it differs in model.name, train.seed\): resume it"):
        train(load_recipe(CPU_RECIPE, ["train.seed=5", "model.name=other"], str(synth)), tmp_path / "run", progress=False)
    other = tmp_path / "other-data"
    write_synthetic_dagm(other, SynthSpec(classes=2, train=3, test=2, size=32, seed=1))
    with pytest.raises(ModelError, match=r"differs in data.path, the training images \(.*synth\d* \(Train\): 8 images"):
        train(load_recipe(CPU_RECIPE, data_path=str(other)), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "training.json").read_text() == recorded and not (tmp_path / "run" / "model.keras").exists()
    longer = train(load_recipe(CPU_RECIPE, ["train.steps=8", "train.log_every=2"], str(synth)), tmp_path / "run", progress=False)
    assert (longer.resumed_from, longer.step) == (3, 8)  # going further, or logging otherwise, is the same run


def test_a_run_stopped_before_writing_its_summary_still_resumes_only_itself(synth, tmp_path):
    """Ctrl-C or a crash leaves checkpoints and no training.json: any recipe resumed them, and the model was labelled
    with a seed and rate it was not trained with. The run's record is written before its first step."""
    from defectscan.errors import ModelError

    train(load_recipe(CPU_RECIPE, data_path=str(synth)), tmp_path, stop_at=3, progress=False)
    (tmp_path / "training.json").unlink()  # as a Ctrl-C leaves the folder: checkpoints, no summary
    with pytest.raises(ModelError, match=r"holds checkpoints of another run \(it differs in optimizer.learning_rate, train.seed\)"):
        train(load_recipe(CPU_RECIPE, ["train.seed=5", "optimizer.learning_rate=0.5"], str(synth)), tmp_path, progress=False)
    assert train(load_recipe(CPU_RECIPE, data_path=str(synth)), tmp_path, progress=False).resumed_from == 3


def test_a_fixed_seed_repeats_and_another_seed_differs(uninterrupted, synth, tmp_path):
    recipe = load_recipe(CPU_RECIPE, data_path=str(synth))
    repeat = train(recipe, tmp_path / "same", progress=False)
    for a, b in zip(_weights(uninterrupted[0].model_path), _weights(repeat.model_path)):
        np.testing.assert_array_equal(a, b)
    other = train(load_recipe(CPU_RECIPE, ["train.seed=1", "train.steps=1"], str(synth)), tmp_path / "other", progress=False)
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(repeat.model_path), _weights(other.model_path)))


def test_pasted_defects_train_repeatably_and_change_the_run(uninterrupted, synth, tmp_path):
    settings = ["data.defect_paste_fraction=0.5"]
    runs = [train(load_recipe(CPU_RECIPE, settings, str(synth)), tmp_path / name, progress=False) for name in ("a", "b")]
    assert all(run.finished and np.isfinite(run.last_loss) for run in runs)
    for a, b in zip(_weights(runs[0].model_path), _weights(runs[1].model_path)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(uninterrupted[0].model_path), _weights(runs[0].model_path)))


def test_xla_and_mirrored_strategy_run_on_the_cpu(synth, tmp_path):
    settings = ["train.steps=2", "train.jit_compile=true", "train.distribute=mirrored", "train.devices=['/cpu:0']"]
    with pytest.raises(ConfigError, match="jit_compile=true needs train.deterministic=false"):
        train(load_recipe(CPU_RECIPE, settings, str(synth)), tmp_path)
    result = train(load_recipe(CPU_RECIPE, [*settings, "train.deterministic=false"], str(synth)), tmp_path, progress=False)
    assert result.finished and np.isfinite(result.last_loss)


def test_recipe_overrides_and_errors(tmp_path):
    recipe = load_recipe(CONFIGS_DIR / "model" / "tinyunet-dagm.yaml", ["train.steps=7", "optimizer.centered=false", "model.version=4"], "data/x")
    assert (recipe.train.steps, recipe.optimizer.centered, recipe.data.path, recipe.model.version) == (7, False, "data/x", "4")
    # Text fields take the value as written, not as YAML reads it (2.10 would be the number 2.1, on would be true).
    # 1e3 is a number, as YAML 1.2 and JSON read it (PyYAML's YAML 1.1 read the text '1e3' and it was refused)
    assert load_recipe(CPU_RECIPE, ["train.steps=1e3", "optimizer.learning_rate=4E-4"]).train.steps == 1000
    texts = load_recipe(CPU_RECIPE, ["model.version=2.10", "model.name=on", "model.init_from=null"])
    assert (texts.model.version, texts.model.name, texts.model.init_from) == ("2.10", "on", None)
    reference = load_recipe(CONFIGS_DIR / "model" / "tinyunet-dagm.yaml")
    assert (reference.train.batch_size, reference.optimizer.learning_rate, reference.optimizer.decay_steps) == (16, 1e-4, 500)
    assert (reference.optimizer.rho, reference.optimizer.momentum, reference.optimizer.centered) == (0.9, 0.8, True)
    assert (reference.loss.name, reference.loss.switch_at, reference.loss.weight_decay) == ("adaptive", 0.3, 1e-5)
    with pytest.raises(ConfigError, match=r"train.batch_size: Input should be greater than or equal to 1 \(got 0\)"):
        load_recipe(CPU_RECIPE, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="train.bogus: Extra inputs are not permitted"):
        load_recipe(CPU_RECIPE, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_recipe(CPU_RECIPE, ["steps"])
    with pytest.raises(ConfigError, match="data.crop_size 20 must be a multiple of 16"):
        load_recipe(CPU_RECIPE, ["data.crop_size=20"])
    with pytest.raises(ConfigError, match="data.defect_paste_fraction: Input should be less than or equal to 1"):
        load_recipe(CPU_RECIPE, ["data.defect_paste_fraction=1.5"])
    bare = tmp_path / "bare.yaml"  # a bare `data:` line is None in YAML: --data gave "TypeError: 'NoneType' object ..."
    bare.write_text("model:\n  variant: tinyunet\ndata:\ntrain:\n  steps: 3\n")
    assert load_recipe(bare, ["data.crop_size=32"], "data/y").data.path == "data/y"
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: training recipe not found"):
        load_recipe(missing)
    with pytest.raises(ConfigError, match="data.path is not set"):
        train(load_recipe(CPU_RECIPE), tmp_path)


def test_whole_images_off_the_models_size_multiple_are_refused_before_the_first_step(tmp_path):
    """72x72 images: refused after `validation.every` steps, or with a Keras shape error when training on whole images."""
    from defectscan.data.dataset import LabelledImages
    from defectscan.errors import DataError

    def load(i):
        mask = np.zeros((72, 72), np.uint8)
        mask[10:20, 10:20] = i % 2
        return np.full((72, 72), 100, np.uint8), mask

    images = LabelledImages("odd", [str(i) for i in range(8)], ["defect"], (72, 72), load, [bool(i % 2) for i in range(8)])
    for overrides, uses in ((["validation.fraction=0.5"], "validation"), (["data.crop_size=null"], "training without data.crop_size")):
        with pytest.raises(DataError, match=rf"odd: images are 72x72; {uses} score\(s\) whole images, which this model needs in multiples of 16"):
            train(load_recipe(CPU_RECIPE, overrides, "unused"), tmp_path / "out", dataset=images, progress=False)
        assert not (tmp_path / "out" / "checkpoints").exists()
    assert train(load_recipe(CPU_RECIPE, ["train.steps=1"], "unused"), tmp_path / "crops", dataset=images, progress=False).finished  # crops fit


def test_ctrl_c_saves_a_checkpoint_that_the_next_run_resumes(synth, tmp_path, monkeypatch):
    import keras

    original = keras.utils.Progbar.update

    def interrupt_at_step_2(self, current, values=None, finalize=None):
        if current == 2:
            raise KeyboardInterrupt
        return original(self, current, values, finalize)

    recipe = load_recipe(CPU_RECIPE, data_path=str(synth))
    monkeypatch.setattr(keras.utils.Progbar, "update", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path, progress=False)
    monkeypatch.setattr(keras.utils.Progbar, "update", original)
    assert (tmp_path / "checkpoints" / "ckpt-2.index").is_file()
    resumed = train(recipe, tmp_path, progress=False)
    assert (resumed.resumed_from, resumed.step, resumed.finished) == (2, 6, True)


def test_mixed_precision_and_one_class_per_dagm_folder(synth, tmp_path):
    import keras

    recipe = load_recipe(CPU_RECIPE, ["train.steps=1", "train.precision=mixed_float16", "data.per_class=true"], str(synth))
    result = train(recipe, tmp_path, progress=False)
    assert keras.mixed_precision.global_policy().name == "float32", "the policy is restored after training"
    model = load_model(result.model_path)
    assert model.output_shape[-1] == 2
    assert result.compute_dtype == "float16"
    # The file holds float32 weights and loads under the global policy: serving chooses its precision.
    assert model.get_layer("output_conv1").compute_dtype == "float32"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    assert json.loads((tmp_path / "training.json").read_text())["classes"] == ["Class1", "Class2"]


def test_init_from_starts_from_another_models_weights_and_a_resume_keeps_its_checkpoint(uninterrupted, synth, tmp_path):
    from defectscan.model.train import init_weights
    from defectscan.model.unet import build_model

    donor = uninterrupted[0].model_path
    fresh = build_model("tinyunet", num_classes=1, filters=load_recipe(CPU_RECIPE).model.filters, seed=5)
    init_weights(fresh, donor)
    for a, b in zip(_weights(donor), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)

    recipe = load_recipe(CPU_RECIPE, [f"model.init_from={donor}", "train.steps=4"], str(synth))
    whole = train(recipe, tmp_path / "whole", progress=False)
    assert json.loads((tmp_path / "whole" / "training.json").read_text())["recipe"]["model"]["init_from"] == str(donor)
    # A fine-tuned run is not a run from He init with the same seed.
    scratch = train(load_recipe(CPU_RECIPE, ["train.steps=4"], str(synth)), tmp_path / "scratch", progress=False)
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(whole.model_path), _weights(scratch.model_path)))
    # Resuming restores the checkpoint (weights and optimizer), not the donor's weights again.
    train(recipe, tmp_path / "paused", stop_at=2, progress=False)
    resumed = train(recipe, tmp_path / "paused", progress=False)
    assert (resumed.resumed_from, resumed.step) == (2, 4)
    for a, b in zip(_weights(whole.model_path), _weights(resumed.model_path)):
        np.testing.assert_array_equal(a, b)


def test_init_from_refuses_a_missing_file_other_classes_or_another_structure(uninterrupted, synth, tmp_path):
    from defectscan.errors import ModelError

    donor = uninterrupted[0].model_path
    missing = tmp_path / "absent.keras"
    with pytest.raises(ModelError, match=f"{missing}: model file does not exist"):
        train(load_recipe(CPU_RECIPE, [f"model.init_from={missing}"], str(synth)), tmp_path / "a", progress=False)
    with pytest.raises(ModelError, match=f"{donor}: cannot initialise from it: it has 1 output classes, the recipe's dataset 2"):
        train(load_recipe(CPU_RECIPE, [f"model.init_from={donor}", "data.per_class=true"], str(synth)), tmp_path / "b", progress=False)
    with pytest.raises(ModelError, match=f"{donor}: cannot initialise from it: its layers differ from the recipe's model"):
        train(load_recipe(CPU_RECIPE, [f"model.init_from={donor}", "model.filters=[4, 8, 8, 8, 16]"], str(synth)), tmp_path / "c", progress=False)
    assert not list(tmp_path.glob("*/checkpoints/*.index")), "a refused run leaves no checkpoint to resume from"


@pytest.mark.parametrize("path", sorted((CONFIGS_DIR / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path, data_path="data/x")
    assert recipe.train.steps > 0 and recipe.model.variant in ("tinyunet", "unet")


def test_the_finetune_recipe_runs_from_the_shipped_demo_model_and_records_an_operating_point(tmp_path):
    from defectscan.data.surfaces import SurfaceSpec, write_surfaces_dagm

    data = tmp_path / "surfaces"
    write_surfaces_dagm(data, SurfaceSpec(surfaces=("terrain", "deep_field"), train=10, test=2, size=64, seed=3))
    # The shipped recipe as it is, shrunk only in size and steps.
    recipe = load_recipe(CONFIGS_DIR / "model" / "tinyunet-finetune.yaml",
                         ["train.steps=4", "validation.every=2", "data.crop_size=32", "train.batch_size=4"], str(data))
    assert recipe.model.init_from == "demo"
    result = train(recipe, tmp_path / "run", progress=False)
    assert result.finished and result.best_step in (2, 4)
    sidecar = json.loads((tmp_path / "run" / "model.json").read_text())
    point = sidecar["operating_point"]
    assert point["target_false_call_rate"] == recipe.validation.target_false_call_rate
    assert {"threshold", "min_defect_area", "fail_score"} <= set(point)


def test_a_cosine_schedule_warms_up_then_falls_to_its_final_fraction_at_the_last_step():
    from defectscan.model.train import _optimizer

    recipe = load_recipe(CPU_RECIPE, ["optimizer.schedule=cosine", "optimizer.learning_rate=0.001",
                                      "optimizer.final_fraction=0.1", "train.steps=100", "train.warmup_steps=10"])
    schedule = _optimizer(recipe)._learning_rate  # the schedule object, not the current value
    rate = {step: float(schedule(step)) for step in (0, 9, 50, 100, 150)}
    assert rate[0] == pytest.approx(0.001 / 10, rel=0.01), "the warm-up's first step"
    assert rate[9] == pytest.approx(0.001, rel=0.03), "about the full rate at the end of the warm-up"
    assert rate[50] == pytest.approx(0.001 * (0.1 + 0.9 * 0.5), rel=0.01), "half way down the cosine"
    assert rate[100] == pytest.approx(0.0001, rel=0.01) and rate[150] == pytest.approx(0.0001, rel=0.01)


def test_tensorboard_logs_the_rate_each_step_applied(synth, tmp_path):
    """It logged the next step's rate: the warm-up's first step showed the second's."""
    import tensorflow as tf

    from defectscan.model.train import _optimizer

    overrides = ["optimizer.schedule=cosine", "optimizer.learning_rate=0.001", "train.steps=4", "train.warmup_steps=2"]
    train(load_recipe(CPU_RECIPE, overrides, str(synth)), tmp_path, progress=False)
    logged = {}
    for event_file in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                if value.tag == "learning_rate":
                    logged[event.step] = float(tf.make_ndarray(value.tensor))
    schedule = _optimizer(load_recipe(CPU_RECIPE, overrides))._learning_rate
    assert logged == {step: pytest.approx(float(schedule(step - 1)), rel=1e-5) for step in (1, 2, 3, 4)}
    assert logged[1] == pytest.approx(0.001 / 2 * float(keras_cosine(0, 4)), rel=1e-5)


def keras_cosine(step: int, steps: int) -> float:
    import math

    return 0.5 * (1 + math.cos(math.pi * step / steps))


def test_frozen_layers_keep_the_donors_weights_and_the_others_train(uninterrupted, synth, tmp_path):
    donor = uninterrupted[0].model_path
    recipe = load_recipe(CPU_RECIPE, [f"model.init_from={donor}", "train.freeze=['input_', 'down1_']"], str(synth))
    result = train(recipe, tmp_path, progress=False)
    before, after = load_model(donor), load_model(result.model_path)
    for layer in after.layers:
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), before.get_layer(layer.name).get_weights(), strict=True))
        assert same == layer.name.startswith(("input_", "down1_")), layer.name


def test_freeze_errors_name_the_prefix_or_the_missing_donor(synth, tmp_path):
    with pytest.raises(ConfigError, match=r"train.freeze \['input_'\] keeps layers as model.init_from gives them; without init_from they would stay random"):
        load_recipe(CPU_RECIPE, ["train.freeze=['input_']"])
    recipe = load_recipe(CPU_RECIPE, ["model.init_from=demo", "train.freeze=['encoder']"], str(synth))
    with pytest.raises(ConfigError, match=r"train.freeze: 'encoder' names no layer with weights; the model's are input_conv1, input_conv2, down1_conv1"):
        train(recipe, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()

"""Training with a validation split: held-out images, the best step kept, the operating point recorded and used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectscan.config import load_settings
from defectscan.data.dagm import read_dagm
from defectscan.data.synth import SynthSpec, write_synthetic_dagm
from defectscan.errors import DataError
from defectscan.model.export import load_model
from defectscan.model.recipe import load_recipe
from defectscan.model.registry import read_metadata, register_model, sidecar_path
from defectscan.model.train import train
from defectscan.model.verdict import VerdictRules
from defectscan.paths import CONFIGS_DIR
from defectscan.pipeline.run import verdict_rules

CPU_RECIPE = CONFIGS_DIR / "model" / "tinyunet-cpu-test.yaml"
VALIDATED = ("validation.fraction=0.5", "validation.every=2", "validation.target_false_call_rate=0.5", "train.steps=6")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dagm(root, SynthSpec(classes=2, train=6, test=2, size=32, seed=0))
    return root


@pytest.fixture(scope="module")
def validated(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated")
    result = train(load_recipe(CPU_RECIPE, VALIDATED, data_path=str(synth)), out, progress=False)
    return result, out


def test_the_validation_images_are_held_out_and_the_best_step_is_saved(validated, synth):
    result, out = validated
    state = json.loads((out / "validation.json").read_text())
    assert [entry["step"] for entry in state["history"]] == [2, 4, 6]
    assert result.best_step == state["best"]["step"]
    summary = json.loads((out / "training.json").read_text())
    # 12 training images in 4 strata of 3 (class x good/defective): round(0.5 x 3) = 2 of each held out
    assert "4 images" in summary["dataset"] and "8 images" in summary["validation_dataset"]
    best = load_model(out / "model.keras")
    reference = load_model(result.model_path)
    reference.load_weights(out / "best.weights.h5")
    for a, b in zip(best.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_sidecar_records_the_operating_point_and_registration_takes_it(validated, session):
    result, out = validated
    meta = read_metadata(sidecar_path(result.model_path))
    point = meta.operating_point
    assert point["target_false_call_rate"] == 0.5 and point["step"] == result.best_step
    assert {"tpr", "tnr", "escape_rate", "false_call_rate", "dice", "dice_defective", "image_auroc"} <= set(point["figures"])
    row = register_model(session, result.model_path, metadata=meta)
    assert row.operating_point == point and row.threshold == point["threshold"]
    rules = VerdictRules.from_dict(point)
    # inspect uses the recorded rule unless the settings (or a job) override a field of it
    assert verdict_rules(row, load_settings(environ={}).inspection) == rules
    overridden = load_settings(environ={"DEFECTSCAN_INSPECTION__MIN_DEFECT_AREA": "7"}).inspection
    assert verdict_rules(row, overridden) == VerdictRules(rules.threshold, 7, rules.fail_score)


def test_resuming_keeps_the_validation_history(synth, validated, tmp_path):
    recipe = load_recipe(CPU_RECIPE, VALIDATED, data_path=str(synth))
    train(recipe, tmp_path, stop_at=4, progress=False)
    resumed = train(recipe, tmp_path, progress=False)
    state = json.loads((tmp_path / "validation.json").read_text())
    assert [entry["step"] for entry in state["history"]] == [2, 4, 6]
    assert resumed.best_step == validated[0].best_step


def test_a_new_run_in_a_used_folder_validates_and_saves_its_own_weights(synth, tmp_path):
    """With the checkpoints deleted, a new run read the old validation.json: it validated no step already in that
    history and, at the end, saved the old run's kept weights under the new recipe."""
    import shutil

    recipe = load_recipe(CPU_RECIPE, VALIDATED, data_path=str(synth))
    first = train(recipe, tmp_path, progress=False)
    before = [w.copy() for w in load_model(first.model_path).get_weights()]
    first_history = json.loads((tmp_path / "validation.json").read_text())["history"]
    shutil.rmtree(tmp_path / "checkpoints")
    second = train(load_recipe(CPU_RECIPE, [*VALIDATED, "train.seed=7", "optimizer.learning_rate=0.05"], str(synth)), tmp_path, progress=False)
    assert second.resumed_from == 0
    state = json.loads((tmp_path / "validation.json").read_text())
    assert [entry["step"] for entry in state["history"]] == [2, 4, 6] and state["history"] != first_history  # its own, not the first run's
    after = load_model(second.model_path).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    # a new run that cannot start (crops larger than the images) leaves the folder's state as it was
    shutil.rmtree(tmp_path / "checkpoints")
    kept = (tmp_path / "validation.json").read_text()
    with pytest.raises(DataError, match="crop"):
        train(load_recipe(CPU_RECIPE, [*VALIDATED, "data.crop_size=64"], str(synth)), tmp_path, progress=False)
    assert (tmp_path / "validation.json").read_text() == kept


def test_a_validation_part_without_good_images_is_refused(tmp_path):
    root = tmp_path / "all-defective"
    write_synthetic_dagm(root, SynthSpec(classes=1, train=6, test=0, size=32, defect_fraction=1.0, seed=0))
    with pytest.raises(DataError, match=r"the validation part \(3 of 6 images\) has no defect-free image"):
        train(load_recipe(CPU_RECIPE, VALIDATED, data_path=str(root)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_validation_images_are_never_trained_on(synth):
    from defectscan.model.train import _split

    recipe = load_recipe(CPU_RECIPE, VALIDATED, data_path=str(synth))
    images = read_dagm(synth, "Train")
    training, validation = _split(recipe, images)
    assert not set(training.keys) & set(validation.keys)
    assert sorted(training.keys + validation.keys) == sorted(images.keys)
    assert np.array_equal(training.load(0)[0], images.load(images.keys.index(training.keys[0]))[0])


def _trained_weights(checkpoint_dir, recipe):
    """The weights the optimiser reached (not their average) from a run's latest checkpoint."""
    import tensorflow as tf

    from defectscan.model.unet import build_model

    model = build_model(recipe.model.variant, num_classes=1, filters=recipe.model.filters, seed=0)
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(checkpoint_dir)).expect_partial()
    return model.get_weights()


def test_a_moving_average_is_validated_and_saved_without_changing_the_training(synth, validated, tmp_path):
    recipe = load_recipe(CPU_RECIPE, [*VALIDATED, "optimizer.ema_momentum=0.5"], data_path=str(synth))
    result = train(recipe, tmp_path / "ema", progress=False)
    plain_out = validated[1]
    # Validation swapped the average in and the trained weights back: the optimiser's path is the plain run's.
    for a, b in zip(_trained_weights(tmp_path / "ema" / "checkpoints", recipe), _trained_weights(plain_out / "checkpoints", recipe), strict=True):
        np.testing.assert_array_equal(a, b)
    state = json.loads((tmp_path / "ema" / "validation.json").read_text())
    assert [entry["step"] for entry in state["history"]] == [2, 4, 6]
    saved = load_model(result.model_path).get_weights()
    best = load_model(result.model_path)
    best.load_weights(tmp_path / "ema" / "best.weights.h5")
    for a, b in zip(saved, best.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... and what was validated and saved is the average, not the weights of any step the plain run saved.
    plain = load_model(validated[0].model_path).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(saved, plain, strict=True))
    # The averages are checkpointed: a paused and resumed run saves the same model.
    train(recipe, tmp_path / "paused", stop_at=3, progress=False)
    resumed = train(recipe, tmp_path / "paused", progress=False)
    for a, b in zip(saved, load_model(resumed.model_path).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_validation_the_average_is_the_model_saved(synth, tmp_path):
    plain = train(load_recipe(CPU_RECIPE, data_path=str(synth)), tmp_path / "plain", progress=False)
    recipe = load_recipe(CPU_RECIPE, ["optimizer.ema_momentum=0.9"], data_path=str(synth))
    averaged = train(recipe, tmp_path / "ema", progress=False)
    trained = _trained_weights(tmp_path / "ema" / "checkpoints", recipe)
    for a, b in zip(trained, load_model(plain.model_path).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    saved = load_model(averaged.model_path).get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(saved, trained, strict=True))


@pytest.mark.parametrize("value", ["0", "1", "1.5"])
def test_an_ema_momentum_outside_0_1_is_refused(value):
    from defectscan.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"optimizer.ema_momentum: Input should be (greater|less) than [01] \(got {value}\)"):
        load_recipe(CPU_RECIPE, [f"optimizer.ema_momentum={value}"])


def test_a_recipe_with_views_saves_their_average_and_chooses_its_operating_point_on_it(synth, validated, tmp_path):
    from defectscan.model.evaluate import evaluate_model
    from defectscan.model.train import _split
    from defectscan.model.views import ViewAverage, views_of

    recipe = load_recipe(CPU_RECIPE, [*VALIDATED, "model.test_time_views=4"], data_path=str(synth))
    result = train(recipe, tmp_path, progress=False)
    saved = load_model(result.model_path)
    assert isinstance(saved, ViewAverage) and views_of(saved) == 4
    # The steps are ranked on the plain UNet, as without views: the same best step and weights.
    assert result.best_step == validated[0].best_step
    for a, b in zip(saved.get_weights(), load_model(validated[0].model_path).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    point = read_metadata(sidecar_path(result.model_path)).operating_point
    _, validation = _split(recipe, read_dagm(synth, "Train"))
    again = evaluate_model(saved, validation, choose_for=0.5, chosen_on=validation.name)["operating_point"]
    assert {k: point[k] for k in ("threshold", "min_defect_area", "fail_score", "figures")} == {
        k: again[k] for k in ("threshold", "min_defect_area", "fail_score", "figures")
    }
    assert point["step"] == result.best_step


def test_test_time_views_other_than_1_2_4_8_are_refused():
    from defectscan.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.test_time_views: Input should be 1, 2, 4 or 8 \(got 3\)"):
        load_recipe(CPU_RECIPE, ["model.test_time_views=3"])


def test_keep_last_saves_the_last_step_and_still_records_every_validation(synth, tmp_path):
    recipe = load_recipe(CPU_RECIPE, [*VALIDATED, "validation.keep=last"], data_path=str(synth))
    result = train(recipe, tmp_path, progress=False)
    state = json.loads((tmp_path / "validation.json").read_text())
    assert [entry["step"] for entry in state["history"]] == [2, 4, 6] and result.best_step == state["best"]["step"] == 6
    for a, b in zip(load_model(result.model_path).get_weights(), _trained_weights(tmp_path / "checkpoints", recipe), strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_metadata(sidecar_path(result.model_path)).operating_point["step"] == 6


def test_steps_rank_by_escapes_false_calls_then_dice_of_defective_images_and_a_tie_goes_to_the_later():
    from defectscan.model.train import _Validator

    def entry(step, escape, dice, dice_defective):
        figures = {"escape_rate": escape, "false_call_rate": 0.0, "dice": dice, "dice_defective": dice_defective}
        return {"step": step, "operating_point": {"figures": figures}, "dice": dice}

    finds_little = entry(700, 0.125, 0.80, 0.59)  # good images flatter its overall Dice
    settled = entry(1500, 0.125, 0.76, 0.71)
    assert min([finds_little, settled], key=_Validator.key)["step"] == 1500
    assert min([entry(900, 0.125, 0.7, 0.6), entry(1000, 0.125, 0.7, 0.6)], key=_Validator.key)["step"] == 1000
    assert min([entry(900, 0.0625, 0.5, 0.4), settled], key=_Validator.key)["step"] == 900
    no_point = {"step": 1600, "operating_point": None, "dice": 0.9}
    assert min([no_point, settled], key=_Validator.key)["step"] == 1500

"""Evaluation: metrics equal the direct computation, errors, and synth -> train -> evaluate -> register end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from defectscan.data.dagm import read_dagm
from defectscan.data.synth import SynthSpec, write_synthetic_dagm
from defectscan.errors import ModelError
from defectscan.model.evaluate import evaluate_model, format_reference, format_table, format_verdicts
from defectscan.model.metrics import SegmentationScores
from defectscan.model.preprocess import predict_probabilities
from defectscan.model.unet import UNet
from defectscan.paths import CONFIGS_DIR


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dagm(root, SynthSpec(classes=2, train=4, test=3, size=32, seed=2))
    return root


def test_evaluation_equals_scoring_the_predictions_directly(synth):
    images = read_dagm(synth, "Test")
    model = UNet(filters=(4, 4, 8, 8, 16), seed=0)
    metrics = evaluate_model(model, images, batch_size=4)

    raw = np.stack([images.load(i)[0] for i in range(len(images))])
    targets = np.stack([images.load(i)[1] for i in range(len(images))])[..., None].astype(np.float32)
    direct = SegmentationScores()
    direct.update(predict_probabilities(model, raw), targets)
    expected = direct.result()
    assert metrics["images"] == 6 and metrics["defective_images"] == sum(images.defective)
    assert metrics["thresholds"].keys() == expected["thresholds"].keys()
    for threshold, row in expected["thresholds"].items():
        for key, value in row.items():
            assert metrics["thresholds"][threshold][key] == pytest.approx(value), (threshold, key)
    assert metrics["pixel_auroc"] == pytest.approx(expected["pixel_auroc"])
    assert metrics["classes"] == ["defect"] and metrics["images_per_second"] > 0
    reference = format_reference(metrics)
    assert "pixel AUROC" in reference and "Dice(def)" in reference and len(reference.splitlines()) == 2 + 8
    table = format_table(metrics)
    assert table.startswith(format_verdicts(metrics)) and table.endswith(reference) and "escape" in table


def test_a_model_with_other_classes_is_refused(synth):
    images = read_dagm(synth, "Test")
    with pytest.raises(ModelError, match=r"the model has 3 output classes but the dataset .* has 1 \(defect\)"):
        evaluate_model(UNet(num_classes=3, filters=(4, 4, 8, 8, 16)), images)


def test_per_class_rules_apply_under_the_models_own_class_names(synth):
    """The rule names the model's classes (`register --class scratch --class dent`); evaluate judged with the dataset's
    folder names, so a per-class rule was never applied there while inspect applied it: the two disagreed."""
    from defectscan.model.verdict import VerdictRules

    images = read_dagm(synth, "Test", per_class=True)
    model = UNet(num_classes=2, filters=(4, 4, 8, 8, 16), seed=0)
    model(np.zeros((1, 32, 32, 1), np.float32))
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])  # every probability 0.5
    rules = VerdictRules(0.9, 1, 0.9, per_class={"scratch": {"threshold": 0.1, "fail_score": 0.1}})
    as_inspected = evaluate_model(model, images, rules=rules, class_names=["scratch", "dent"])["verdict_rule"]
    assert as_inspected["tp"] + as_inspected["fp"] == len(images)  # the scratch channel fails every image
    by_folder = evaluate_model(model, images, rules=rules)["verdict_rule"]
    assert by_folder["tp"] + by_folder["fp"] == 0  # what evaluate said before: the rule named no class it knew


def test_synth_train_evaluate_register_end_to_end(cli, tmp_path, sqlite_url):
    data, run = tmp_path / "synth", tmp_path / "run"
    assert cli("data", "synth", str(data), "--classes", "2", "--train", "4", "--test", "2", "--size", "32").exit_code == 0
    recipe = CONFIGS_DIR / "model" / "tinyunet-cpu-test.yaml"
    trained = cli("train", str(recipe), "--data", str(data), "--out", str(run), "--quiet", "--export", str(tmp_path / "served"))
    assert trained.exit_code == 0, trained.output
    assert "trained to step 6 in " in trained.output and "resumed" not in trained.output and f"model: {run / 'model.keras'}" in trained.output
    assert (tmp_path / "served" / "saved_model.pb").is_file()

    evaluated = cli("evaluate", str(run / "model.keras"), "--data", str(data), "--json", str(run / "evaluation.json"))
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "evaluation.json").read_text())
    assert metrics["images"] == 4 and set(metrics["thresholds"]) == {"0.05", "0.125", "0.25", "0.5", "0.75", "0.85", "0.95", "0.99"}
    assert f"{metrics['thresholds']['0.5']['dice']:.4f}" in evaluated.output

    assert cli("--database-url", sqlite_url, "db", "upgrade").exit_code == 0
    registered = cli(
        "--database-url", sqlite_url, "models", "register", str(run / "model.keras"),
        "--name", "cpu-test", "--version", "1", "--metrics", str(run / "evaluation.json"),
    )
    assert registered.exit_code == 0, registered.output
    [listed] = json.loads(cli("--database-url", sqlite_url, "models", "list", "--format", "json").output)
    assert listed["name"] == "cpu-test" and listed["dice"] == round(metrics["verdict_rule"]["dice"], 4)
    by_name = cli("--database-url", sqlite_url, "evaluate", "cpu-test:1", "--data", str(data))
    assert by_name.exit_code == 0 and by_name.output.splitlines()[-1] == evaluated.output.splitlines()[-2]

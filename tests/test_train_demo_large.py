"""The demo model's training run, repeated: synthetic DAGM-like data -> `defectscan train` -> held-out metrics.

About 35-60 minutes on 2 CPU cores; run with --run-large.
"""

from __future__ import annotations

import json

import pytest
from defectscan.paths import CONFIGS_DIR

DEMO_RECIPE = CONFIGS_DIR / "model" / "tinyunet-synth-demo.yaml"


@pytest.mark.large
def test_demo_recipe_reaches_the_targets_on_held_out_synthetic_data(cli, tmp_path):
    data, run = tmp_path / "demo-synth", tmp_path / "demo-run"
    made = cli("data", "synth", str(data), "--classes", "4", "--train", "100", "--test", "50", "--seed", "0")
    assert made.exit_code == 0, made.output
    trained = cli("train", str(DEMO_RECIPE), "--data", str(data), "--out", str(run), "--quiet")
    assert trained.exit_code == 0, trained.output
    evaluated = cli("evaluate", str(run / "model.keras"), "--data", str(data), "--split", "Test", "--json", str(run / "evaluation.json"))
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "evaluation.json").read_text())
    assert metrics["images"] == 200 and metrics["defective_images"] == 100
    half = metrics["thresholds"]["0.5"]
    assert half["dice"] >= 0.9, evaluated.output
    assert half["tpr"] >= 0.95 and half["tnr"] >= 0.95, evaluated.output

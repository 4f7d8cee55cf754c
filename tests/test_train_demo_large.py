"""The demo model's training, repeated: synthetic DAGM-like data -> two `defectscan train` stages -> held-out metrics.

Stage 1 trains on 128x128 crops, stage 2 fine-tunes it on whole images of a larger training split
(see the two recipes); both sets share one Test split.
About 1.5-2 hours on 2 CPU cores; run with --run-large.
"""

from __future__ import annotations

import json

import pytest
from defectscan.paths import CONFIGS_DIR

STAGE_1 = CONFIGS_DIR / "model" / "tinyunet-synth-demo.yaml"
STAGE_2 = CONFIGS_DIR / "model" / "tinyunet-synth-demo-full.yaml"


@pytest.mark.large
def test_demo_recipe_reaches_the_targets_on_held_out_synthetic_data(cli, tmp_path):
    data, more = tmp_path / "demo-synth", tmp_path / "demo-synth-400"
    crops, full = tmp_path / "demo-run", tmp_path / "demo-full"
    for folder, train_count in ((data, "100"), (more, "400")):
        made = cli("data", "synth", str(folder), "--classes", "4", "--train", train_count, "--test", "50", "--seed", "0")
        assert made.exit_code == 0, made.output
    trained = cli("train", str(STAGE_1), "--data", str(data), "--out", str(crops), "--quiet")
    assert trained.exit_code == 0, trained.output
    init = f"model.init_from={crops / 'model.keras'}"
    tuned = cli("train", str(STAGE_2), "--data", str(more), "--out", str(full), "--set", init, "--quiet")
    assert tuned.exit_code == 0, tuned.output
    evaluated = cli("evaluate", str(full / "model.keras"), "--data", str(data), "--split", "Test", "--json", str(full / "evaluation.json"))
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((full / "evaluation.json").read_text())
    assert metrics["images"] == 200 and metrics["defective_images"] == 100
    half = metrics["thresholds"]["0.5"]
    assert half["dice"] >= 0.9, evaluated.output
    assert half["tpr"] >= 0.95 and half["tnr"] >= 0.95, evaluated.output

"""The shipped demo model file, evaluated on its own held-out Test split, keeps the figures its metadata claim."""

from __future__ import annotations

import pytest

from defectscan.data.dagm import read_dagm
from defectscan.data.synth import SynthSpec, write_synthetic_dagm
from defectscan.model.evaluate import evaluate_model
from defectscan.model.export import load_model
from defectscan.model.registry import DEMO_METADATA, DEMO_MODEL, read_metadata


@pytest.fixture(scope="module")
def demo_test_split(tmp_path_factory):
    # The Test split of `defectscan data synth var/demo-synth --classes 4 --train 100 --test 50 --seed 0`:
    # each (seed, class, split) has its own stream, so leaving out Train leaves Test unchanged.
    root = tmp_path_factory.mktemp("demo-synth")
    write_synthetic_dagm(root, SynthSpec(classes=4, train=0, test=50, seed=0))
    return read_dagm(root, split="Test")


def test_the_shipped_model_meets_its_recorded_figures_on_its_test_split(demo_test_split):
    meta = read_metadata(DEMO_METADATA)
    assert "data synth var/demo-synth --classes 4 --train 100 --test 50 --seed 0" in meta.training["data_command"]
    recorded = meta.metrics["verdict_rule"]
    # The demo's own targets: what the README promises of it.
    assert recorded["dice"] >= 0.9 and recorded["tpr"] >= 0.95 and recorded["tnr"] >= 0.95
    metrics = evaluate_model(load_model(DEMO_MODEL), demo_test_split, rules=meta.rules(), batch_size=8)
    measured = metrics["verdict_rule"]
    assert measured["rule"] == recorded["rule"] == meta.rules().as_dict()
    assert (measured["images"], measured["defective_images"]) == (200, 100)
    for key in ("dice", "dice_defective", "tpr", "tnr", "image_auroc"):
        assert measured[key] >= recorded[key] - 1e-3, (key, measured[key], recorded[key])


def test_evaluate_demo_on_a_new_database_with_a_folder_named_demo_in_the_way(cli, migrated_url, tmp_path, monkeypatch):
    """`evaluate demo` found no model on a new database (inspect registers it on first use), and a folder named
    `demo` in the working directory was taken for a model file."""
    write_synthetic_dagm(tmp_path / "d", SynthSpec(classes=1, train=0, test=2, size=64, seed=0))
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    result = cli("--database-url", migrated_url, "evaluate", "demo", "--data", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert "TPR" in result.output

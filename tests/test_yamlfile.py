"""The one YAML reader behind settings, recipes, job specs and model metadata: the same clear errors from each."""

from __future__ import annotations

import pytest
from defectscan.config import load_settings
from defectscan.errors import ConfigError, ModelError
from defectscan.jobs.spec import SpecError, load_spec
from defectscan.model.recipe import load_recipe
from defectscan.model.registry import read_metadata

READERS = [
    (lambda p: load_settings(config_file=p), ConfigError, "settings file", "settings"),
    (load_recipe, ConfigError, "training recipe", "recipe sections"),
    (load_spec, SpecError, "job spec", "job settings"),
    (read_metadata, ModelError, "model metadata file", "model metadata"),
]


@pytest.mark.parametrize(("read", "error", "what", "contents"), READERS)
def test_each_reader_names_the_file_and_the_problem(tmp_path, read, error, what, contents):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(error, match=f"^{missing}: {what} not found$"):
        read(missing)
    with pytest.raises(error, match=f"^{tmp_path}: is a folder; expected a {what}$"):
        read(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(error, match=f"^{broken} line 3: not valid YAML: "):
        read(broken)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(error, match=f"^{listed}: expected a mapping of {contents} at the top level, got list$"):
        read(listed)


def test_json_numbers_stay_numbers_and_broken_json_names_its_line(tmp_path):
    """PyYAML's YAML 1.1 reads JSON's 1e-07 as text: a sidecar rewritten after such a read would store strings."""
    from defectscan.model.registry import record_operating_point

    sidecar = tmp_path / "model.json"
    sidecar.write_text('{"training": {"epsilon": 1e-07, "rate": 2E-5}}')
    assert read_metadata(sidecar).training == {"epsilon": 1e-07, "rate": 2e-05}
    record_operating_point(sidecar, {"threshold": 0.3, "min_defect_area": 1, "fail_score": 0.6})
    assert '"epsilon": 1e-07' in sidecar.read_text()
    sidecar.write_text('{"name": "m",\n "version": }')
    with pytest.raises(ModelError, match=f"^{sidecar} line 2: not valid JSON: Expecting value$"):
        read_metadata(sidecar)


@pytest.mark.parametrize(
    ("read", "error", "text", "key"),
    [
        (lambda p: load_settings(config_file=p), ConfigError, "inspection:\n  batch_size: yes\n", "inspection.batch_size"),
        (load_recipe, ConfigError, "train:\n  steps: true\n", "train.steps"),
        (load_recipe, ConfigError, "optimizer:\n  learning_rate: on\n", "optimizer.learning_rate"),
        (load_spec, SpecError, "name: j\nschedule: '0 2 * * *'\nsource: {glob: a/*.zarr}\nmodel: demo\nretries: {attempts: yes}\n", "retries.attempts"),
        (load_spec, SpecError, "name: j\nschedule: '0 2 * * *'\nsource: {glob: a/*.zarr}\nmodel: demo\ninspection: {threshold: true}\n", "inspection.threshold"),
    ],
    ids=["settings", "recipe-int", "recipe-float", "job-spec", "job-spec-inspection"],
)
def test_a_yes_or_no_is_not_taken_as_a_number(tmp_path, read, error, text, key):
    """Pydantic reads true as 1: `steps: true` trained 1 step, `learning_rate: on` a rate of 1.0."""
    path = tmp_path / "j.yaml"
    path.write_text(text)
    with pytest.raises(error, match=f"{key}.*expected a number, not a yes/no value"):
        read(path)


def test_a_yes_or_no_given_with_set_is_refused_too():
    with pytest.raises(ConfigError, match=r"^defaults: invalid training recipe: --set train.steps=true: train.steps: Value error, expected a number, "
                                          r"not a yes/no value \(got True\)$"):
        load_recipe(None, ["train.steps=true"])
    assert load_recipe(None, ["train.steps=12"]).train.steps == 12
    # The override is named, not only the file: the file was blamed for a typo in --set.
    with pytest.raises(ConfigError, match=r"invalid training recipe: --set train.stepz=9: train.stepz: Extra inputs are not permitted"):
        load_recipe(None, ["train.stepz=9"])

"""Export (.keras, SavedModel serving signature) and the model registry on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from defectscan.errors import ModelError
from defectscan.model.export import export_saved_model, file_sha256, load_model, load_saved_model
from defectscan.model.preprocess import predict_probabilities
from defectscan.model.registry import DEMO_METADATA, DEMO_MODEL, ModelMetadata, read_metadata, register_demo
from defectscan.model.unet import UNet


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    UNet(num_classes=2, filters=(4, 4, 8, 8, 16), seed=1).save(path)
    return path


def test_saved_model_serves_uint8_images_of_several_sizes(model_file, tmp_path):
    model = load_model(model_file)
    served = load_saved_model(export_saved_model(model_file, tmp_path / "served"))
    rng = np.random.default_rng(0)
    for shape in [(2, 32, 48), (1, 64, 64), (1, 40, 50)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        probabilities = served.serve(images[..., None]).numpy()
        assert probabilities.shape == (*shape, 2)
        np.testing.assert_allclose(probabilities, predict_probabilities(model, images), atol=1e-5)
    signature = served.signatures["serving_default"]
    assert signature.structured_input_signature[1]["images"].dtype.name == "uint8"
    # 16-bit cameras: scaled as inspection scales them (serve() wrapped uint16 values around, silently)
    from defectscan.data.pixels import as_uint8

    wide = rng.integers(0, 65536, (1, 32, 48), dtype=np.uint16)
    twelve = rng.integers(0, 4096, (1, 32, 48), dtype=np.uint16)
    for pixels, depth in ((wide, 16), (twelve, 12)):
        served16 = served.serve_uint16(pixels[..., None], np.int32(depth)).numpy()
        np.testing.assert_allclose(served16, predict_probabilities(model, as_uint8(pixels, depth)), atol=1e-5)


def test_loading_checks_the_checksum_and_names_the_file(model_file, tmp_path):
    expected = file_sha256(model_file)
    assert load_model(model_file, expected_sha256=expected).output_shape[-1] == 2
    changed = tmp_path / "changed.keras"
    changed.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(ModelError) as error:
        load_model(changed, expected_sha256=expected)
    message = str(error.value)
    assert str(changed) in message and expected in message and file_sha256(changed) in message
    with pytest.raises(ModelError, match="model file does not exist"):
        load_model(tmp_path / "none.keras")
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=f"{garbage}: cannot load the model"):
        load_model(garbage)
    with pytest.raises(ModelError, match="expected a .keras model file"):
        load_model(tmp_path / "model.h5")


def _db(cli, url, *args):
    return cli("--database-url", url, *args)


def test_register_list_show_on_both_databases(cli, migrated_url, model_file, tmp_path):
    metrics = tmp_path / "evaluation.json"
    metrics.write_text(json.dumps({"thresholds": {"0.5": {"dice": 0.9321}}}))
    result = _db(cli, migrated_url, "models", "register", str(model_file), "--name", "tiny", "--version", "1",
                 "--class", "scratch", "--class", "spot", "--threshold", "0.4", "--metrics", str(metrics))
    assert result.exit_code == 0, result.output
    assert "registered tiny:1 (UNet(4,4,8,8,16), classes scratch, spot)" in result.output and "; stage staging\n" in result.output
    assert _db(cli, migrated_url, "models", "register", str(model_file), "--name", "tiny", "--version", "2", "--class", "a", "--class", "b").exit_code == 0

    listed = _db(cli, migrated_url, "models", "list", "--format", "csv").output.splitlines()
    assert len(listed) == 3 and listed[1].split(",")[:3] == ["tiny", "1", "staging"] and "0.9321" in listed[1]
    [second] = json.loads(_db(cli, migrated_url, "models", "list", "--name", "tiny", "--format", "json").output)[1:]
    assert (second["version"], second["classes"], second["threshold"]) == ("2", "a,b", 0.5)
    shown = json.loads(_db(cli, migrated_url, "models", "show", "tiny:1").output)
    assert shown["classes"] == ["scratch", "spot"] and shown["threshold"] == 0.4
    assert shown["sha256"] == file_sha256(model_file) and shown["uri"] == str(model_file)
    assert shown["input_spec"]["multiple_of"] == 16 and shown["input_spec"]["dtype"] == "uint8"
    assert json.loads(_db(cli, migrated_url, "models", "show", "tiny").output)["version"] == "2"

    duplicate = _db(cli, migrated_url, "models", "register", str(model_file), "--name", "tiny", "--version", "1")
    assert duplicate.exit_code == 1 and "Error: model tiny:1 is already registered" in duplicate.output
    wrong_classes = _db(cli, migrated_url, "models", "register", str(model_file), "--name", "t", "--version", "1", "--class", "only")
    assert wrong_classes.exit_code == 1 and "has 2 output classes but 1 class names were given (only)" in wrong_classes.output
    unknown = _db(cli, migrated_url, "models", "show", "nope:3")
    assert unknown.exit_code == 1 and "no model nope:3 in the registry; known: tiny:1 (staging), tiny:2 (staging)" in unknown.output


def test_a_changed_file_is_refused_by_name_with_both_hashes(cli, migrated_url, model_file, tmp_path):
    from defectscan.db.session import make_engine, session_factory
    from defectscan.model.registry import load_registered, register_model

    copy = tmp_path / "copy.keras"
    copy.write_bytes(model_file.read_bytes())
    engine = make_engine(migrated_url)
    try:
        with session_factory(engine)() as session:
            row = register_model(session, copy, name="copy", version="1", classes=["a", "b"])
            recorded = row.sha256
            assert load_registered(session, "copy:1")[1].output_shape[-1] == 2
            copy.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
            with pytest.raises(ModelError) as error:
                load_registered(session, "copy")
    finally:
        engine.dispose()
    assert str(copy) in str(error.value) and recorded in str(error.value) and file_sha256(copy) in str(error.value)
    verify = _db(cli, migrated_url, "models", "show", "copy:1", "--verify")
    assert verify.exit_code == 1 and f"Error: {copy}: model file does not match its registered checksum" in verify.output


def test_metadata_files_and_their_errors(tmp_path):
    good = tmp_path / "meta.yaml"
    good.write_text("name: m\nversion: '3'\nclasses: [defect]\nthreshold: 0.6\n")
    assert read_metadata(good) == ModelMetadata(name="m", version="3", classes=["defect"], threshold=0.6)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "m", "colour": "red"}))
    with pytest.raises(ModelError, match=r"bad.json: unknown metadata key\(s\) colour"):
        read_metadata(bad)


def test_the_shipped_demo_model_registers_and_loads(cli, sqlite_url):
    meta = read_metadata(DEMO_METADATA)
    assert DEMO_MODEL.stat().st_size < 10 * 2**20
    assert meta.classes == ["defect"] and meta.threshold == meta.operating_point["threshold"]
    assert meta.operating_point["figures"]["images"] == 80, "chosen on the validation part of its training images"
    assert meta.metrics["images"] == 200 and len(meta.metrics["thresholds"]) == 8
    assert meta.training["sha256"] == file_sha256(DEMO_MODEL)
    assert _db(cli, sqlite_url, "db", "upgrade").exit_code == 0
    result = _db(cli, sqlite_url, "models", "register", "--demo")
    assert result.exit_code == 0, result.output
    again = _db(cli, sqlite_url, "models", "register", "--demo")
    assert again.exit_code == 0 and again.output == result.output, "registering the demo twice is a no-op"
    assert len(_db(cli, sqlite_url, "models", "list", "--format", "csv").output.splitlines()) == 2
    assert result.output.rstrip().endswith("; stage production")
    # archived (another version promoted, then this one archived): it says so and how to use it again, not a bare success
    assert _db(cli, sqlite_url, "models", "archive", f"{meta.name}:{meta.version}", "--reason", "test").exit_code == 0
    archived = _db(cli, sqlite_url, "models", "register", "--demo")
    assert archived.exit_code == 0 and f"; stage archived (`defectscan models promote {meta.name}:{meta.version} --reason ...`" in archived.output
    shown = json.loads(_db(cli, sqlite_url, "models", "show", meta.name, "--verify").output.split("\n" + str(DEMO_MODEL))[0])
    assert shown["version"] == meta.version and shown["training"]["command"].startswith("defectscan train")
    assert shown["operating_point"] == meta.operating_point
    model = load_model(DEMO_MODEL, expected_sha256=shown["sha256"])
    assert model.count_params() == 1_850_305


def test_a_changed_demo_file_is_not_reused(tmp_path, sqlite_url, monkeypatch):
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, session_factory
    from defectscan.model import registry

    copy = tmp_path / "demo.keras"
    copy.write_bytes(DEMO_MODEL.read_bytes())
    monkeypatch.setattr(registry, "DEMO_MODEL", copy)
    engine = make_engine(sqlite_url)
    upgrade(engine)
    try:
        with session_factory(engine)() as session:
            first = register_demo(session)
            assert register_demo(session).id == first.id
            copy.write_bytes(DEMO_MODEL.read_bytes() + b"x")
            with pytest.raises(ModelError, match=f"{copy}: the registered demo model .* has sha256 {first.sha256} but the shipped file has"):
                register_demo(session)
    finally:
        engine.dispose()


def test_a_view_average_registers_as_one_and_serves_the_same_probabilities(cli, sqlite_url, model_file, tmp_path):
    from defectscan.model.views import ViewAverage

    path = tmp_path / "views.keras"
    ViewAverage(load_model(model_file), 2).save(path)
    assert _db(cli, sqlite_url, "db", "upgrade").exit_code == 0
    result = _db(cli, sqlite_url, "models", "register", str(path), "--name", "mirrored", "--version", "1", "--class", "a", "--class", "b")
    assert result.exit_code == 0, result.output
    assert "registered mirrored:1 (UNet(4,4,8,8,16) x 2 views, classes a, b)" in result.output
    images = np.random.default_rng(2).integers(0, 256, (1, 32, 48), dtype=np.uint8)
    served = load_saved_model(export_saved_model(path, tmp_path / "served"))
    plain = predict_probabilities(load_model(model_file), images)
    mirrored = predict_probabilities(load_model(model_file), images[:, :, ::-1])[:, :, ::-1]
    np.testing.assert_allclose(served.serve(images[..., None]).numpy(), (plain + mirrored) / 2, atol=1e-5)


def test_metrics_that_are_not_evaluation_figures_are_refused_naming_the_file(cli, migrated_url, model_file, tmp_path):
    assert _db(cli, migrated_url, "db", "upgrade").exit_code == 0
    cases = {"list.json": ("[1, 2]", "expected a mapping of evaluation figures at the top level, got list"),
             "broken.json": ("{", "line 1: not valid JSON"),
             "rule.json": ('{"verdict_rule": [1]}', "metrics 'verdict_rule' must be a mapping of figures, got list"),
             "table.json": ('{"thresholds": {"0.5": 3}}', "metrics 'thresholds' must map each threshold to a mapping of figures"),
             # stored, it broke `models list` for good ("TypeError: type str doesn't define __round__ method")
             "dice.json": ('{"verdict_rule": {"dice": "x"}}', "metrics 'verdict_rule': dice must be a number (or null), got 'x'"),
             "row.json": ('{"thresholds": {"0.5": {"dice": "high"}}}', "metrics 'thresholds' 0.5: dice must be a number (or null), got 'high'")}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        result = _db(cli, migrated_url, "models", "register", str(model_file), "--name", "m", "--version", name, "--metrics", str(tmp_path / name))
        assert result.exit_code != 0 and f"{tmp_path / name}" in result.output and expected in result.output, result.output
    listed = _db(cli, migrated_url, "models", "list")
    assert listed.exit_code == 0 and listed.output.startswith("no models registered"), listed.output


def test_a_threshold_given_at_registration_drops_the_figures_chosen_at_another(cli, sqlite_url, tmp_path):
    assert _db(cli, sqlite_url, "db", "upgrade").exit_code == 0
    # its recorded bfloat16 check was made under its own rule: under another, a new check (or float32) is needed
    refused = _db(cli, sqlite_url, "models", "register", str(DEMO_MODEL), "--name", "d", "--version", "1", "--threshold", "0.9")
    assert refused.exit_code == 1 and "its bfloat16 check was made under its recorded rule (threshold" in refused.output
    assert "give --check-data DIR to check bfloat16 under this rule, or --precision float32" in refused.output
    result = _db(cli, sqlite_url, "models", "register", str(DEMO_MODEL), "--name", "d", "--version", "1", "--threshold", "0.9",
                 "--precision", "float32")
    assert result.exit_code == 0, result.output
    recorded = read_metadata(DEMO_METADATA).operating_point
    line = next(x for x in result.output.splitlines() if x.startswith("operating point:"))
    assert line == (f"operating point: threshold 0.9, min_defect_area {recorded['min_defect_area']}, fail_score {recorded['fail_score']:g} "
                    f"(threshold 0.9 given at registration over the recorded {recorded['threshold']:g})")
    shown = json.loads(_db(cli, sqlite_url, "models", "show", "d:1").output)
    assert "figures" not in shown["operating_point"] and shown["threshold"] == 0.9


def test_register_demo_takes_no_other_options_and_set_precision_needs_the_file(cli, sqlite_url, tmp_path):
    assert _db(cli, sqlite_url, "db", "upgrade").exit_code == 0
    result = _db(cli, sqlite_url, "models", "register", "--demo", "--name", "z", "--stage", "archived")
    assert result.exit_code != 0 and "--demo registers the shipped demo model as it ships; it takes no --name, --stage" in result.output
    assert _db(cli, sqlite_url, "models", "list").output.startswith("no models registered")
    typo = tmp_path / "typo-model.keras"
    for precision in ("float32", "bfloat16"):
        result = _db(cli, sqlite_url, "models", "set-precision", str(typo), precision)
        assert result.exit_code != 0 and f"{typo}: no such model file" in result.output, result.output
    assert not typo.with_suffix(".json").exists()


def test_operating_points_in_metadata_are_checked_by_name_and_registration_reads_them_as_evaluate_does(tmp_path, sqlite_url):
    """A point missing a field gave evaluate 'KeyError: min_defect_area'; a misspelt class's rule was stored and never
    applied; --threshold left a per-class threshold winning; an edited top-level threshold was inspected but not evaluated."""
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, session_factory
    from defectscan.model.registry import register_model, sidecar_metadata
    from defectscan.model.verdict import VerdictRules

    from pipeline_helpers import save_threshold_model

    sidecar = tmp_path / "bad.json"
    for point, expected in [
        ({"threshold": 0.4}, "operating_point: missing field\\(s\\) min_defect_area, fail_score"),
        ({"threshold": 0.4, "min_defect_area": 16.5, "fail_score": 0.5}, "operating_point: min_defect_area 16.5 is not a whole number"),
        ({"threshold": 0.4, "min_defect_area": 4, "fail_score": 0.5, "per_class": {"defect": {"threshold": "0.3"}}},
         "operating_point: verdict rule for class defect: threshold '0.3' is not a number"),
        ({"threshold": 0.4, "min_defect_area": 4, "fail_score": 0.5, "per_class": {"Defekt": {"threshold": 0.9}}},
         "operating_point: per_class names class\\(es\\) Defekt the model does not have; its classes: defect"),
        # each was stored, then broke registration or `models show` with an internal error
        ({"threshold": 0.4, "min_defect_area": 4, "fail_score": 0.5, "per_class": ["defect"]},
         "operating_point: per_class must map class names to rules"),
        ({"threshold": 0.4, "min_defect_area": 4, "fail_score": 0.5, "figures": {"tpr": 1.0}},
         "operating_point: figures: images must be a count of images, got None"),
        ({"threshold": 0.4, "min_defect_area": 4, "fail_score": 0.5, "figures": {"images": 4, "defective_images": 2}},
         "operating_point: figures need target_false_call_rate \\(a number\\) beside them, got None"),
    ]:
        sidecar.write_text(json.dumps({"classes": ["defect"], "operating_point": point}))
        with pytest.raises(ModelError, match=f"^{sidecar}: {expected}"):
            read_metadata(sidecar)

    for check, expected in (({"images": 0, "flips": 0, "agreement": 1.0, "dice": 0.9, "dice_float32": 0.9}, "images must be a count of at least 1, got 0"),
                            ({"images": "8", "flips": 0}, "images must be a count of at least 1, got '8'")):
        sidecar.write_text(json.dumps({"classes": ["defect"], "precision_check": check}))  # registered, then a ZeroDivisionError
        with pytest.raises(ModelError, match=f"^{sidecar}: precision_check: {expected}"):
            read_metadata(sidecar)

    model = save_threshold_model(tmp_path / "m.keras")
    point = {"threshold": 0.5, "min_defect_area": 4, "fail_score": 0.6, "per_class": {"defect": {"threshold": 0.7, "fail_score": 0.8}}}
    (tmp_path / "m.json").write_text(json.dumps({"classes": ["defect"], "threshold": 0.3, "operating_point": point}))
    engine = make_engine(sqlite_url)
    upgrade(engine)
    with session_factory(engine)() as session:
        meta = sidecar_metadata(model)
        plain = register_model(session, model, name="m", version="1", metadata=meta)
        assert VerdictRules.from_dict(plain.operating_point) == sidecar_metadata(model).rules()  # 0.5, not the edited 0.3
        over = register_model(session, model, name="m", version="2", threshold=0.4, metadata=meta)
        assert VerdictRules.from_dict(over.operating_point).for_class("defect") == VerdictRules(0.4, 4, 0.8)
    engine.dispose()

"""Precision per model version: the parity check admits or refuses, its figures are stored, workers run
the recorded precision where the hardware is fast at it and say once when it is not."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sqlalchemy import select

from defectscan.data.synth import SynthSpec, write_synthetic_dagm
from defectscan.db.schema import Model
from defectscan.errors import DataError, ModelError
from defectscan.model import precision as precisions
from defectscan.model.export import file_sha256
from defectscan.model.precision import MAX_DICE_DELTA, MIN_AGREEMENT, PrecisionRefused, check_images, check_parity, load_in_precision, runnable
from defectscan.model.registry import DEMO_METADATA, DEMO_MODEL, read_metadata, register_model, set_precision, sidecar_metadata
from defectscan.model.verdict import VerdictRules
from defectscan.pipeline import worker
from defectscan.pipeline.worker import ModelRef, probabilities

from pipeline_helpers import SMALL_FILTERS, save_threshold_model

# An output bias whose sigmoid sits just under threshold 0.9 in float32 (stored score 229 of 255, cutoff 230) and
# just over it once bfloat16 rounds the bias (2.196 -> 2.203125: 230): every image flips from pass to fail.
AT_THE_EDGE = VerdictRules(threshold=0.9, min_defect_area=1, fail_score=0.9)


@pytest.fixture(scope="module")
def check_data(tmp_path_factory):
    """A DAGM folder of small synthetic images (its Test split is what --check-data uses)."""
    root = tmp_path_factory.mktemp("check-data")
    write_synthetic_dagm(root, SynthSpec(classes=2, train=4, test=4, size=64, seed=3))
    return root


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory):
    """A small UNet whose every probability sits at the verdict threshold (zero kernels, one output bias) with its rule in a sidecar."""
    from defectscan.model.unet import build_model

    model = build_model(filters=SMALL_FILTERS, seed=0)
    model(np.zeros((1, 64, 64, 1), np.float32))
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    model.get_layer("output_logits").bias.assign(np.full((1,), 2.196, np.float32))
    path = tmp_path_factory.mktemp("edge") / "edge.keras"
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps({"classes": ["defect"], "operating_point": AT_THE_EDGE.as_dict()}))
    return path


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    """The shipped (trained) demo model under another path, with its operating point but none of its recorded checks."""
    path = tmp_path_factory.mktemp("demo") / "trained.keras"
    path.write_bytes(DEMO_MODEL.read_bytes())
    meta = json.loads(DEMO_METADATA.read_text())
    path.with_suffix(".json").write_text(json.dumps({"classes": ["defect"], "operating_point": meta["operating_point"]}))
    return path


def test_a_trained_model_passes_in_bfloat16_with_its_figures(demo_copy, check_data):
    images = check_images(check_data, None)
    check = check_parity(demo_copy, "bfloat16", images, read_metadata(demo_copy.with_suffix(".json")).rules(), batch_size=4)
    assert check.passed and check.images == len(images) == 8 and check.flips == 0 and check.agreement == 1.0
    assert abs(check.dice_delta) <= MAX_DICE_DELTA and 0 < check.dice_float32 <= 1
    assert check.sha256 == file_sha256(demo_copy) and check.check_data == f"{check_data} (Test)"
    stored = check.as_dict()
    assert stored["passed"] and stored["dice_delta"] == check.dice - check.dice_float32 and stored["checked_at"].endswith("Z")


def test_a_model_at_its_threshold_is_refused_with_the_figures_and_the_limits(edge_model, check_data):
    check = check_parity(edge_model, "bfloat16", check_images(check_data, None), AT_THE_EDGE)
    assert not check.passed and check.flips == check.images == 8 and check.agreement == 0.0
    with pytest.raises(PrecisionRefused) as refused:
        precisions.require_passed(check)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("refused: bfloat16 against float32 on 8 images of")
    assert "verdicts agree on 0.00 % (8 flipped; at least 99.5 % needed)" in message and "at most 0.005 allowed" in message
    assert message.endswith("(caution: one flip among 8 images is 12.50 %: at least 200 images are needed to measure 99.5 %)")
    assert MIN_AGREEMENT == 0.995


def test_the_check_data_must_hold_both_kinds_and_a_review_export_or_per_class_folders_are_read_as_such(edge_model, check_data, tmp_path):
    """A check on one good image passed (it says nothing about escapes); a review export (Train only) was refused for
    lack of a Test split; a model of several classes could never be checked on a DAGM folder (read as one class)."""
    good = tmp_path / "good-only"
    write_synthetic_dagm(good, SynthSpec(classes=1, train=0, test=2, size=64, defect_fraction=0.0, seed=3))
    with pytest.raises(DataError, match=r"needs defective and defect-free images; these 2 are all defect-free"):
        check_parity(edge_model, "bfloat16", check_images(good, None), AT_THE_EDGE)
    export = tmp_path / "export"
    write_synthetic_dagm(export, SynthSpec(classes=1, train=4, test=0, size=64, seed=3))
    assert check_images(export, None).name.endswith("(Train)")
    assert check_images(check_data, None, n_classes=2).classes == ["Class1", "Class2"]


def test_a_file_whose_layers_fix_their_dtype_cannot_run_in_bfloat16(tmp_path):
    path = save_threshold_model(tmp_path / "fixed.keras")
    with pytest.raises(ModelError, match=r"fixed.keras: the model's layers compute in float32 whatever the policy .* cannot run in bfloat16"):
        load_in_precision(path, "bfloat16")
    with pytest.raises(ModelError, match="precision 'int8' is not one of float32, bfloat16, float16"):
        load_in_precision(path, "int8")


def test_the_recorded_validation_split_is_checked_on_else_the_option_is_named(check_data):
    training = {"recipe": {"data": {"path": str(check_data)}, "validation": {"fraction": 0.5}, "train": {"seed": 0}}}
    images = check_images(None, {"stages": [{"recipe": {}}, training]})
    assert "validation part, 0.5 held out, seed 0" in images.name and 0 < len(images) < 8
    with pytest.raises(DataError, match=r"no labelled images to check the precision on: .* give --check-data DIR"):
        check_images(None, {"recipe": {"data": {"path": "/nowhere/data"}}})


def test_register_stores_the_check_and_a_refused_precision_stores_nothing(session, demo_copy, edge_model, check_data):
    row = register_model(session, demo_copy, name="trained", version="1", precision="bfloat16", check_data=check_data)
    assert row.precision == "bfloat16" and row.precision_check["passed"] and row.precision_check["images"] == 8
    with pytest.raises(PrecisionRefused, match="8 flipped"):
        register_model(session, edge_model, name="edge", version="1", metadata=sidecar_metadata(edge_model), precision="bfloat16",
                       check_data=check_data)
    session.rollback()
    assert session.scalar(select(Model).where(Model.name == "edge")) is None

    edge = register_model(session, edge_model, name="edge", version="1", metadata=sidecar_metadata(edge_model))
    assert (edge.precision, edge.precision_check) == ("float32", None)
    with pytest.raises(PrecisionRefused):
        set_precision(session, "edge:1", "bfloat16", check_data)
    session.rollback()
    assert (session.get(Model, edge.id).precision, session.get(Model, edge.id).precision_check) == ("float32", None)
    back, check = set_precision(session, "trained:1", "float32")
    assert check is None and (back.precision, back.precision_check) == ("float32", None)


def test_the_demo_ships_checked_for_bfloat16_and_registers_so(session):
    from defectscan.model.registry import register_demo

    meta = read_metadata(DEMO_METADATA)
    assert meta.precision == "bfloat16" and meta.precision_check["sha256"] == file_sha256(DEMO_MODEL)
    assert meta.precision_check["passed"] and meta.precision_check["images"] >= 200
    row = register_demo(session)
    assert row.precision == "bfloat16" and row.precision_check == meta.precision_check
    # A database whose demo row predates the check: set-precision takes the sidecar's check for this very file.
    set_precision(session, f"{row.name}:{row.version}", "float32")
    again, check = set_precision(session, f"{row.name}:{row.version}", "bfloat16")
    assert again.precision == "bfloat16" and check.as_dict() == meta.precision_check


def test_cli_set_precision_register_list_show_and_their_errors(cli, migrated_url, demo_copy, edge_model, check_data, tmp_path):
    def db(*args):
        return cli("--database-url", migrated_url, "models", *args)

    sidecar = demo_copy.parent / "sidecar-run.keras"
    sidecar.write_bytes(demo_copy.read_bytes())
    sidecar.with_suffix(".json").write_text(demo_copy.with_suffix(".json").read_text())
    recorded = db("set-precision", str(sidecar), "bfloat16", "--check-data", str(check_data))
    assert recorded.exit_code == 0, recorded.output
    assert "verdicts agree on 100.00 % (0 flipped" in recorded.output and f"recorded in {sidecar.with_suffix('.json')}" in recorded.output
    assert json.loads(sidecar.with_suffix(".json").read_text())["precision"] == "bfloat16"

    # The sidecar's check is for this very file: registering takes it without checking again (no --check-data).
    registered = db("register", str(sidecar), "--name", "line3", "--version", "4")
    assert registered.exit_code == 0, registered.output
    assert "precision: bfloat16, checked " in registered.output and "Dice " in registered.output
    listed = json.loads(db("list", "--format", "json").output)
    assert [(m["version"], m["precision"]) for m in listed] == [("4", "bfloat16")]
    shown = json.loads(db("show", "line3:4").output)
    assert shown["precision"] == "bfloat16" and shown["precision_check"]["agreement"] == 1.0

    refused = db("register", str(edge_model), "--name", "edge", "--version", "1", "--precision", "bfloat16", "--check-data", str(check_data))
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines()[-1].startswith("Error: refused: bfloat16 against float32 on 8 images")
    assert "at least 99.5 % needed" in refused.output and json.loads(db("list", "--format", "json").output)[-1]["name"] == "line3"

    assert db("register", str(edge_model), "--name", "edge", "--version", "1").exit_code == 0
    no_data = db("set-precision", "edge:1", "bfloat16")
    assert no_data.exit_code == 1 and "no labelled images to check the precision on" in no_data.output and "--check-data DIR" in no_data.output
    edge_refused = db("set-precision", "edge:1", "bfloat16", "--check-data", str(check_data))
    assert edge_refused.exit_code == 1 and "8 flipped" in edge_refused.output
    assert json.loads(db("show", "edge:1").output)["precision"] == "float32"
    bad_choice = db("set-precision", "edge:1", "int8")
    assert bad_choice.exit_code == 2 and "'int8' is not one of 'float32', 'bfloat16', 'float16'" in bad_choice.output
    missing = db("set-precision", "edge:1", "bfloat16", "--check-data", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "nowhere' does not exist" in missing.output
    unknown = db("set-precision", "edge:9", "float32")
    assert unknown.exit_code == 1 and "no model edge:9 in the registry" in unknown.output
    fixed = save_threshold_model(tmp_path / "fixed.keras")
    not_runnable = db("set-precision", str(fixed), "bfloat16", "--check-data", str(check_data))
    assert not_runnable.exit_code == 1 and "cannot run in bfloat16" in not_runnable.output


# === workers ===


def test_what_the_hardware_runs():
    assert runnable("bfloat16", gpu=False, flags={"avx512_bf16"}) == ("bfloat16", None)
    assert runnable("bfloat16", gpu=False, flags={"amx_bf16", "avx2"}) == ("bfloat16", None)
    assert runnable("bfloat16", gpu=False, flags={"avx2"})[0] == "float32"
    assert runnable("float16", gpu=False, flags={"avx512_bf16"}) == ("float32", "CPUs have no fast float16 path")
    assert runnable("float16", gpu=True) == ("float16", None) and runnable("bfloat16", gpu=True) == ("bfloat16", None)
    assert runnable("float32", gpu=False, flags=set()) == ("float32", None)


@pytest.fixture
def small_unet(tmp_path):
    from pipeline_helpers import save_small_unet

    return save_small_unet(tmp_path / "small.keras", seed=4)


def _refs(path, **changes):
    base = ModelRef(uri=str(path), sha256=file_sha256(path), classes=("defect",), batch_size=4)
    return base, ModelRef(**{**base.__dict__, **changes})


def test_a_worker_runs_the_recorded_bfloat16_in_its_own_cache_entry(small_unet, monkeypatch):
    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(worker, "_MODELS", {})
    x = np.random.default_rng(0).uniform(-1, 1, (6, 64, 64, 1)).astype(np.float32)
    f32, bf16 = _refs(small_unet, precision="bfloat16")
    in_f32, in_bf16 = probabilities(f32, x), probabilities(bf16, x)
    direct = load_in_precision(small_unet, "bfloat16")(x[:4], training=False)
    assert np.array_equal(in_bf16[:4], np.asarray(direct).transpose(0, 3, 1, 2)), "the worker ran the bfloat16 model"
    difference = np.abs(in_bf16 - in_f32)
    assert 0 < difference.max() < 0.05, "bfloat16 moves the probabilities a little"
    assert set(worker._MODELS) == {(f32.sha256, "tensorflow", "float32"), (f32.sha256, "tensorflow", "bfloat16")}
    cached = worker._MODELS[(f32.sha256, "tensorflow", "bfloat16")]
    probabilities(bf16, x)
    assert worker._MODELS[(f32.sha256, "tensorflow", "bfloat16")] is cached, "loaded once"


def test_a_cpu_without_bfloat16_runs_float32_and_says_so_once(small_unet, monkeypatch, caplog):
    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(worker, "_MODELS", {})
    monkeypatch.setattr(worker, "_FELL_BACK", set())
    x = np.random.default_rng(1).uniform(-1, 1, (9, 64, 64, 1)).astype(np.float32)
    f32, bf16 = _refs(small_unet, precision="bfloat16")
    other = ModelRef(**{**bf16.__dict__, "batch_size": 2})
    with caplog.at_level(logging.WARNING, logger="defectscan.pipeline.worker"):
        fell_back = probabilities(bf16, x)
        worker._MODELS.clear()  # a second model (or a reload): still no second line
        probabilities(other, x)
    lines = [r.getMessage() for r in caplog.records if r.name == "defectscan.pipeline.worker"]
    assert len(lines) == 1 and "runs models recorded in bfloat16 in float32: this CPU has neither avx512_bf16 nor amx_bf16" in lines[0]
    assert np.array_equal(fell_back, probabilities(f32, x))


def test_inspection_precision_float32_overrides_the_recorded_one(session, demo_copy, check_data):
    from defectscan.pipeline.run import model_ref

    row = register_model(session, demo_copy, name="trained", version="2", precision="bfloat16", check_data=check_data)
    assert model_ref(row, 8).precision == "bfloat16"
    assert model_ref(row, 8, precision="float32").precision == "float32"


def test_inspect_runs_a_bfloat16_version_in_bfloat16_and_records_it(cli, tmp_path, small_unet, monkeypatch):
    """The precision travels from the models row to the workers; the run's row says which was asked for."""
    import zarr
    from sqlalchemy import update

    from defectscan.db.migrate import upgrade
    from defectscan.db.schema import Inspection, JobRun
    from defectscan.db.session import make_engine, session_factory
    from defectscan.model.precision import cpu_flags
    from defectscan.pipeline.worker import score_images

    from pipeline_helpers import add_model, register, square_images, write_stack

    if runnable("bfloat16", gpu=False, flags=cpu_flags())[0] != "bfloat16":
        pytest.skip("this CPU has no bfloat16 units: its workers run float32 (test_a_cpu_without_bfloat16_runs_float32_and_says_so_once)")
    url = f"sqlite:///{tmp_path / 'bf16.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    factory = session_factory(engine)
    images = square_images(8, size=64, defects={2: (10, 10, 8)}, seed=6)
    store = register(factory, write_stack(tmp_path / "B1.zarr", images))
    add_model(factory, small_unet, name="small")
    with factory.begin() as session:
        session.execute(update(Model).values(precision="bfloat16"))
    env = {"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4",
           "DEFECTSCAN_INSPECTION__OUTPUT_DIR": str(tmp_path / "masks")}
    result = cli("--database-url", url, "inspect", "--model", "small", "--imageset", store.uri, "--workers", "1", "--no-progress", env=env)
    assert result.exit_code == 0, result.output
    with factory() as session:
        run = session.scalars(select(JobRun)).one()
        inspection = session.scalars(select(Inspection).order_by(Inspection.id)).first()
    engine.dispose()
    assert run.timings["precision"] == "bfloat16" and run.timings["precision_run"] == {"bfloat16": 8}
    assert "ran as" not in result.output
    stored = zarr.open_array(inspection.mask_uri, path=inspection.mask_array, mode="r")[:]
    f32, bf16 = _refs(small_unet, precision="bfloat16")
    assert np.array_equal(stored, score_images(bf16, images)) and not np.array_equal(stored, score_images(f32, images))


def test_a_shard_says_which_precision_its_worker_ran_and_the_run_records_a_fallback(small_unet, tmp_path, monkeypatch):
    """A bfloat16 version scored on a worker without bfloat16 units is recorded as run in float32, not as asked."""
    import zarr

    from defectscan.cli.inspect import describe_summary
    from defectscan.pipeline.plan import StackShard
    from defectscan.pipeline.record import Counts
    from defectscan.pipeline.run import RunSummary
    from defectscan.pipeline.worker import ArrayRef, inspect_stack_shard, judge_strip

    from pipeline_helpers import square_images, write_stack

    images = square_images(6, size=64, seed=2)
    source = ArrayRef(str(write_stack(tmp_path / "S.zarr", images)), "images")
    zarr.create_array(tmp_path / "out.zarr", shape=(6, 1, 64, 64), chunks=(1, 1, 64, 64), dtype="uint8", fill_value=0)
    output = ArrayRef(str(tmp_path / "out.zarr"), "")
    _, bf16 = _refs(small_unet, precision="bfloat16")
    shard = StackShard(image_set_id=1, start=0, stop=6, todo=tuple(range(6)))
    monkeypatch.setattr(worker, "_MODELS", {})
    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"amx_bf16"})
    assert inspect_stack_shard(shard, source, output, bf16, AT_THE_EDGE).precisions == ("bfloat16",)
    monkeypatch.setattr(worker, "_MODELS", {})
    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"avx2"})
    fell_back = inspect_stack_shard(shard, source, output, bf16, AT_THE_EDGE)
    assert fell_back.precisions == ("float32",) and len(fell_back.results) == 6

    # a tiled image whose tiles ran on workers of both kinds
    tiles = [{"read_s": 0.1, "predict_s": 1.0, "write_s": 0.1, "precision": p} for p in ("float32", "bfloat16", "float32")]
    zarr.create_array(tmp_path / "strip.zarr", shape=(1, 64, 64), chunks=(1, 64, 64), dtype="uint8", fill_value=0)
    strip = judge_strip(1, ArrayRef(str(tmp_path / "strip.zarr"), ""), bf16, AT_THE_EDGE, *tiles)
    assert strip.precisions == ("bfloat16", "float32") and strip.timings["predict_s"] == 3.0

    summary = RunSummary(job_run_id=7, status="succeeded", n_images=6, counts=Counts(inspected=6), precision="bfloat16",
                         precisions_run={"float32": 6})
    assert "; the model's bfloat16 ran as float32 on 6 images (workers without fast bfloat16 run float32)" in describe_summary(summary)


def test_a_recorded_check_stands_only_for_its_own_rule_and_todays_limits(session, edge_model, check_data, tmp_path):
    """A check passed under threshold 0.5 admitted bfloat16 under --threshold 0.9, where every verdict flips; a check
    carrying its own min_agreement 0 passed with every verdict flipped."""
    from defectscan.model.precision import ParityCheck, recorded_check
    from defectscan.model.registry import check_file_precision, record_operating_point, record_precision

    path = tmp_path / "edge.keras"
    path.write_bytes(edge_model.read_bytes())
    loose = {**AT_THE_EDGE.as_dict(), "threshold": 0.5, "fail_score": 0.5}
    path.with_suffix(".json").write_text(json.dumps({"classes": ["defect"], "operating_point": loose}))
    record_precision(path.with_suffix(".json"), "bfloat16", check_file_precision(path, "bfloat16", check_data))  # passes at 0.5
    # not taken for the rule at 0.9: a new check is asked for (and this file records no images to run it on)
    with pytest.raises(DataError, match=r"edge.keras: its bfloat16 check was made under its recorded rule \(threshold 0.5, .*\), not this one \(threshold 0.9"):
        register_model(session, path, name="edge2", version="1", metadata=sidecar_metadata(path), threshold=0.9, precision="bfloat16")
    session.rollback()
    with pytest.raises(PrecisionRefused, match="8 flipped"):
        register_model(session, path, name="edge2", version="1", metadata=sidecar_metadata(path), threshold=0.9, precision="bfloat16",
                       check_data=check_data)
    session.rollback()
    # a new operating point in the sidecar drops the check made under the old one
    record_operating_point(path.with_suffix(".json"), AT_THE_EDGE.as_dict())
    assert sidecar_metadata(path).precision_check is None

    flipped = {"precision": "bfloat16", "agreement": 0.0, "dice_float32": 0.5, "dice": 0.07, "images": 8, "flips": 8, "check_data": "x",
               "sha256": "a" * 64, "checked_at": "2026-03-01T00:00:00Z", "min_agreement": 0.0, "max_dice_delta": 1.0}
    assert not ParityCheck.from_dict(flipped).passed and recorded_check(flipped, "bfloat16", "a" * 64) is None

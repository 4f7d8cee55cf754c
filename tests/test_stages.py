"""Model version lifecycle: promote and archive with history, one version in production, jobs following NAME:production."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest
from sqlalchemy import select

from defectscan.db.schema import Model, ModelStageChange
from defectscan.errors import ModelError
from defectscan.model.registry import register_model
from defectscan.model.stages import archive, promote, stage_history
from defectscan.paths import CONFIGS_DIR

from pipeline_helpers import save_threshold_model


@pytest.fixture
def versions(factory, tmp_path):
    path = save_threshold_model(tmp_path / "t.keras")
    with factory() as session:
        for version in ("1", "2", "3"):
            register_model(session, path, name="line3", version=version)
    return factory


def _stages(factory) -> dict[str, str]:
    with factory() as session:
        return {m.version: m.stage for m in session.scalars(select(Model).order_by(Model.id))}


def test_promotion_archives_the_version_in_production_and_keeps_the_history(versions):
    with versions() as session:
        promoted, archived = promote(session, "line3:1", reason="first version", by="ml")
        assert (promoted.version, archived) == ("1", None)
        with pytest.raises(ModelError, match="line3:1 is in production and line3:2 was never compared .* give --without-comparison"):
            promote(session, "line3:2", reason="better", by="ml")
        promoted, archived = promote(session, "line3:2", reason="fewer false calls", by="ml", without_comparison=True)
        assert (promoted.version, archived.version) == ("2", "1")
        assert session.scalar(select(Model.version).where(Model.stage == "production")) == "2"
        assert model_version(session, "line3:production") == "2"
        history = stage_history(session, "line3")
    assert _stages(versions) == {"1": "archived", "2": "production", "3": "staging"}
    assert [(h["model"], h["from_stage"], h["to_stage"], h["changed_by"]) for h in history] == [
        ("line3:1", None, "staging", history[0]["changed_by"]), ("line3:2", None, "staging", history[1]["changed_by"]),
        ("line3:3", None, "staging", history[2]["changed_by"]),
        ("line3:1", "staging", "production", "ml"), ("line3:1", "production", "archived", "ml"), ("line3:2", "staging", "production", "ml"),
    ]
    assert history[4]["reason"] == "replaced in production by 2: fewer false calls"
    assert history[5]["reason"] == "fewer false calls (--without-comparison against line3:1)"  # the audit trail says the evidence was skipped
    assert history[3]["reason"] == "first version"  # nothing in production to compare with


def test_archiving_the_version_in_production_is_no_way_round_the_comparison(versions, tmp_path):
    """Archive line3:1, then promote line3:2: nothing was in production, so nothing asked for evidence."""
    from defectscan.db.comparisons import Comparison, record_comparison

    with versions() as session:
        promote(session, "line3:1", reason="first version", by="ml")
        archive(session, "line3:1", reason="make way", by="ml")
        with pytest.raises(ModelError, match=r"line3:1 was the last version of line3 in production \(none is now\) and line3:2 was never "
                                             r"compared against it .* --against line3:1 --lot LOT`, or give --without-comparison"):
            promote(session, "line3:2", reason="better", by="ml")
        with pytest.raises(ModelError, match=r"line3:1 was the last version of line3 in production; register line3:4 in staging, compare it"):
            register_model(session, session.scalar(select(Model.uri)), name="line3", version="4", stage="production")
        promote(session, "line3:1", reason="archived by mistake", by="ml")  # back to what it was: nothing to prove
        archive(session, "line3:1", reason="make way again", by="ml")
        rows = {m.version: m for m in session.scalars(select(Model).where(Model.name == "line3"))}
        record_comparison(session, rows["2"], rows["1"], Comparison("line3:2", "line3:1", [1], ["L1"], images=0), by="qa")
        with pytest.raises(ModelError, match="never compared"):  # a comparison over no judged image is no evidence
            promote(session, "line3:2", reason="better", by="ml")
        record_comparison(session, rows["2"], rows["1"], Comparison("line3:2", "line3:1", [1], ["L1"], images=20, agree=20), by="qa")
        promote(session, "line3:2", reason="better on L1", by="ml")
        promote(session, "line3:3", reason="urgent", by="ml", without_comparison=True)
        history = stage_history(session, "line3")
    assert _stages(versions) == {"1": "archived", "2": "archived", "3": "production"}
    assert [h["reason"] for h in history if h["to_stage"] == "production"] == [
        "first version", "archived by mistake", "better on L1", "urgent (--without-comparison against line3:2)"]
    assert "4" not in _stages(versions)


def test_two_promotions_of_one_name_at_once_leave_one_version_in_production(versions):
    """On SQLite the lock locked nothing: two promotions that both read v1 as current left v2 and v3 in production."""
    import threading

    from defectscan.model.stages import _lock_name

    with versions() as first:
        promote(first, "line3:1", reason="first version", by="ml")
        _lock_name(first, "line3")  # a promotion under way: it has read the versions and holds them
        done = []
        second = threading.Thread(target=lambda: done.append(promote(versions(), "line3:3", reason="b", by="u3", without_comparison=True)))
        second.start()
        second.join(1.5)
        assert second.is_alive() and not done  # waits for the first to finish, instead of reading v1 as current too
        promote(first, "line3:2", reason="a", by="u2", without_comparison=True)
    second.join(30)
    assert _stages(versions) == {"1": "archived", "2": "archived", "3": "production"}
    assert done[0][1].version == "2"  # the second replaced what the first promoted


def model_version(session, reference: str) -> str:
    from defectscan.db.model_refs import resolve

    return resolve(session, reference).version


def test_archive_and_bad_requests_are_one_line_errors(versions, cli, migrated_url):
    run = lambda *args: cli("--database-url", migrated_url, *args)  # noqa: E731
    done = run("models", "promote", "line3:3", "--reason", "first in production", "--by", "ml")
    assert (done.exit_code, done.output.splitlines()[0]) == (0, "line3:3 is in production")
    assert "every image set they match that it has not judged, old ones too (a job source's `since:` limits that)" in done.output
    again = run("models", "promote", "line3:3", "--reason", "again")
    assert (again.exit_code, again.output) == (1, "Error: model line3:3 is already in production\n")
    blank = run("models", "archive", "line3:3", "--reason", " ")
    assert blank.exit_code == 1 and "give --reason" in blank.output
    assert run("models", "archive", "line3:3", "--reason", "lamp changed").output == "line3:3 archived\n"
    with versions() as session:
        with pytest.raises(ModelError, match="no model line3:production in the registry"):
            model_version(session, "line3:production")
        with pytest.raises(ModelError, match="already archived"):
            archive(session, "line3:3", reason="twice")
        with pytest.raises(ModelError, match="no model nope in the registry"):
            stage_history(session, "nope")
    history = json.loads(run("models", "history", "line3", "--format", "json").output)
    assert [h["to_stage"] for h in history][-2:] == ["production", "archived"]
    with versions() as session:
        assert session.query(ModelStageChange).count() == 5


def test_registering_straight_into_production_is_refused_while_another_version_is_there(versions, tmp_path):
    with versions() as session:
        register_model(session, session.scalar(select(Model.uri)), name="line4", version="1", stage="production")
        promote(session, "line3:1", reason="first", by="ml")
        with pytest.raises(ModelError, match=r"line3:1 is in production; register line3:4 in staging and promote it \(defectscan models promote line3:4\)"):
            register_model(session, session.scalar(select(Model.uri)), name="line3", version="4", stage="production")
    assert "4" not in _stages(versions)


def test_a_job_on_name_production_runs_the_promoted_version(versions, tmp_path):
    from defectscan.jobs.runner import resolve_model
    from defectscan.jobs.spec import JobSpec

    spec = JobSpec.model_validate({"name": "line3", "schedule": "0 * * * *", "source": {"lot": "L1"}, "model": "line3:production"})
    with versions() as session:
        with pytest.raises(ModelError, match="no model line3:production"):
            resolve_model(session, spec)
        promote(session, "line3:2", reason="go", by="ml")
        assert resolve_model(session, spec).version == "2"
        promote(session, "line3:3", reason="better", by="ml", without_comparison=True)
        assert resolve_model(session, spec).version == "3"


def test_the_versions_in_production_over_a_window_follow_the_history():
    from defectscan.model.stages import in_production_between

    t = lambda hour: dt.datetime(2026, 3, 1, hour, tzinfo=dt.UTC)  # noqa: E731
    timeline = [(t(1), "1"), (t(5), None), (t(6), "2"), (t(9), "3")]
    assert in_production_between([], t(2), t(3)) == [None]
    assert in_production_between(timeline, t(0), t(0)) == [None]
    assert in_production_between(timeline, t(2), t(4)) == ["1"]
    assert in_production_between(timeline, t(4), t(7)) == ["1", None, "2"]
    assert in_production_between(timeline, t(9), t(12)) == ["3"]


def test_the_production_timeline_of_promotions_and_archives(versions):
    from defectscan.model.stages import production_timeline

    with versions() as session:
        promote(session, "line3:1", reason="first", by="ml")
        promote(session, "line3:2", reason="second", by="ml", without_comparison=True)
        archive(session, "line3:2", reason="lamp changed", by="qa")
        archive(session, "line3:3", reason="never used", by="qa")  # never in production: no change
        timeline = production_timeline(session, "line3")
        assert [v for _, v in timeline] == ["1", "2", None]  # no moment without a version at the promotion
        history = stage_history(session, "line3")
        assert history[-4]["changed_at"] == history[-3]["changed_at"]  # the archive and the promotion: one moment


def test_a_history_that_starts_at_the_migration_says_unknown_before_it_not_none(versions):
    """Versions registered before 0004 have one row each, their stage then: the one in production counts from its
    registration, before which (and for the archived ones) nothing is known; the report says so instead of 'none'."""
    from defectscan.model.stages import BEFORE_HISTORY, UNKNOWN, in_production_between, production_timeline

    with versions() as session:
        registered = {m.version: m for m in session.scalars(select(Model).where(Model.name == "line3"))}
        session.query(ModelStageChange).delete()
        for version, stage in (("1", "archived"), ("2", "production"), ("3", "staging")):
            session.add(ModelStageChange(model_id=registered[version].id, to_stage=stage, reason=BEFORE_HISTORY, changed_by="defectscan",
                                         changed_at=registered[version].registered_at))
            registered[version].stage = stage
        session.commit()
        promote(session, "line3:3", reason="fine-tuned", by="ml", without_comparison=True)
        timeline = production_timeline(session, "line3")
    assert [v for _, v in timeline] == [UNKNOWN, "2", "3"]
    early = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    assert in_production_between(timeline, early, early) == [UNKNOWN]
    assert in_production_between(timeline, early, timeline[-1][0]) == [UNKNOWN, "2", "3"]


def test_demo_stands_for_the_demo_models_name_and_jobs_run_its_production_version(factory, tmp_path):
    from defectscan.jobs.runner import resolve_model
    from defectscan.jobs.spec import JobSpec
    from defectscan.model.registry import DEMO_METADATA, model_to_run, read_metadata

    name = read_metadata(DEMO_METADATA).name
    spec = JobSpec.model_validate({"name": "demo", "schedule": "* * * * *", "source": {"lot": "L1"}, "model": "demo"})
    with factory() as session:
        shipped = resolve_model(session, spec)  # registered on first use, in production
        assert (shipped.name, shipped.stage) == (name, "production")
        register_model(session, save_threshold_model(tmp_path / "t.keras"), name=name, version="tuned")
        assert resolve_model(session, spec).id == shipped.id  # registered, not promoted: runs nowhere
        assert model_to_run(session, "demo").id == shipped.id  # by hand too: `demo` is what the demo job runs
        assert model_to_run(session, "demo:latest").version == "tuned"
        promote(session, f"{name}:tuned", reason="fine-tuned on the plant's reviews", by="ml", without_comparison=True)
        assert resolve_model(session, spec).version == "tuned"


def test_a_shipped_demo_registered_in_staging_by_an_older_version_goes_to_production(factory):
    from defectscan.model.registry import DEMO_METADATA, DEMO_MODEL, model_to_run, read_metadata

    meta = read_metadata(DEMO_METADATA)
    with factory() as session:
        register_model(session, DEMO_MODEL, metadata=meta)
        row = model_to_run(session, "demo:production")
        assert (row.version, row.stage) == (meta.version, "production")
        assert [h["to_stage"] for h in stage_history(session, meta.name)] == ["staging", "production"]


def test_a_demo_row_whose_checksum_differs_is_refused_before_any_promotion(factory, tmp_path):
    from defectscan.model.registry import DEMO_METADATA, model_to_run, read_metadata

    meta = read_metadata(DEMO_METADATA)
    with factory() as session:
        register_model(session, save_threshold_model(tmp_path / "t.keras"), name=meta.name, version=meta.version)
        with pytest.raises(ModelError, match=f"the registered demo model {meta.name}:{meta.version} has sha256"):
            model_to_run(session, "demo")
        session.rollback()
    assert _stages(factory) == {meta.version: "staging"}  # not promoted on the way to the refusal
    with factory() as session:
        assert [h["to_stage"] for h in stage_history(session, meta.name)] == ["staging"]


def test_the_shipped_demo_installed_at_another_path_is_still_the_shipped_one(factory):
    """A new virtual env or image moves the package: the row follows the file (same checksum), and an older
    shipped version in production, registered from the old install path, is still replaced by the new one."""
    from sqlalchemy import update

    from defectscan.model.registry import DEMO_METADATA, DEMO_MODEL, model_to_run, read_metadata

    meta = read_metadata(DEMO_METADATA)
    old_install = "/opt/old-venv/lib/python3.11/site-packages/defectscan/model/demo"
    with factory() as session:
        register_model(session, DEMO_MODEL, metadata=dataclasses.replace(meta, version="0"), stage="production")
        session.execute(update(Model).where(Model.version == "0").values(uri=f"{old_install}/{DEMO_MODEL.name}"))
        session.commit()
        row = model_to_run(session, "demo")
        assert (row.version, row.stage, row.uri) == (meta.version, "production", str(DEMO_MODEL))
        session.execute(update(Model).where(Model.version == meta.version).values(uri=f"{old_install}/{DEMO_MODEL.name}"))
        session.commit()
        assert model_to_run(session, "demo").uri == str(DEMO_MODEL)


def test_fine_tuning_from_a_registered_version_checks_it_and_names_what_is_wrong(versions, tmp_path, cli, migrated_url):
    """`model.init_from=NAME:STAGE` reads the version's file through the registry: an unknown reference and a file
    changed since registration are one-line errors, before any training."""
    from defectscan.model.recipe import load_recipe
    from defectscan.model.registry import is_registered_reference, registered_file, resolve_init_from
    from defectscan.model.train import train

    recipe = str(CONFIGS_DIR / "model" / "tinyunet-cpu-test.yaml")
    with versions() as session:
        promote(session, "line3:2", reason="first", by="ml")
        assert registered_file(session, "line3:production").version == "2"
        assert not is_registered_reference(str(tmp_path / "t.keras")) and not is_registered_reference("demo")
        # the library: train() refuses a reference it cannot resolve itself, resolve_init_from points it at the file
        named = load_recipe(recipe, ["model.init_from=line3:production"])
        with pytest.raises(ModelError, match="model.init_from line3:production names a registered version.*resolve_init_from"):
            train(named, tmp_path / "lib", progress=False)
        assert resolve_init_from(session, named).version == "2" and named.model.init_from == str(tmp_path / "t.keras")
        assert resolve_init_from(session, named) is None
    unknown = cli("--database-url", migrated_url, "train", recipe, "--out", str(tmp_path / "a"), "--set", "model.init_from=line9:production")
    assert unknown.exit_code == 1 and "line9" in unknown.output and unknown.output.count("\n") == 1, unknown.output
    (tmp_path / "t.keras").write_bytes((tmp_path / "t.keras").read_bytes() + b"\0")
    changed = cli("--database-url", migrated_url, "train", recipe, "--out", str(tmp_path / "b"), "--set", "model.init_from=line3:production")
    assert changed.exit_code == 1 and "line3:2" in changed.output and "the registry recorded" in changed.output, changed.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "lib").exists()

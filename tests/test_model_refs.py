"""Model references: one grammar and one meaning (db/model_refs.py), on a real registry."""

from __future__ import annotations

import re

import pytest

from defectscan.db import model_refs
from defectscan.db.schema import Model
from defectscan.errors import DataError, ModelError


def _add(session, name, version, stage="staging"):
    session.add(Model(name=name, version=version, uri=f"/m/{name}-{version}.keras", sha256="0" * 64, architecture="test",
                      input_spec={}, classes=["defect"], threshold=0.5, stage=stage))
    session.flush()


@pytest.fixture
def registry(factory):
    with factory.begin() as session:
        _add(session, "tiny", "1", stage="production")
        _add(session, "tiny", "2")
        _add(session, "other", "1")
    with factory() as session:
        yield session


def test_parse_and_print():
    assert model_refs.parse("tiny") == model_refs.ModelReference("tiny", "latest")
    assert model_refs.parse("tiny:3") == model_refs.ModelReference("tiny", "3")
    assert str(model_refs.parse("tiny")) == "tiny" and str(model_refs.parse("tiny:production")) == "tiny:production"
    for bad in ("", ":3", "tiny:"):
        with pytest.raises(ModelError, match="expected NAME, NAME:VERSION, NAME:STAGE or NAME:\\*"):
            model_refs.parse(bad)


def test_one_meaning_for_each_form(registry):
    resolve = lambda text: (lambda row: f"{row.name}:{row.version}")(model_refs.resolve(registry, text))  # noqa: E731
    assert resolve("tiny") == resolve("tiny:latest") == "tiny:2"
    assert resolve("tiny:1") == resolve("tiny:production") == "tiny:1"
    assert resolve("tiny:staging") == "tiny:2"
    ids = lambda text: sorted(model_refs.matching_ids(registry, text))  # noqa: E731
    assert ids("tiny") == [model_refs.resolve(registry, "tiny:2").id]  # results of the latest version, as for every command
    assert len(ids("tiny:*")) == 2


def test_unknown_and_ambiguous_references_are_one_line_errors(registry):
    with pytest.raises(ModelError, match=r"no model tiny:archived in the registry; known: other:1 \(staging\), tiny:1 \(production\), tiny:2 \(staging\)$"):
        model_refs.resolve(registry, "tiny:archived")
    model_refs.resolve(registry, "tiny:1").stage = "archived"
    registry.flush()
    with pytest.raises(ModelError, match=r"no model tiny:production .*; promote one \(defectscan models promote tiny:VERSION\)$"):
        model_refs.resolve(registry, "tiny:production")
    with pytest.raises(ModelError, match="names every version of tiny; give one"):
        model_refs.resolve(registry, "tiny:*")
    with pytest.raises(DataError, match="unknown model 'tiyn': expected .* of a registered model; did you mean tiny"):
        model_refs.matching_ids(registry, "tiyn")


@pytest.mark.parametrize("version", ["latest", "*", "production", "staging", "archived", "a:b"])
def test_a_version_named_like_a_selector_is_refused_at_registration(factory, tmp_path, version):
    from defectscan.model.registry import register_model

    from pipeline_helpers import save_threshold_model

    path = save_threshold_model(tmp_path / "t.keras")
    with factory() as session, pytest.raises(ModelError, match=re.escape(f"version {version!r} would read as a selector")):
        register_model(session, path, name="t", version=version)


@pytest.mark.parametrize("name", ["line:3", " line3", "line3 "])
def test_a_model_name_no_reference_could_name_is_refused_at_registration(factory, tmp_path, name):
    """`line:3` registered, then `models show line:3:1` answered 'no model line:3:1; known: line:3:1'."""
    from defectscan.model.registry import register_model

    from pipeline_helpers import save_threshold_model

    path = save_threshold_model(tmp_path / "t.keras")
    with factory() as session, pytest.raises(ModelError, match=re.escape(f"model name {name!r} cannot be named in a reference NAME:VERSION")):
        register_model(session, path, name=name, version="1")


def test_demo_names_the_shipped_demo_model_in_every_command_bare_its_production_version(factory, migrated_url, cli):
    from defectscan.model.registry import model_to_run

    demo = model_refs.demo_name()
    assert model_refs.expand_alias("demo") == f"{demo}:production"
    assert model_refs.expand_alias("demo:latest") == f"{demo}:latest" and model_refs.expand_alias("tiny") == "tiny"
    with factory() as session:
        shipped = model_to_run(session, "demo")  # registered on first use, as `inspect --model demo` does
        _add(session, demo, "tuned")  # a fine-tuned version, not promoted
        session.commit()
        assert model_refs.resolve(session, "demo").id == shipped.id == model_refs.matching_ids(session, "demo")[0]
        assert model_refs.resolve(session, "demo:latest").version == "tuned"
        assert len(model_refs.matching_ids(session, "demo:*")) == 2
    shown = cli("--database-url", migrated_url, "models", "show", "demo")
    assert shown.exit_code == 0 and f'"version": "{shipped.version}"' in shown.output
    listed = cli("--database-url", migrated_url, "images", "list", "--model", "demo")
    assert listed.exit_code == 0, listed.output
    # commands about all of a name's versions: `demo` is its name; NAME:VERSION is refused, not "no stage changes"
    history = cli("--database-url", migrated_url, "models", "history", "demo", "--format", "csv")
    assert history.exit_code == 0 and f"{demo}:{shipped.version}," in history.output, history.output
    versions = cli("--database-url", migrated_url, "models", "list", "--name", "demo", "--format", "csv")
    assert versions.exit_code == 0 and "tuned" in versions.output, versions.output
    wrong = cli("--database-url", migrated_url, "models", "history", f"{demo}:tuned")
    assert wrong.exit_code == 1 and f"'{demo}:tuned': expected a model NAME, e.g. {demo}" in wrong.output


def test_a_model_named_demo_is_refused_at_registration(factory, tmp_path):
    from defectscan.model.registry import register_model

    from pipeline_helpers import save_threshold_model

    path = save_threshold_model(tmp_path / "t.keras")
    with factory() as session, pytest.raises(ModelError, match="model name 'demo' stands for the shipped demo model"):
        register_model(session, path, name="demo", version="1")

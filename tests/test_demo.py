"""A reduced `make demo`: the same code path (files -> image sets -> the demo job on a local cluster), fewer and smaller images."""

from __future__ import annotations

import json

import yaml
from sqlalchemy import func, select

from defectscan.db.schema import ImageSet, Inspection, JobRun
from defectscan.db.session import make_engine, session_factory
from defectscan.demo import LOTS, MOSAIC, run_demo
from defectscan.paths import REPO_ROOT


def test_reduced_demo_runs_and_reruns_with_nothing_to_do(tmp_path, monkeypatch):
    # No database set: the demo's own, under its folder; the user's data directory stays empty.
    user_data = tmp_path / "xdg"
    user_data.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(user_data))
    url = f"sqlite:///{tmp_path / 'demo' / 'defectscan.sqlite'}"
    # The shipped job, whose glob names var/demo: the demo points it at the image sets it writes.
    job_file = REPO_ROOT / "jobs" / "demo.yaml"
    lines: list[str] = []

    first = run_demo(tmp_path / "demo", job_file, images_per_lot=4, image_size=128, mosaic_size=512, echo=lines.append)
    assert first.status == "succeeded", "\n".join(lines)
    assert (first.inspected, first.skipped) == (3 * 4 + 1, 0)
    shown = "\n".join(lines)
    assert "$ defectscan lots list --format table" in shown and "L-2026-1101" in shown
    assert "$ defectscan defects list" in shown
    assert {p.name for p in first.reports} >= {"line-1.html", "line-2.html"}
    assert all(p.stat().st_size > 1000 for p in first.reports)
    assert f"database: {url} " in shown and first.database == url  # main() ends by naming it: the CLI reads the default one
    assert list(user_data.iterdir()) == []

    engine = make_engine(url)
    with session_factory(engine)() as session:
        lots = sorted(session.scalars(select(ImageSet.lot)))
        assert lots == sorted([lot for lot, *_ in LOTS] + [MOSAIC[0]])
        assert all(uri.startswith(str(tmp_path / "demo" / "imagesets")) for uri in session.scalars(select(ImageSet.uri)))
        assert session.scalar(select(func.count()).select_from(Inspection)) == 13
    second = run_demo(tmp_path / "demo", job_file, images_per_lot=4, image_size=128, mosaic_size=512, echo=lines.append)
    assert (second.status, second.inspected) == ("succeeded", 0)
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Inspection)) == 13
        assert session.scalar(select(func.count()).select_from(JobRun)) == 2
    assert any("already there" in line for line in lines)

    # A new defectscan ships a new demo model version: it inspects everything again, and the
    # reports cover the new version although the database also holds the old one's results.
    from defectscan.model import registry

    meta = json.loads(registry.DEMO_METADATA.read_text())
    newer_model, newer_meta = tmp_path / "demo-next.keras", tmp_path / "demo-next.json"
    newer_model.write_bytes(registry.DEMO_MODEL.read_bytes())
    newer_meta.write_text(json.dumps({**meta, "version": meta["version"] + "-next"}))
    monkeypatch.setattr(registry, "DEMO_MODEL", newer_model)
    monkeypatch.setattr(registry, "DEMO_METADATA", newer_meta)
    third = run_demo(tmp_path / "demo", job_file, images_per_lot=4, image_size=128, mosaic_size=512, echo=lines.append)
    assert (third.status, third.inspected) == ("succeeded", 13), "\n".join(lines)
    assert {p.name for p in third.reports} >= {"line-1.html", "line-2.html"}
    assert f"{meta['name']} version {meta['version']}-next" in (tmp_path / "demo" / "reports" / "line-1.html").read_text()
    engine.dispose()


def test_demo_job_spec_points_at_the_demo_folder():
    spec = yaml.safe_load((REPO_ROOT / "jobs" / "demo.yaml").read_text())
    assert (REPO_ROOT / "jobs" / spec["source"]["glob"]).parent.resolve() == (REPO_ROOT / "var" / "demo" / "imagesets").resolve()


def test_a_database_set_explicitly_is_the_demos_database_too(tmp_path, monkeypatch):
    from defectscan.demo import demo_settings
    from defectscan.jobs.spec import load_spec

    job_file = REPO_ROOT / "jobs" / "demo.yaml"
    spec = load_spec(job_file)
    assert demo_settings(spec, job_file, tmp_path).resolved_database_url == f"sqlite:///{tmp_path / 'defectscan.sqlite'}"
    monkeypatch.setenv("DEFECTSCAN_DATABASE_URL", "postgresql://qa@db/defectscan")
    assert demo_settings(spec, job_file, tmp_path).resolved_database_url == "postgresql://qa@db/defectscan"

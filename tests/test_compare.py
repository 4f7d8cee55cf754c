"""Shadow comparison: a candidate inspected where the production version has results, figures counted by hand,
the comparison recorded for promotion, the production version's results and report untouched."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from defectscan.config import load_settings
from defectscan.db.schema import Image, Inspection, Model, ModelComparison
from defectscan.errors import DataError, ModelError
from defectscan.model.registry import register_model
from defectscan.model.stages import promote
from defectscan.pipeline.run import inspect_image_sets
from defectscan.review.record import review_images

from pipeline_helpers import register, square_images, write_stack


def _threshold_model(path, bias: float):
    """A 1x1 convolution: fails pixels above (bias / 40 + 1) x 127.5 (bias 32: ~230; bias 28: ~217)."""
    import keras

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="threshold")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 40.0, np.float32), np.full((1,), -bias, np.float32)])
    model.save(path)
    return path


@pytest.fixture
def plant(factory, cluster, tmp_path):
    images = square_images(8, size=64, defects={0: (5, 5, 6), 1: (20, 20, 6)}, seed=4)
    images[2, 30:36, 30:36] = 225  # seen by the candidate only
    images[3, 10:16, 40:46] = 225
    image_set = register(factory, write_stack(tmp_path / "C1.zarr", images, lot="C1", line="A"))
    with factory() as session:
        current = register_model(session, _threshold_model(tmp_path / "v1.keras", 32.0), name="thr", version="1")
        register_model(session, _threshold_model(tmp_path / "v2.keras", 28.0), name="thr", version="2")
        promote(session, "thr:1", reason="first", by="ml")
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    assert inspect_image_sets(factory, cluster, current, [image_set], settings, max_in_flight=2).status == "succeeded"
    with factory() as session:
        ids = {p: i for p, i in session.execute(select(Image.position, Image.id))}
    return ids


def test_compare_counts_flips_and_qa_outcomes_and_lets_the_candidate_be_promoted(factory, plant, cli, migrated_url, cluster, tmp_path, monkeypatch):
    ids = plant
    with factory() as session:
        review_images(session, [ids[2]], "fail", by="qa")  # a real defect the production version passes: an escape
        review_images(session, [ids[3]], "pass", by="qa")  # nothing there: the candidate's fail is a new false call
        review_images(session, [ids[0]], "fail", by="qa")
        with pytest.raises(ModelError, match="thr:2 was never compared against it on judged images of the plant: run `defectscan models compare"):
            promote(session, "thr:2", reason="more sensitive", by="ml")
    monkeypatch.setenv("DEFECTSCAN_INSPECTION__BATCH_SIZE", "4")
    monkeypatch.setenv("DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD", "4")
    out, page = tmp_path / "compare.json", tmp_path / "compare.html"
    from defectscan.report import build

    # Every image counts as large: drawn in part, both sides the same part (the pass side has no defect of its own,
    # and was drawn whole beside its candidate's crop).
    monkeypatch.setattr(build, "WHOLE_IMAGE_PIXELS", 24 * 24)
    monkeypatch.setattr(build, "CROP_MARGIN", 2)
    result = cli("--database-url", migrated_url, "models", "compare", "thr:2", "--against", "thr:production", "--lot", "C1",
                 "--scheduler", cluster.scheduler.address, "--json", str(out), "--html", str(page))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("thr:2", "QA-"))]
    assert lines == ["thr:2 against thr:1 on 8 images (C1): agreement 75.0 %; pass->fail 2, fail->pass 0",
                     "QA-reviewed images 3: false calls fixed 0, new false calls 1, escapes caught 1, new escapes 0"]
    flips = json.loads(out.read_text())["flips"]
    assert [(f["image_id"], f["current"], f["candidate"], f["qa"], f["effect"]) for f in flips] == [
        (ids[2], "pass", "fail", "fail", "escapes_caught"), (ids[3], "pass", "fail", "pass", "new_false_calls")]
    _check_page(page, flips)
    sizes = [_png_size(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page.read_text())]
    assert len(sizes) == 4 and sizes[0] == sizes[1] and sizes[2] == sizes[3], sizes
    with factory() as session:  # the production version's rows are untouched; the candidate has its own
        verdicts = dict(session.execute(select(Inspection.image_id, Inspection.verdict).join(Model).where(Model.version == "1")).all())
        assert verdicts[ids[2]] == "pass" and verdicts[ids[3]] == "pass" and verdicts[ids[0]] == "fail"
        promoted, archived = promote(session, "thr:2", reason="catches the 225 marks", by="ml")
        assert (promoted.version, archived.version) == ("2", "1")


def _png_size(data: str) -> tuple[int, int]:
    import base64
    import io

    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(base64.b64decode(data))).size


def _check_page(page, flips):
    """The HTML lists every flip with what it means for QA and draws both versions' overlays of each; it renders in Chromium."""
    import re

    from PIL import Image as PILImage

    from defectscan.report import pdf
    from test_report_browser import console_messages

    html = page.read_text()
    assert "Shadow comparison: thr:2 against thr:1" in html and "lot C1" in html
    rows = re.findall(r"<tr><td>(\d+)</td>.*?</tr>", html, flags=re.S)
    assert [int(r) for r in rows] == [f["image_id"] for f in flips]
    assert "escape caught</td>" in html and "new false call</td>" in html
    assert html.count('<img src="data:image/png;base64,') == 2 * len(flips)
    assert re.search(r'kpi worse"><div class="value">1</div><div class="label">new false calls', html)
    try:
        browser = pdf.find_chromium()
    except Exception:
        if os.environ.get("CI") == "true":
            raise
        return
    del browser
    run = pdf.screenshot(page, page.with_suffix(".png"), width=1200, height=1400)
    assert console_messages(run.log) == []
    shot = np.asarray(PILImage.open(run.output).convert("RGB")).astype(np.float32)
    assert shot.mean(axis=2).std() > 20


def test_the_report_of_a_scope_with_a_shadow_version_is_the_production_versions(factory, plant, cluster, tmp_path):
    from defectscan.pipeline.shadow import shadow_compare
    from defectscan.report.build import Scope, build_report

    settings = load_settings(overrides={"cluster.scheduler": (cluster.scheduler.address, "test"), "inspection.batch_size": (4, "test"),
                                        "inspection.images_per_shard": (4, "test")})
    comparison = shadow_compare(factory, settings, "thr:2", "thr:1", lot="C1", echo=lambda line: None)
    assert (comparison.images, comparison.pass_to_fail) == (8, 2)
    with factory() as session:
        report = build_report(session, Scope(lot="C1"))
        promote(session, "thr:2", reason="catches the 225 marks", by="ml")
        shadow = build_report(session, Scope(lot="C1", model="thr:2"))
        after = build_report(session, Scope(lot="C1"))
    assert report.summary["model"] == "thr:1" and report.summary["failed"] == 2
    # which version was in production while each lot was inspected: thr:1, also for thr:2's shadow results
    assert re.search(r"<td>thr:1</td><td class=\"(hold|release)\">", report.html)
    assert re.search(r"<td class=\"signal\">thr:1</td><td class=\"(hold|release)\">", shadow.html)
    assert after.summary["model"] == "thr:2" and re.search(r"<td class=\"signal\">thr:1</td>", after.html)


def test_a_comparison_is_not_recorded_over_part_of_the_scope(factory, plant, cluster, tmp_path):
    """The candidate's run ended partial with images pending: a comparison of the rest would let a promotion through."""
    from defectscan.pipeline.outputs import scores_uri
    from defectscan.pipeline.shadow import shadow_compare

    second = register(factory, write_stack(tmp_path / "C2.zarr", square_images(4, size=64, seed=5), lot="C1", line="A"))
    settings = load_settings(overrides={"cluster.scheduler": (cluster.scheduler.address, "test"), "inspection.batch_size": (4, "test"),
                                        "inspection.images_per_shard": (4, "test")})
    with factory() as session:
        current = session.scalars(select(Model).where(Model.version == "1")).one()
    assert inspect_image_sets(factory, cluster, current, [second], settings.inspection, max_in_flight=2).status == "succeeded"
    blocked = Path(scores_uri(str(tmp_path / "C2.zarr"), None)) / "thr" / "2"
    blocked.write_text("in the way of the candidate's score array")
    with pytest.raises(DataError, match=r"^the candidate's inspection left 4 images pending \(4 images \(1 shards\) left pending"):
        shadow_compare(factory, settings, "thr:2", "thr:1", lot="C1", echo=lambda line: None)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(ModelComparison)) == 0


def test_a_comparison_over_no_judged_image_is_not_recorded_and_does_not_open_production(factory, plant, cluster, tmp_path):
    """Every candidate image in error (a failing disk): 'on 0 images' was recorded, and promote accepted it."""
    from pipeline_helpers import corrupt_chunk

    from defectscan.pipeline.shadow import shadow_compare

    for position in range(8):
        corrupt_chunk(tmp_path / "C1.zarr", position)
    settings = load_settings(overrides={"cluster.scheduler": (cluster.scheduler.address, "test"), "inspection.batch_size": (4, "test"),
                                        "inspection.images_per_shard": (4, "test")})
    with pytest.raises(DataError, match=r"^thr:2 and thr:1 have no judged image in common there \(images in error on either side are left out\)"):
        shadow_compare(factory, settings, "thr:2", "thr:1", lot="C1", echo=lambda line: None)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(ModelComparison)) == 0
        with pytest.raises(ModelError, match="thr:2 was never compared against it on judged images of the plant"):
            promote(session, "thr:2", reason="compared", by="ml")


def test_qa_decisions_count_whichever_versions_defects_they_were_made_on(factory, plant, cluster, tmp_path):
    """QA confirmed thr:1's defect on image 0; once thr:2 was in production, comparing thr:3 against it found no
    decision on image 0: decisions were looked up through the compared version's inspections only."""
    from defectscan.db.comparisons import compare_results
    from defectscan.db.schema import Defect
    from defectscan.review.record import review_defects

    ids = plant
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    with factory() as session:
        third = register_model(session, _threshold_model(tmp_path / "v3.keras", 30.0), name="thr", version="3")
        second = session.scalar(select(Model).where(Model.version == "2"))
        image_set = session.get(Image, ids[0]).image_set
        first_defects = list(session.scalars(select(Defect.id).join(Inspection).where(Inspection.image_id == ids[0])))
        review_defects(session, first_defects, "confirmed", by="qa")  # on thr:1's defects
    for model in (second, third):
        assert inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2).status == "succeeded"
    with factory() as session:
        promote(session, "thr:2", reason="second", by="ml", without_comparison=True)
        comparison = compare_results(session, session.get(Model, third.id), session.get(Model, second.id), [image_set.id])
        assert comparison.images == 8 and comparison.reviewed == 1
        # a newer inspection's defect on it rejected does not undo the defect QA confirmed (it counted as "pass")
        from defectscan.db.reviews import qa_truth

        newer = list(session.scalars(select(Defect.id).join(Inspection).where(Inspection.image_id == ids[0], Inspection.model_id == third.id)))
        review_defects(session, newer, "false-call", by="qa")
        assert qa_truth(session, [image_set.id])[ids[0]] == "fail"

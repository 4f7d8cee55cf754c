"""QA review: decisions on real pipeline results (SQLite and PostgreSQL), the queue, figures counted by hand, export, failures."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import func, select

from defectscan.config import load_settings
from defectscan.db.queries import Filters
from defectscan.db.reviews import decided_images, review_figures, wilson_interval
from defectscan.db.schema import Defect, DefectReview, Image, ImageReview, Inspection, JobRun
from defectscan.errors import DataError
from defectscan.pipeline.run import inspect_image_sets
from defectscan.review.record import review_defects, review_images

from pipeline_helpers import add_model, register, save_threshold_model, square_images, write_stack

# Lot R1: 12 images, bright squares (the threshold model's defects) on 5 of them.
SQUARES = {1: (4, 4, 6), 3: (20, 20, 5), 5: (30, 10, 8), 8: (10, 40, 4), 10: (44, 44, 6)}
# QA: the squares on 3 and 8 are dust (false calls); image 6, which the model passed, has a
# faint scratch it missed (an escape, drawn by QA).
MISSED = (slice(50, 53), slice(5, 25))


@pytest.fixture
def lot(factory, cluster, tmp_path):
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    store = write_stack(tmp_path / "R1.zarr", square_images(12, size=64, defects=SQUARES, seed=2), lot="R1", line="A",
                        acquired_at="2026-03-01T10:00:00Z")
    image_set = register(factory, store)
    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    summary = inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2)
    assert summary.status == "succeeded"
    with factory() as session:
        rows = session.execute(select(Image.position, Image.id, Inspection.verdict).join(Inspection, Inspection.image_id == Image.id)).all()
        defects = {p: list(session.scalars(select(Defect.id).join(Inspection, Defect.inspection_id == Inspection.id)
                                           .join(Image, Inspection.image_id == Image.id).where(Image.position == p)))
                   for p in SQUARES}
    ids = {position: image_id for position, image_id, _ in rows}
    assert sorted(p for p, _, v in rows if v == "fail") == sorted(SQUARES)
    return ids, defects


def _count(factory, table) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(table))


def test_decisions_give_the_false_call_and_escape_rates_counted_by_hand(factory, lot, cli, migrated_url):
    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[1] + defects[5] + defects[10], "confirmed", by="anna")
        review_defects(session, defects[3], "false-call", by="anna", note="dust")
        review_images(session, [ids[8]], "pass", by="ben", note="dust on the lens")
        mask = np.zeros((64, 64), np.uint8)
        mask[MISSED] = 255
        review_images(session, [ids[6]], "fail", by="ben", mask=mask, class_name="scratch")
        review_images(session, [ids[0], ids[2], ids[7]], "pass", by="ben")  # sampled passes, good
    # By hand: the model failed 1, 3, 5, 8, 10; QA decided all five (3 via its defect, 8 explicitly):
    # false calls 3 and 8 -> 2/5. Passed images QA decided: 0, 2, 6, 7 -> one escape (6) -> 1/4.
    with factory() as session:
        [(key, figures)] = review_figures(session, Filters(lot="R1")).items()
    assert (figures.false_calls, figures.failed_reviewed, figures.false_call_rate) == (2, 5, 0.4)
    assert (figures.escapes, figures.passed_reviewed, figures.escape_rate) == (1, 4, 0.25)
    assert (figures.defects_confirmed, figures.defects_reviewed) == (3, 4)
    low, high = figures.escape_interval
    assert low < 0.25 < high and high < 0.75  # a sample of four says little: the interval shows it

    listed = cli("--database-url", migrated_url, "lots", "list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert (row["false_calls"], row["failed_reviewed"], row["false_call_rate"], row["escape_rate"]) == (2, 5, 0.4, 0.25)
    table = cli("--database-url", migrated_url, "lots", "show", "R1", "--format", "table")
    assert "false_call_rate" in table.output and "0.4" in table.output

    by_line = json.loads(cli("--database-url", migrated_url, "review", "figures", "--by", "line", "--format", "json").output)
    assert [(r["line"], r["false_calls"], r["failed_reviewed"], r["escapes"], r["passed_reviewed"]) for r in by_line] == [("A", 2, 5, 1, 4)]
    by_class = json.loads(cli("--database-url", migrated_url, "review", "figures", "--by", "class", "--format", "json").output)
    # the model's defects: 3 confirmed, 1 false call (all of its one class); the escape QA drew as a scratch
    assert sum(r["defects_reviewed"] for r in by_class) == 4 and sum(r["false_calls"] for r in by_class) == 1
    assert [(r["class"], r["escapes"], r["defects_reviewed"]) for r in by_class if r["class"] == "scratch"] == [("scratch", 1, 0)]


def test_the_figures_counted_by_the_database_agree_with_the_decisions_image_by_image(factory, lot):
    """review_figures counts in SQL what decided_images decides in Python: an image decision beats its defects',
    superseded rows do not count."""
    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[1], "confirmed", by="anna")
        review_images(session, [ids[1]], "pass", by="ben")  # explicit: beats the confirmed defect
        review_defects(session, defects[3], "confirmed", by="anna")
        review_defects(session, defects[3], "false-call", by="ben")  # supersedes: image 3 decided pass
        review_defects(session, defects[5], "confirmed", by="anna")
        review_images(session, [ids[0], ids[4]], "fail", by="ben")
        review_images(session, [ids[4]], "pass", by="lead")
        decided = decided_images(session, Filters(lot="R1"))
        [figures] = review_figures(session, Filters(lot="R1")).values()
        assert review_figures(session, Filters(lot="R1"), lots={"R2"}) == {}
    by_hand = {"failed_reviewed": 0, "false_calls": 0, "passed_reviewed": 0, "escapes": 0}
    for d in decided:
        kind = "failed" if d.verdict == "fail" else "passed"
        by_hand[f"{kind}_reviewed"] += 1
        by_hand["false_calls" if kind == "failed" else "escapes"] += d.decision != d.verdict
    assert {k: getattr(figures, k) for k in by_hand} == by_hand == {"failed_reviewed": 3, "false_calls": 2, "passed_reviewed": 2, "escapes": 1}
    n = {p: len(defects[p]) for p in (1, 3, 5)}
    assert (figures.defects_reviewed, figures.defects_confirmed) == (n[1] + n[3] + n[5], n[1] + n[5])


def test_a_redo_of_the_same_version_keeps_qas_decisions_and_exports_nothing_qa_did_not_see(factory, cluster, lot, tmp_path):
    """`inspect --force` replaced the defects: QA's decisions on them lost their defect and dropped out of the figures,
    the queue and the export, and an explicit `fail` then painted the redo's defects, which QA never saw."""
    from defectscan.db.schema import Model
    from defectscan.review.export import export_reviewed

    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[1], "confirmed", by="anna", note="crack")
        review_defects(session, defects[3], "false-call", by="anna")
        review_images(session, [ids[5]], "fail", by="ben")  # its defect undecided: QA saw it on this inspection
        before = [(d.image_id, d.decision) for d in decided_images(session, Filters(lot="R1"))]
        [figures_before] = review_figures(session, Filters(lot="R1")).values()
        model = session.scalar(select(Model))
        image_set = session.get(Image, ids[0]).image_set
    assert export_reviewed(factory(), tmp_path / "first", Filters(lot="R1")).defective == 2  # images 1 and 5

    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    assert inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2, force=True).status == "succeeded"
    with factory() as session:
        assert [(d.image_id, d.decision) for d in decided_images(session, Filters(lot="R1"))] == before
        [figures_after] = review_figures(session, Filters(lot="R1")).values()
        carried = session.scalars(select(DefectReview).where(DefectReview.note.like("carried from defect%"))).all()
    assert figures_after == figures_before
    assert sorted((r.image_id, r.decision, r.reviewer) for r in carried) == sorted(
        [(ids[1], "confirmed", "anna")] * len(defects[1]) + [(ids[3], "false-call", "anna")] * len(defects[3]))
    assert any(r.note.endswith(": crack") for r in carried)
    with factory() as session:
        looked_at = session.scalar(select(ImageReview.inspection_id).where(ImageReview.image_id == ids[5]))
        assert looked_at == session.scalar(select(Inspection.id).where(Inspection.image_id == ids[5]))  # the redo's, not NULL
    again = export_reviewed(factory(), tmp_path / "again", Filters(lot="R1"))
    assert again.defective == 2 and again.skipped == []  # image 5's explicit fail still paints its (redone) defect

    # A redo that cannot read an image keeps its verdict and QA's decisions (replaced by an error, they were lost for good).
    from pipeline_helpers import corrupt_chunk

    import zarr

    def score_map():
        with factory() as session:
            inspection = session.scalar(select(Inspection).where(Inspection.image_id == ids[1]))
        return np.asarray(zarr.open_group(inspection.mask_uri, mode="r")[inspection.mask_array][1])

    recorded_map = score_map()
    good = corrupt_chunk(image_set.uri, 1)
    partial = inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2, force=True)
    assert partial.status == "partial" and partial.counts.errors == 1
    with factory() as session:
        assert session.scalar(select(Inspection.verdict).where(Inspection.image_id == ids[1])) == "fail"
        assert [(d.image_id, d.decision) for d in decided_images(session, Filters(lot="R1"))] == before
        assert session.get(JobRun, partial.job_run_id).n_errors == 1  # the kept image's error is in the run's row too
    np.testing.assert_array_equal(score_map(), recorded_map)  # and its map is the one its verdict came from, not a blank one
    (Path(image_set.uri) / "images" / "c" / "1" / "0" / "0").write_bytes(good)


def test_an_image_decision_records_the_production_versions_inspection_not_a_shadow_candidates(factory, cluster, lot, tmp_path):
    """A candidate inspects the lot after production (models compare): the newest inspection was the candidate's, so an
    explicit fail QA made from production's queue went with the candidate's defects, never shown to QA."""
    from defectscan.db.schema import Model
    from defectscan.model.stages import promote
    from defectscan.review.export import export_reviewed

    ids, _ = lot
    with factory() as session:
        promote(session, "threshold:1", reason="first", by="ml")
        image_set = session.get(Image, ids[0]).image_set
    candidate = add_model(factory, save_threshold_model(tmp_path / "candidate.keras"), version="2")
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    assert inspect_image_sets(factory, cluster, candidate, [image_set], settings, max_in_flight=2).status == "succeeded"
    with factory() as session:
        review_images(session, [ids[5]], "fail", by="qa")
        production = session.scalar(select(Inspection.id).join(Model).where(Inspection.image_id == ids[5], Model.version == "1"))
        assert session.scalar(select(ImageReview.inspection_id)) == production
        assert export_reviewed(session, tmp_path / "v1", Filters(lot="R1", model="threshold:1")).defective == 1
        with pytest.raises(DataError, match="nothing to export"):
            export_reviewed(session, tmp_path / "v2", Filters(lot="R1", model="threshold:2"))
        review_images(session, [ids[5]], "fail", by="qa", model="threshold:2")  # QA looked at the candidate's this time
        assert export_reviewed(session, tmp_path / "v2", Filters(lot="R1", model="threshold:2")).defective == 1
        with pytest.raises(DataError, match=r"image \d+ has not been inspected by threshold:3"):
            add_model(factory, save_threshold_model(tmp_path / "c3.keras"), version="3")
            review_images(session, [ids[5]], "pass", model="threshold:3")


def test_a_newer_decision_supersedes_and_both_are_kept(factory, lot, cli, migrated_url):
    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[3], "confirmed", by="anna")
        review_defects(session, defects[3], "false-call", by="ben", note="looked again: dust")
        assert [d.decision for d in decided_images(session, Filters(lot="R1"))] == ["pass"]
    assert _count(factory, DefectReview) == 2
    listed = cli("--database-url", migrated_url, "review", "list", "--lot", "R1", "--format", "json")
    rows = json.loads(listed.output)
    assert [(r["decision"], r["reviewer"], r["current"]) for r in rows] == [("false-call", "ben", True), ("confirmed", "anna", False)]
    window = ("review", "list", "--since", "2026-03-01", "--until", "2026-03-01", "--format", "json")  # the lot's capture day
    assert json.loads(cli("--database-url", migrated_url, *window).output) == rows
    later = cli("--database-url", migrated_url, "review", "list", "--since", "2026-03-02", "--format", "json")
    assert later.exit_code == 0 and "no decisions match" in later.output
    with factory() as session:  # the model's results are untouched
        assert session.scalar(select(func.count()).select_from(Defect)) == sum(len(v) for v in defects.values())
        assert session.scalar(select(Inspection.verdict).where(Inspection.image_id == ids[3])) == "fail"


def test_the_queue_lists_failed_images_and_a_reproducible_sample_of_passed_ones(factory, lot, cli, migrated_url):
    ids, defects = lot
    first = cli("--database-url", migrated_url, "review", "queue", "--lot", "R1", "--sample-passed", "3", "--format", "json")
    assert first.exit_code == 0, first.output
    rows = json.loads(first.output)
    failed = [r["image_id"] for r in rows if r["why"] == "failed"]
    sampled = [r["image_id"] for r in rows if r["why"] == "sampled pass"]
    assert failed == sorted(ids[p] for p in SQUARES) and len(sampled) == 3
    assert set(sampled) <= {ids[p] for p in range(12) if p not in SQUARES}
    with factory() as session:
        review_images(session, [ids[1], sampled[0]], "fail", by="anna")
    again = json.loads(cli("--database-url", migrated_url, "review", "queue", "--lot", "R1", "--sample-passed", "3", "--format", "json").output)
    assert [r["image_id"] for r in again] == [i for i in failed if i != ids[1]] + sampled[1:]  # same sample, decided ones gone
    other = json.loads(cli("--database-url", migrated_url, "review", "queue", "--lot", "R1", "--sample-passed", "3", "--seed", "1",
                           "--format", "json").output)
    assert [r["image_id"] for r in other if r["why"] == "sampled pass"] != sampled[1:]


def test_export_writes_a_dagm_set_that_the_dataset_readers_accept(factory, lot, tmp_path, cli, migrated_url, monkeypatch):
    from defectscan.data.dagm import read_dagm

    ids, defects = lot
    mask = np.zeros((64, 64), np.uint8)
    mask[MISSED] = 1
    mask_file = tmp_path / "missed.png"
    from PIL import Image as PILImage

    PILImage.fromarray(mask * 255).save(mask_file)
    run = lambda *args: cli("--database-url", migrated_url, *args)  # noqa: E731
    # each decision names the image it went on: an inspection id from `images list` is easily taken for an image id
    confirmed = run("review", "defects", *map(str, defects[1]), "--as", "confirmed")
    assert confirmed.output == f"recorded {len(defects[1])} defect decision(s): confirmed, on\n  image {ids[1]}: lot R1, 1\n"
    assert run("review", "images", str(ids[3]), "--as", "pass", "--note", "dust").exit_code == 0
    recorded = run("review", "images", str(ids[6]), "--as", "fail", "--mask", str(mask_file), "--class", "scratch")
    assert recorded.output == f"recorded 1 image decision(s): fail with a drawn scratch mask\n  image {ids[6]}: lot R1, 6\n"
    assert run("review", "images", str(ids[0]), "--as", "pass").exit_code == 0

    out = tmp_path / "reviewed"
    exported = run("review", "export", "--lot", "R1", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    assert exported.output.startswith(f"wrote 4 reviewed images (2 with defects) of threshold:1 to {out}")
    images = read_dagm(out, split="Train")
    assert len(images) == 4 and sum(images.defective) == 2 and not images.problems
    manifest = json.loads((out / "export.json").read_text())
    by_image = {entry["image_id"]: entry for entry in manifest["images"]}
    assert set(by_image) == {ids[0], ids[1], ids[3], ids[6]}
    labels = {key: images.load(i)[1] for i, key in enumerate(images.keys)}
    label_of = lambda image_id: labels[next(k for k in labels if k.endswith(by_image[image_id]["file"].split("/")[-1]))]  # noqa: E731
    y, x, side = SQUARES[1]
    assert label_of(ids[1])[y : y + side, x : x + side].all() and label_of(ids[1]).sum() == side * side
    assert label_of(ids[6])[MISSED].all() and label_of(ids[6]).sum() == 3 * 20 and by_image[ids[6]]["classes"] == ["scratch"]
    assert not label_of(ids[3]).any() and not label_of(ids[0]).any()

    refused = run("review", "export", "--lot", "R1", "--out", str(out))
    assert refused.exit_code == 1 and "folder is not empty; give --force" in refused.output
    # A second look at image 6, failed again with a note: the drawn mask stays where QA put it.
    assert run("review", "images", str(ids[6]), "--as", "fail", "--note", "second look, still bad").exit_code == 0
    again = run("review", "export", "--lot", "R1", "--out", str(out), "--force")
    assert again.exit_code == 0 and again.output.startswith("wrote 4 reviewed images (2 with defects)"), again.output
    reread = read_dagm(out, split="Train")
    manifest = {entry["image_id"]: entry["file"] for entry in json.loads((out / "export.json").read_text())["images"]}
    assert reread.load(next(i for i, key in enumerate(reread.keys) if key.endswith(manifest[ids[6]].split("/")[-1])))[1][MISSED].all()
    # A scope that names nothing (a mistyped lot) leaves the earlier export whole, --force or not.
    typo = run("review", "export", "--lot", "R7", "--out", str(out), "--force")
    assert typo.exit_code == 1 and "unknown lot 'R7'" in typo.output
    assert len(read_dagm(out, split="Train")) == 4 and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    link = tmp_path / "link"
    link.symlink_to(out)
    linked = run("review", "export", "--lot", "R1", "--out", str(link), "--force")
    assert linked.exit_code == 1 and "is a symbolic link" in linked.output and not (tmp_path / ".link.partial").exists()
    link.unlink()
    monkeypatch.chdir(out)  # `--out .` inside the earlier export: "PosixPath('.') has an empty name"
    from defectscan.review.export import export_reviewed

    with factory() as session:
        assert export_reviewed(session, ".", Filters(lot="R1"), force=True).images == 4
    monkeypatch.chdir(tmp_path)
    assert {e["key"] for e in json.loads((out / "export.json").read_text())["images"]} == {"0", "1", "3", "6"}  # serial numbers too
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"x")
    refused = run("review", "export", "--lot", "R1", "--out", str(stranger), "--force")
    assert refused.exit_code == 1 and "not an earlier export" in refused.output and (stranger / "holiday.jpg").exists()


def test_an_export_of_images_of_two_sizes_is_refused_naming_them(factory, cluster, lot, tmp_path):
    """`data check` and training kept the most common size and skipped the other reviewed images, unsaid by the export."""
    from defectscan.db.schema import Model
    from defectscan.review.export import export_reviewed

    ids, _ = lot
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    small = register(factory, write_stack(tmp_path / "R2.zarr", square_images(4, size=32, seed=3), lot="R2", line="A"))
    with factory() as session:
        model = session.scalar(select(Model))
    assert inspect_image_sets(factory, cluster, model, [small], settings, max_in_flight=2).status == "succeeded"
    with factory() as session:
        other = session.scalar(select(Image.id).where(Image.image_set_id == small.id, Image.position == 0))
        review_images(session, [ids[0], ids[2], other], "pass", by="qa")
        with pytest.raises(DataError, match=rf"have 2 sizes \(64x64: 2 image\(s\), e.g. image {ids[0]}; 32x32: 1 image\(s\), e.g. image {other}\)"):
            export_reviewed(session, tmp_path / "out", Filters(line="A"))
        assert export_reviewed(session, tmp_path / "out", Filters(lot="R1")).images == 2
    assert not (tmp_path / ".out.partial").exists()


def test_an_image_whose_chunk_is_gone_is_neither_drawn_nor_exported_as_black(factory, lot, cli, migrated_url, tmp_path):
    """Zarr reads a chunk that is not stored as zeros: overlays were drawn on black and the export wrote a black
    picture labelled as the image (to train on), where inspection records such an image as an error."""
    from defectscan.review.export import export_reviewed

    ids, defects = lot
    with factory() as session:
        review_images(session, [ids[0]], "pass", by="qa")
        review_defects(session, defects[1], "confirmed", by="qa")
    (tmp_path / "R1.zarr" / "images" / "c" / "0" / "0" / "0").unlink()
    with factory() as session:
        exported = export_reviewed(session, tmp_path / "out", Filters(lot="R1"))
    assert exported.images == 1 and exported.skipped == [
        f"image {ids[0]}: {tmp_path / 'R1.zarr'}: image 0 of 'images' is not stored: 1 chunk(s) missing: (0, 0, 0)"]
    by_cli = cli("--database-url", migrated_url, "review", "export", "--lot", "R1", "--out", str(tmp_path / "out"), "--force")
    assert by_cli.exit_code == 3 and "left out image" in by_cli.output  # partial: a script must not take it for all of them
    (tmp_path / "R1.zarr").rename(tmp_path / "moved.zarr")  # the store itself unreadable: the export stops, the earlier one stays
    moved = cli("--database-url", migrated_url, "review", "export", "--lot", "R1", "--out", str(tmp_path / "out"), "--force")
    assert moved.exit_code == 1 and (tmp_path / "out" / "export.json").is_file()
    (tmp_path / "moved.zarr").rename(tmp_path / "R1.zarr")
    shown = cli("--database-url", migrated_url, "images", "show", str(ids[0]), "--overlay", str(tmp_path / "o.png"))
    assert shown.exit_code == 1 and "image 0 of 'images' is not stored" in shown.output and not (tmp_path / "o.png").exists()


def test_bad_review_input_is_one_line_and_records_nothing(factory, lot, cli, migrated_url, tmp_path):
    ids, defects = lot
    run = lambda *args: cli("--database-url", migrated_url, *args)  # noqa: E731
    missing = run("review", "defects", str(defects[1][0]), "999999", "--as", "confirmed")
    assert (missing.exit_code, missing.output) == (1, "Error: no defect with id 999999; nothing was recorded\n")
    missing = run("review", "images", "999998", "--as", "pass")
    assert (missing.exit_code, missing.output) == (1, "Error: no image with id 999998; nothing was recorded\n")
    with factory() as session:
        with pytest.raises(DataError, match="a drawn mask needs --class"):
            review_images(session, [ids[6]], "fail", mask=np.ones((64, 64)))
        with pytest.raises(DataError, match="the mask is 32x32, image .* is 64x64"):
            review_images(session, [ids[6]], "fail", mask=np.ones((32, 32)), class_name="scratch")
        with pytest.raises(DataError, match="goes with --as fail"):
            review_images(session, [ids[6]], "pass", mask=np.ones((64, 64)), class_name="scratch")
        with pytest.raises(DataError, match="marks no pixel"):
            review_images(session, [ids[6]], "fail", mask=np.zeros((64, 64)), class_name="scratch")
        with pytest.raises(DataError, match="marks every pixel of the image"):
            review_images(session, [ids[6]], "fail", mask=np.ones((64, 64)), class_name="scratch")
    fresh = register(factory, write_stack(tmp_path / "R2.zarr", square_images(2, size=64), lot="R2"))
    with factory() as session:
        uninspected = session.scalar(select(Image.id).where(Image.image_set_id == fresh.id, Image.position == 1))
    never = run("review", "images", str(ids[0]), str(uninspected), "--as", "pass")
    assert (never.exit_code, never.output) == (1, f"Error: image {uninspected} has not been inspected: nothing to review yet; nothing was recorded\n")
    assert _count(factory, DefectReview) == 0 and _count(factory, ImageReview) == 0
    unknown = run("review", "queue", "--lot", "R9")
    assert unknown.exit_code == 1 and "unknown lot 'R9'" in unknown.output
    nothing = run("review", "export", "--lot", "R1", "--out", str(tmp_path / "x"))
    assert nothing.exit_code == 1 and "no reviewed image in scope (lot R1)" in nothing.output
    # failed by QA with nothing saying where: an empty set exited 0 (and, with --force, replaced an earlier export)
    assert run("review", "images", str(ids[0]), "--as", "fail").exit_code == 0
    empty = run("review", "export", "--lot", "R1", "--out", str(tmp_path / "x"))
    assert empty.exit_code == 1 and not (tmp_path / "x").exists()
    assert f"nothing to export in scope (lot R1): image {ids[0]}: QA failed it, but no confirmed defect or drawn mask" in empty.output
    huge = run("review", "images", "99999999999999999999", "--as", "pass")  # was an OverflowError from SQLite
    assert huge.exit_code == 2 and "is not in the range 1<=x<=9223372036854775807" in huge.output
    seed = run("review", "queue", "--lot", "R1", "--seed", "-1")
    assert seed.exit_code == 2 and "Invalid value for '--seed'" in seed.output


def test_a_drawn_mask_with_transparency_marks_only_what_was_drawn(tmp_path):
    """An editor's transparent white background read as luminance alone marked the whole image as the defect."""
    from PIL import Image as PILImage

    from defectscan.data.imagefiles import read_mask

    drawing = np.zeros((64, 64, 4), np.uint8)
    drawing[...] = (255, 255, 255, 0)  # white under full transparency
    drawing[10:20, 5:35] = (255, 0, 0, 255)  # the stroke
    PILImage.fromarray(drawing, "RGBA").save(tmp_path / "stroke.png")
    marked = read_mask(tmp_path / "stroke.png") > 0
    assert marked.sum() == 300 and marked[10:20, 5:35].all()
    opaque = drawing.copy()
    opaque[..., 3] = 255
    opaque[opaque[..., 1] == 255] = (0, 0, 0, 255)  # black background, opaque: luminance decides
    PILImage.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert (read_mask(tmp_path / "opaque.png") > 0).sum() == 300


def test_a_decision_on_an_inspection_replaced_meanwhile_is_one_line_and_records_nothing(factory, lot, monkeypatch):
    """`inspect --force` deleted the inspection between the look-up and the write: an IntegrityError reached the user."""
    from defectscan.review import record

    ids, _ = lot
    monkeypatch.setattr(record, "_looked_at", lambda session, image_ids, model: {i: 10**9 for i in image_ids})  # gone meanwhile
    with factory() as session:
        with pytest.raises(DataError, match=r"^what was decided on was re-inspected meanwhile \(inspect --force\); nothing was recorded"):
            review_images(session, [ids[0]], "pass", by="qa")
    assert _count(factory, ImageReview) == 0


def test_concurrent_reviews_of_one_defect_keep_both_and_the_newest_stands(factory, lot, migrated_url):
    ids, defects = lot
    target = defects[5][0]
    script = ("import sys; from defectscan.db.session import make_engine, session_factory; from defectscan.review.record import review_defects;"
              "s = session_factory(make_engine(sys.argv[1]))(); review_defects(s, [int(sys.argv[2])], sys.argv[3], by=sys.argv[4])")
    processes = [subprocess.Popen([sys.executable, "-c", script, migrated_url, str(target), decision, who])
                 for decision, who in (("confirmed", "anna"), ("false-call", "ben"))]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    with factory() as session:
        rows = session.scalars(select(DefectReview).where(DefectReview.defect_id == target).order_by(DefectReview.id)).all()
        assert len(rows) == 2
        [decided] = [d for d in decided_images(session, Filters(lot="R1")) if d.image_id == ids[5]]
        assert decided.defect_decisions[target] == rows[-1].decision
    assert _rollup_rows(factory) == _recounted(factory) != []  # the second recount saw the first decision


def test_wilson_interval():
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.15 < high < 0.17
    low, high = wilson_interval(10, 20)
    assert low == pytest.approx(0.299, abs=1e-3) and high == pytest.approx(0.701, abs=1e-3)


def test_images_list_shows_qa_decisions(factory, lot, cli, migrated_url):
    ids, defects = lot
    with factory() as session:
        review_images(session, [ids[8]], "pass", by="ben")
        review_defects(session, defects[1], "confirmed", by="anna")
    rows = json.loads(cli("--database-url", migrated_url, "images", "list", "--lot", "R1", "--format", "json").output)
    qa = {row["image_id"]: row["qa"] for row in rows}
    assert qa[ids[8]] == "pass" and qa[ids[1]] == "fail" and qa[ids[3]] is None and qa[ids[0]] is None


def test_the_report_shows_qa_figures_and_flags_a_lot_whose_false_call_rate_is_out_of_control(factory, cluster, lot, tmp_path):
    """Line A: lot R1 (the fixture) and lots R2..R5, 5 failed images each. QA confirms every failed image of
    R2..R5 and passes all 5 of R1: R1's false-call rate (1.0) is above its p-chart's upper limit (0.2 + 3 sigma = 0.737)."""
    from defectscan.report.build import ReportOptions, Scope, build_report

    ids, defects = lot
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    with factory() as session:
        from defectscan.db.schema import Model

        model = session.scalars(select(Model)).one()
    for n in range(2, 6):
        store = write_stack(tmp_path / f"R{n}.zarr", square_images(12, size=64, defects=SQUARES, seed=10 + n), lot=f"R{n}", line="A")
        inspect_image_sets(factory, cluster, model, [register(factory, store)], settings, max_in_flight=2)
    with factory() as session:
        failed = session.execute(select(Image.id, Image.image_set_id).join(Inspection, Inspection.image_id == Image.id)
                                 .where(Inspection.verdict == "fail").order_by(Image.id)).all()
        by_set: dict[int, list[int]] = {}
        for image_id, set_id in failed:
            by_set.setdefault(set_id, []).append(image_id)
        for set_id, images in by_set.items():
            review_images(session, images, "pass" if ids[1] in images else "fail", by="qa")
        review_defects(session, defects[3], "false-call", by="qa")  # image 3 is passed already: its defect adds to the class figures only
        html = build_report(session, Scope(line="A"), ReportOptions()).html
    section = " ".join(html.split('id="qa-review"', 1)[1].split("</section>", 1)[0].split())
    assert "false-call rate 0.200 (5 of 25 reviewed failed images passed by QA)" in section
    assert "False-call rate out of control: R1 (1.000 above UCL" in section
    (tmp_path / "report.html").write_text(html)
    assert "<tr class=\"signal\"><td>R1</td>" in section, section[:3000]
    assert "<svg" in section
    assert "Per defect class" in section and "Per production line" not in section  # one line in scope: its figures are the total
    assert f"<td class=\"n\">{len(defects[3])}</td><td class=\"n\">0</td><td class=\"n\">{len(defects[3])}</td>" in section


def _rollup_rows(factory) -> list[tuple]:
    from defectscan.db.schema import ReviewDaily

    with factory() as session:
        return [tuple(getattr(r, c.key) for c in ReviewDaily.__table__.columns)
                for r in session.scalars(select(ReviewDaily).order_by(ReviewDaily.image_set_id, ReviewDaily.model_id, ReviewDaily.day))]


def _recounted(factory) -> list[tuple]:
    """review_daily as a recount from scratch gives it (in a transaction rolled back)."""
    from defectscan.db.reviews import refresh_review_daily_of_sets
    from defectscan.db.schema import ImageSet, ReviewDaily

    with factory() as session:
        refresh_review_daily_of_sets(session, list(session.scalars(select(ImageSet.id))))
        rows = [tuple(getattr(r, c.key) for c in ReviewDaily.__table__.columns)
                for r in session.scalars(select(ReviewDaily).order_by(ReviewDaily.image_set_id, ReviewDaily.model_id, ReviewDaily.day))]
        session.rollback()
    return rows


def _listed_figures(factory, filters: Filters) -> dict:
    from defectscan.db.queries import list_lots
    from defectscan.db.reviews import REVIEW_COLUMNS, add_review_figures

    with factory() as session:
        rows = list_lots(session, filters).rows
        add_review_figures(session, rows, filters)
        live = {k[0]: f.as_row() for k, f in review_figures(session, filters).items()}
    return {row["lot"]: {c: row[c] for c in REVIEW_COLUMNS} for row in rows}, live


def test_the_lots_listing_reads_a_rollup_that_stays_equal_to_a_recount(factory, lot, cluster, tmp_path):
    import datetime as dt

    from defectscan.db.schema import ImageSet

    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[1] + defects[5], "confirmed", by="anna")
        review_defects(session, defects[3], "false-call", by="anna")
        review_images(session, [ids[8]], "pass", by="ben")
        review_images(session, [ids[0], ids[6]], "fail", by="ben")
    assert _rollup_rows(factory) == _recounted(factory) != []
    listed, live = _listed_figures(factory, Filters())
    assert listed["R1"] == live["R1"] and listed["R1"]["false_calls"] == 2 and listed["R1"]["escapes"] == 2
    # a window with a partial day at its edge: whole days from the rollup, the edge from the decisions
    for since in (dt.datetime(2026, 2, 28, 7, tzinfo=dt.UTC), dt.datetime(2026, 3, 1, 7, tzinfo=dt.UTC)):
        listed, live = _listed_figures(factory, Filters(since=since))
        assert listed["R1"] == live["R1"] and listed["R1"]["false_calls"] == 2

    # inspected again (--force): the model's defects are replaced and QA's decisions carried to the new ones
    before = _listed_figures(factory, Filters())[0]["R1"]
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4"}).inspection
    with factory() as session:
        image_set = session.scalars(select(ImageSet)).one()
        model = session.get(Inspection, session.scalar(select(Inspection.id))).model
    assert inspect_image_sets(factory, cluster, model, [image_set], settings, max_in_flight=2, force=True).status == "succeeded"
    assert _rollup_rows(factory) == _recounted(factory)
    listed, live = _listed_figures(factory, Filters())
    assert listed["R1"] == live["R1"] == before and (listed["R1"]["failed_reviewed"], listed["R1"]["defects_reviewed"]) == (4, 3)


def test_a_decision_committed_while_another_version_records_results_is_counted_in_the_rollup(factory, lot, cluster, tmp_path, database_url):
    """The pipeline's recording waits for an open decision's recount (PostgreSQL: the image set's lock), then sees
    the decision and recounts with its own new results, so review_daily stays equal to a recount."""
    import threading
    import time

    from defectscan.db.reviews import lock_for_recount, refresh_review_daily_of_sets
    from defectscan.db.schema import ImageSet

    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: the two transactions cannot overlap")
    ids, defects = lot
    other = add_model(factory, save_threshold_model(tmp_path / "other.keras"), name="other")
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "12"}).inspection
    with factory() as deciding:
        [image_set] = deciding.scalars(select(ImageSet)).all()
        lock_for_recount(deciding, [image_set.id])
        inspection = deciding.scalar(select(Inspection.id).where(Inspection.image_id == ids[3]))
        deciding.add(ImageReview(image_id=ids[3], inspection_id=inspection, decision="pass", reviewer="anna"))
        deciding.flush()
        refresh_review_daily_of_sets(deciding, [image_set.id])
        outcome = []
        recording = threading.Thread(target=lambda: outcome.append(inspect_image_sets(factory, cluster, other, [image_set], settings, max_in_flight=1)))
        recording.start()
        time.sleep(3)
        assert recording.is_alive(), "the recording did not wait for the open decision's recount"
        deciding.commit()
    recording.join(timeout=120)
    assert outcome and outcome[0].status == "succeeded"
    rows = _rollup_rows(factory)
    assert rows == _recounted(factory) != []



def test_review_list_pages_hold_every_decision_once_in_time_order_when_clocks_disagree_with_insert_order(factory, lot):
    import datetime as dt

    from sqlalchemy import update

    from defectscan.db.reviews import list_reviews

    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[1] + defects[3] + defects[5], "confirmed", by="anna")
        review_images(session, [ids[0], ids[2], ids[4], ids[6]], "pass", by="ben")
    # ben's clock runs ahead: his decisions, inserted later, carry times older and newer than anna's
    base = dt.datetime(2026, 3, 2, 12, tzinfo=dt.UTC)
    with factory.begin() as session:
        for n, review_id in enumerate(session.scalars(select(DefectReview.id).order_by(DefectReview.id))):
            session.execute(update(DefectReview).where(DefectReview.id == review_id).values(reviewed_at=base + dt.timedelta(minutes=10 * n)))
        for n, review_id in enumerate(session.scalars(select(ImageReview.id).order_by(ImageReview.id))):
            session.execute(update(ImageReview).where(ImageReview.id == review_id).values(reviewed_at=base + dt.timedelta(minutes=25 - 10 * n, seconds=1)))
    with factory() as session:
        whole = list_reviews(session, limit=100).rows
        paged, offset = [], 0
        while True:
            page = list_reviews(session, limit=2, offset=offset)
            paged += page.rows
            offset += 2
            if not page.more:
                break
    keys = [(row["kind"], row["id"]) for row in paged]
    assert keys == [(row["kind"], row["id"]) for row in whole] and len(set(keys)) == len(keys) == len(whole)
    times = [row["reviewed_at"] for row in paged]
    assert times == sorted(times, reverse=True)


def test_qa_figures_of_a_class_filtered_listing(factory, lot, cli, migrated_url):
    """`lots list --class NAME` with QA decisions: the class filter's subquery on defects stood next to the
    figures' own defects and was correlated away (an InvalidRequestError)."""
    ids, defects = lot
    with factory() as session:
        review_defects(session, defects[3], "false-call", by="anna")
        review_defects(session, defects[1], "confirmed", by="anna")
    listed, live = _listed_figures(factory, Filters(defect_class="defect"))
    assert listed["R1"]["false_calls"] == 1 and listed["R1"]["defects_reviewed"] == len(defects[1]) + len(defects[3])
    shown = cli("--database-url", migrated_url, "lots", "list", "--class", "defect", "--format", "json")
    assert shown.exit_code == 0, shown.output
    [row] = json.loads(shown.output)
    assert (row["lot"], row["false_calls"], row["failed_reviewed"]) == ("R1", 1, 2)

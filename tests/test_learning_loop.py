"""The learning loop end to end on the embedded default's parts (SQLite and PostgreSQL), through the CLI as a
plant runs it: inspect a lot, review it (a false call, a missed defect), export, fine-tune from the production
version with the export, compare, promote, and the next `jobs run` uses the new version."""

from __future__ import annotations

import json

import numpy as np
import yaml
from sqlalchemy import select

from defectscan.db.schema import Image, Inspection, JobRun, Model

from jobs_helpers import write_spec
from pipeline_helpers import register, square_images, write_stack

SMALL = (8, 8, 16, 16, 32)


def test_inspect_review_export_finetune_compare_promote_and_the_next_job_uses_it(factory, cli, migrated_url, cluster, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from defectscan.model.unet import build_model

    monkeypatch.setenv("DEFECTSCAN_INSPECTION__BATCH_SIZE", "4")
    monkeypatch.setenv("DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD", "4")
    run = lambda *args: cli("--database-url", migrated_url, *args)  # noqa: E731
    scheduler = cluster.scheduler.address
    first = build_model(filters=SMALL, seed=0)
    first.build((None, None, None, 1))
    first.save(tmp_path / "v1.keras")
    assert run("models", "register", str(tmp_path / "v1.keras"), "--name", "line", "--version", "1").exit_code == 0
    assert run("models", "promote", "line:1", "--reason", "first version").exit_code == 0
    store = write_stack(tmp_path / "incoming" / "P1.zarr", square_images(8, size=64, defects={1: (8, 8, 10), 5: (30, 30, 12)}, seed=3),
                        lot="P1", line="A")
    image_set = register(factory, store)
    inspected = run("inspect", "--model", "line:production", "--imageset", str(image_set.id), "--scheduler", scheduler, "--no-progress")
    assert inspected.exit_code == 0, inspected.output

    # QA: image 0 is good (a false call if the model failed it), image 5 has a defect (drawn), image 1 too.
    with factory() as session:
        verdicts = dict(session.execute(select(Image.position, Inspection.verdict).join(Inspection, Inspection.image_id == Image.id)).all())
        ids = dict(session.execute(select(Image.position, Image.id)).all())
    mask = np.zeros((64, 64), np.uint8)
    mask[30:42, 30:42] = 255
    PILImage.fromarray(mask).save(tmp_path / "missed.png")
    assert run("review", "images", str(ids[0]), "--as", "pass", "--by", "qa").exit_code == 0
    assert run("review", "images", str(ids[5]), "--as", "fail", "--mask", str(tmp_path / "missed.png"), "--class", "defect").exit_code == 0
    mask[:] = 0
    mask[8:18, 8:18] = 255
    PILImage.fromarray(mask).save(tmp_path / "drawn-1.png")
    assert run("review", "images", str(ids[1]), "--as", "fail", "--mask", str(tmp_path / "drawn-1.png"), "--class", "defect").exit_code == 0
    failed_reviewed = [p for p in (0, 1, 5) if verdicts[p] == "fail"]
    by_hand = (sum(1 for p in failed_reviewed if p == 0) / len(failed_reviewed)) if failed_reviewed else None
    [lot_row] = json.loads(run("lots", "list", "--format", "json").output)
    assert lot_row["false_call_rate"] == (None if by_hand is None else round(by_hand, 4))
    assert lot_row["passed_reviewed"] == sum(1 for p in (0, 1, 5) if verdicts[p] == "pass")

    exported = run("review", "export", "--lot", "P1", "--out", str(tmp_path / "reviewed"))
    assert exported.exit_code == 0 and "wrote 3 reviewed images (2 with defects)" in exported.output, exported.output
    recipe = {"model": {"variant": "tinyunet", "filters": list(SMALL), "name": "line", "version": "2", "init_from": "line:production"},
              "data": {"format": "dagm", "crop_size": 32, "cache": "memory"}, "optimizer": {"learning_rate": 1e-3},
              "train": {"batch_size": 2, "steps": 3, "checkpoint_every": 3, "log_every": 1, "seed": 0}, "validation": {"fraction": None}}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(recipe))
    trained = run("train", str(tmp_path / "finetune.yaml"), "--data", str(tmp_path / "reviewed"), "--out", str(tmp_path / "v2"), "--quiet")
    assert trained.exit_code == 0, trained.output
    assert f"starting from the weights of line:1 ({tmp_path / 'v1.keras'})" in trained.output  # the version in production
    assert run("models", "register", str(tmp_path / "v2" / "model.keras"), "--name", "line", "--version", "2").exit_code == 0

    refused = run("models", "promote", "line:2", "--reason", "trained on QA's decisions")
    assert refused.exit_code == 1 and "never compared" in refused.output
    compared = run("models", "compare", "line:2", "--against", "line:production", "--lot", "P1", "--scheduler", scheduler)
    assert compared.exit_code == 0 and "line:2 against line:1 on 8 images (P1)" in compared.output, compared.output
    assert run("models", "promote", "line:2", "--reason", "trained on QA's decisions").output.startswith("line:2 is in production; line:1 archived\njobs on line:production inspect with it")

    # The next night's lot arrives; the line's job runs NAME:production.
    write_stack(tmp_path / "incoming" / "P2.zarr", square_images(8, size=64, seed=5), lot="P2", line="A")
    write_spec(tmp_path / "jobs", "line-a", source={"glob": str(tmp_path / "incoming" / "*.zarr")}, model="line:production",
               cluster={"scheduler": scheduler})
    job = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path / "jobs"), "run", "line-a")
    assert job.exit_code == 0, job.output
    with factory() as session:
        ran = session.scalars(select(JobRun).where(JobRun.job == "line-a")).one()
        assert session.get(Model, ran.model_id).version == "2"
        versions = set(session.scalars(
            select(Model.version).join(Inspection, Inspection.model_id == Model.id).join(Image, Inspection.image_id == Image.id)
            .where(Image.image_set_id != image_set.id)
        ))
        assert versions == {"2"}

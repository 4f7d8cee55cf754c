"""An image set in an S3 bucket (moto's S3-compatible server, started here): registered from the CLI by its
s3:// URL and inspected on worker processes that read it, and write its score maps, through s3fs."""

from __future__ import annotations

import socket
import uuid

import numpy as np
import pytest
from sqlalchemy import select

from defectscan.config import load_settings
from defectscan.db.schema import Image, Inspection
from defectscan.pipeline.run import inspect_image_sets

from pipeline_helpers import add_model, save_threshold_model, square_images

pytest.importorskip("s3fs", reason="s3fs comes with the [s3] extra, which [dev] includes")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (the [dev] extra)")

DEFECTS = {2: (10, 10, 6), 5: (20, 20, 8)}


@pytest.fixture(scope="module")
def s3_environment():
    """A local S3 endpoint and the AWS_* variables that point s3fs (and botocore) at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    yield env
    server.stop()


def test_a_store_in_a_bucket_is_registered_and_inspected(s3_environment, monkeypatch, migrated_url, factory, cli, tmp_path):
    import s3fs
    import zarr
    from distributed import Client, LocalCluster

    for name, value in s3_environment.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"plant-{uuid.uuid4().hex[:8]}"  # the server is shared by the test's SQLite and PostgreSQL runs
    s3fs.S3FileSystem().mkdir(bucket)
    uri = f"s3://{bucket}/line3/2026-03-01.zarr"
    group = zarr.open_group(uri, mode="w")
    group.create_array("cam0/images", shape=(8, 48, 48), chunks=(2, 48, 48), dtype="uint8")[...] = square_images(8, size=48, defects=DEFECTS)

    registered = cli("--database-url", migrated_url, "imagesets", "register", uri, "--array", "cam0/images", "--lot", "L042")
    assert registered.exit_code == 0, registered.output
    assert f"registered image set 1: {uri} (stack 8x48x48 uint8, 8 images)" in registered.output
    model = add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    with factory() as session:
        from defectscan.data.register import get_image_set

        image_set = get_image_set(session, uri)
    settings = load_settings(environ={"DEFECTSCAN_INSPECTION__BATCH_SIZE": "2", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "2"}).inspection
    # The workers are other processes: they get the endpoint the way a deployment gives it, in their environment.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", env=s3_environment) as local, Client(local) as client:
        summary = inspect_image_sets(factory, client, model, [image_set], settings, max_in_flight=2)
    assert summary.status == "succeeded", summary.errors
    with factory() as session:
        failed = session.scalars(select(Image.position).join(Inspection, Inspection.image_id == Image.id).where(Inspection.verdict == "fail")).all()
    assert sorted(failed) == sorted(DEFECTS)
    scores = zarr.open_array(f"s3://{bucket}/line3/2026-03-01.masks.zarr", path="threshold/1", mode="r")[...]
    assert scores.shape == (8, 1, 48, 48) and scores[2].max() > 128 and scores[0].max() < 128
    assert np.count_nonzero(scores[5]) >= 8 * 8

"""The JAX runtime (inspection.runtime: jax): the same .keras file on Keras's JAX backend, in worker
processes that never import TensorFlow; probabilities and verdicts as the TensorFlow runtime's."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sqlalchemy import select

from defectscan.config import load_settings
from defectscan.db.migrate import upgrade
from defectscan.db.schema import Inspection
from defectscan.db.session import make_engine, session_factory
from defectscan.errors import ModelError
from defectscan.pipeline.cluster import connect
from defectscan.pipeline.worker import ModelRef, probabilities, use_backend

from pipeline_helpers import SMALL_FILTERS, add_model, register, save_threshold_model, square_images, write_stack

pytest.importorskip("jax")
DEFECTS = {1: (10, 10, 6), 9: (30, 40, 8)}


def _backend_and_tensorflow():
    import sys

    import keras

    return keras.backend.backend(), "tensorflow" in sys.modules


@pytest.fixture
def unet_file(tmp_path):
    from defectscan.model.unet import build_model

    model = build_model(filters=SMALL_FILTERS, seed=3)
    model(np.zeros((1, 64, 64, 1), np.float32))
    path = tmp_path / "unet.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def jax_client():
    """One local worker process on the JAX runtime, shared by the tests that call it directly."""
    with connect(load_settings(environ={}).cluster, n_workers=1, runtime="jax") as (client, info):
        yield client


def test_probabilities_on_jax_equal_tensorflows_and_the_worker_never_imports_tensorflow(unet_file, jax_client):
    from defectscan.model.export import file_sha256

    x = np.random.default_rng(0).uniform(-1, 1, (6, 64, 96, 1)).astype(np.float32)
    ref = ModelRef(uri=str(unet_file), sha256=file_sha256(unet_file), classes=("defect",), batch_size=4)
    on_tensorflow = probabilities(ref, x)  # this process runs Keras on TensorFlow
    on_jax = jax_client.submit(probabilities, ModelRef(**{**ref.__dict__, "runtime": "jax"}), x, pure=False).result()
    assert list(jax_client.run(_backend_and_tensorflow).values()) == [("jax", False)]
    assert on_jax.shape == on_tensorflow.shape == (6, 1, 64, 96)
    assert np.abs(on_jax - on_tensorflow).max() < 1e-3


def _cached_keys():
    from defectscan.pipeline import worker

    return sorted(worker._MODELS)


def test_a_jax_worker_runs_the_recorded_bfloat16_in_its_own_cache_entry(unet_file, jax_client):
    from defectscan.model.export import file_sha256
    from defectscan.model.precision import runnable
    from defectscan.pipeline.worker import worker_precision

    x = np.random.default_rng(2).uniform(-1, 1, (4, 64, 64, 1)).astype(np.float32)
    f32 = ModelRef(uri=str(unet_file), sha256=file_sha256(unet_file), classes=("defect",), batch_size=4, runtime="jax")
    bf16 = ModelRef(**{**f32.__dict__, "precision": "bfloat16"})
    on_tensorflow = probabilities(ModelRef(**{**bf16.__dict__, "runtime": "tensorflow"}), x)
    in_f32 = jax_client.submit(probabilities, f32, x, pure=False).result()
    in_bf16 = jax_client.submit(probabilities, bf16, x, pure=False).result()
    ran = jax_client.submit(worker_precision, bf16, pure=False).result()
    [keys] = jax_client.run(_cached_keys).values()
    # This machine's CPU decides, as it does for the worker: bfloat16 with AVX512-BF16/AMX, else float32.
    assert ran == runnable("bfloat16", gpu=False)[0]
    assert {(f32.sha256, "jax", "bfloat16"), (f32.sha256, "jax", "float32")} <= {tuple(k) for k in keys}
    difference = np.abs(in_bf16 - in_f32).max()
    if ran == "bfloat16":
        assert 0 < difference < 0.05
        assert np.abs(in_bf16 - on_tensorflow).max() < 0.05, "bfloat16 on JAX is near bfloat16 on TensorFlow"
    else:
        assert difference == 0


def test_inspect_end_to_end_on_jax_gives_the_tensorflow_runtimes_verdicts_and_scores(cli, tmp_path):
    import zarr

    runs = {}
    store = write_stack(tmp_path / "J1.zarr", square_images(12, size=64, defects=DEFECTS, seed=5))
    model_file = save_threshold_model(tmp_path / "threshold.keras")
    for runtime in ("tensorflow", "jax"):
        url = f"sqlite:///{tmp_path / runtime}.sqlite"
        engine = make_engine(url)
        upgrade(engine)
        factory = session_factory(engine)
        register(factory, store)
        add_model(factory, model_file)
        env = {"DEFECTSCAN_INSPECTION__RUNTIME": runtime, "DEFECTSCAN_INSPECTION__BATCH_SIZE": "4",
               "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "4", "DEFECTSCAN_INSPECTION__OUTPUT_DIR": str(tmp_path / f"masks-{runtime}")}
        result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", str(store), "--workers", "1", "--no-progress", env=env)
        assert result.exit_code == 0, result.output
        assert "12 inspected (2 failed)" in result.output
        with factory() as session:
            rows = session.execute(select(Inspection.image_id, Inspection.verdict, Inspection.n_defects, Inspection.mask_uri,
                                          Inspection.mask_array).order_by(Inspection.image_id)).all()
        engine.dispose()
        scores = zarr.open_array(rows[0].mask_uri, path=rows[0].mask_array, mode="r")[:]
        runs[runtime] = ([tuple(r[:3]) for r in rows], scores)
    assert runs["jax"][0] == runs["tensorflow"][0]
    difference = np.abs(runs["jax"][1].astype(np.int16) - runs["tensorflow"][1].astype(np.int16))
    assert difference.max() <= 1


def test_a_worker_on_tensorflow_refuses_a_jax_model_and_says_why():
    import keras  # this process: Keras on TensorFlow

    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ModelError, match="inspection.runtime jax: this worker process already runs Keras on tensorflow; a worker runs one runtime"):
        use_backend("jax")
    use_backend("tensorflow")
    assert os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"


def test_a_model_with_views_averages_them_on_either_runtime(tmp_path, jax_client):
    from defectscan.model.export import file_sha256, load_model
    from defectscan.model.unet import build_model
    from defectscan.model.views import ViewAverage

    unet = build_model(filters=SMALL_FILTERS, seed=3)
    path = tmp_path / "views.keras"
    ViewAverage(unet, 8).save(path)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 64, 96, 1)).astype(np.float32)
    # By hand: each flip and transposition of the image through the plain UNet, undone, averaged.
    views = []
    for transposed in (False, True):
        image = x.transpose(0, 2, 1, 3) if transposed else x
        for axes in ((), (2,), (1,), (1, 2)):
            p = np.flip(unet(np.flip(image, axes)).numpy(), axes) if axes else unet(image).numpy()
            views.append(p.transpose(0, 2, 1, 3) if transposed else p)
    expected = np.mean(views, axis=0).transpose(0, 3, 1, 2)
    ref = ModelRef(uri=str(path), sha256=file_sha256(path), classes=("defect",), batch_size=2)
    on_tensorflow = probabilities(ref, x)
    on_jax = jax_client.submit(probabilities, ModelRef(**{**ref.__dict__, "runtime": "jax"}), x, pure=False).result()
    assert np.abs(on_tensorflow - expected).max() < 1e-5
    assert np.abs(on_jax - expected).max() < 1e-3
    assert load_model(path).get_weights()[0].shape == unet.get_weights()[0].shape

"""No TensorFlow, absl or CUDA start-up line reaches the terminal of `train`, `evaluate` or `inspect`
(its local workers included) unless --log-level DEBUG asks for everything."""

from __future__ import annotations

import os
import subprocess
import sys

from defectscan.db.migrate import upgrade
from defectscan.db.session import make_engine, session_factory
from defectscan.paths import CONFIGS_DIR

from pipeline_helpers import register, save_threshold_model, square_images, write_stack

NOISE = ("absl::InitializeLog", "oneDNN custom operations", "oneDNN supports", "cuda drivers", "cuInit", "cpu_feature_guard", "rebuild TensorFlow",
         "Worker process still alive")


def _defectscan(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFECTSCAN_") or k.startswith("DEFECTSCAN_TEST_")}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user's shell has: nothing set
    done = subprocess.run([sys.executable, "-m", "defectscan", *args], env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(marker in line for marker in NOISE)]


def test_train_evaluate_and_inspect_print_no_tensorflow_lines(tmp_path, sqlite_url):
    """SQLite only: the output is the client's and its workers', whichever database records it."""
    data, run = tmp_path / "synth", tmp_path / "run"
    status, output = _defectscan("data", "synth", str(data), "--classes", "1", "--train", "4", "--test", "2", "--size", "32")
    assert status == 0, output
    # crops, flips and turns, and pasted defects: the feed's every step
    status, output = _defectscan("train", str(CONFIGS_DIR / "model" / "tinyunet-cpu-test.yaml"), "--data", str(data), "--out", str(run), "--quiet",
                                 "--set", "data.crop_size=16", "--set", "data.defect_paste_fraction=0.5")
    assert status == 0 and _noise(output) == [], output
    status, output = _defectscan("evaluate", str(run / "model.keras"), "--data", str(data))
    assert status == 0 and _noise(output) == [], output

    engine = make_engine(sqlite_url)
    upgrade(engine)
    image_set = register(session_factory(engine), write_stack(tmp_path / "L1.zarr", square_images(8, size=32)))
    engine.dispose()
    model = save_threshold_model(tmp_path / "threshold.keras")
    url = sqlite_url
    status, output = _defectscan("--database-url", url, "models", "register", str(model), "--name", "threshold", "--version", "1")
    assert status == 0 and _noise(output) == [], output
    status, output = _defectscan("--database-url", url, "inspect", "--model", "threshold", "--imageset", str(image_set.id), "--workers", "1", "--no-progress")
    assert status == 0, output
    assert _noise(output) == [], output

    # Asked for, everything is there.
    status, output = _defectscan("--log-level", "DEBUG", "evaluate", str(run / "model.keras"), "--data", str(data))
    assert status == 0 and _noise(output), output


def test_a_killed_client_leaves_no_leaked_semaphore_warning_on_the_terminal(tmp_path, sqlite_url):
    """Its local cluster's resource tracker cleans up after it, silently."""
    import time

    from sqlalchemy import func, select

    from defectscan.db.schema import Inspection

    engine = make_engine(sqlite_url)
    upgrade(engine)
    factory = session_factory(engine)
    image_set = register(factory, write_stack(tmp_path / "L1.zarr", square_images(64, size=32)))
    status, output = _defectscan("--database-url", sqlite_url, "models", "register", str(save_threshold_model(tmp_path / "t.keras")),
                                 "--name", "threshold", "--version", "1")
    assert status == 0, output
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFECTSCAN_") or k.startswith("DEFECTSCAN_TEST_")}
    env.update({"DEFECTSCAN_INSPECTION__BATCH_SIZE": "1", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "1",
                "DEFECTSCAN_CLUSTER__SHARDS_IN_FLIGHT_PER_WORKER": "1"})
    client = subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", sqlite_url, "inspect", "--model", "threshold",
                               "--imageset", str(image_set.id), "--workers", "1", "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while client.poll() is None and time.monotonic() < deadline:
        with factory() as session:
            if session.scalar(select(func.count()).select_from(Inspection)):
                break
        time.sleep(0.05)
    assert client.poll() is None, client.communicate()[0]
    client.kill()
    output, _ = client.communicate(timeout=120)  # until the tracker and the orphaned worker let go of the pipe
    engine.dispose()
    assert "leaked semaphore" not in output and _noise(output) == [], output

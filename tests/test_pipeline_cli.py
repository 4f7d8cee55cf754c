"""`defectscan inspect` from the command line: a local cluster, and a `dask scheduler` + two `dask worker`
processes where the client is killed mid-run and a rerun completes the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from defectscan.db.migrate import upgrade
from defectscan.db.schema import Inspection, JobRun
from defectscan.db.session import make_engine, session_factory

from pipeline_helpers import add_model, corrupt_chunk, register, save_threshold_model, square_images, write_stack
from test_pipeline_run import _table

DEFECTS = {2: (10, 10, 6), 33: (30, 40, 8), 60: (0, 0, 5)}
SMALL_SHARDS = {"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_INSPECTION__IMAGES_PER_SHARD": "8"}


@pytest.fixture
def prepared(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    upgrade(engine)
    factory = session_factory(engine)
    image_set = register(factory, write_stack(tmp_path / "L7.zarr", square_images(64, defects=DEFECTS)))
    add_model(factory, save_threshold_model(tmp_path / "threshold.keras"))
    yield sqlite_url, factory, image_set
    engine.dispose()


def test_inspect_on_the_default_local_cluster_then_rerun(cli, prepared, tmp_path):
    url, factory, image_set = prepared
    result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", str(tmp_path / "L7.zarr"),
                 "--workers", "1", "--no-progress", env=SMALL_SHARDS)
    assert result.exit_code == 0, result.output
    assert "Dask: 1 worker, dashboard http" in result.output
    assert "job run 1: succeeded, 64 images: 64 inspected (3 failed), 0 errors, 0 already done; 3 defects" in result.output
    failed = {r[1] for r in _table(factory)[0] if r[2] == "fail"}
    assert failed == set(DEFECTS)

    again = cli("--database-url", url, "inspect", "--model", "threshold:1", "--imageset", str(image_set.id), "--workers", "1", "--progress")
    assert again.exit_code == 0, again.output
    assert "job run 2: succeeded, 64 images: 0 inspected (0 failed), 0 errors, 64 already done" in again.stdout
    assert "inspecting" in again.stderr and "inspecting" not in again.stdout  # the bar is not part of what scripts read


def test_unknown_model_and_image_set_are_one_line_errors(cli, prepared):
    url, _, _ = prepared
    result = cli("--database-url", url, "inspect", "--model", "nope", "--imageset", "1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: no model nope in the registry; known: threshold:1")
    result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", "/no/such.zarr")
    assert result.exit_code == 1
    assert "no image set '/no/such.zarr' is registered" in result.output


def test_unreadable_image_gives_exit_status_3(cli, prepared, tmp_path):
    url, factory, _ = prepared
    corrupt_chunk(tmp_path / "L7.zarr", 5)
    result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", "1", "--workers", "1", "--no-progress", env=SMALL_SHARDS)
    assert result.exit_code == 3, result.output
    assert "partial, 64 images: 63 inspected (3 failed), 1 errors" in result.output
    # A plain rerun skips it as done: it says so, where "succeeded, 64 already done" read as if it were fixed.
    again = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", "1", "--workers", "1", "--no-progress", env=SMALL_SHARDS)
    assert again.exit_code == 0 and "64 already done (1 of them in error: --retry-errors reads them again)" in again.output


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes, as a plant would start them."""
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
                                   "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    for name in ("w1", "w2"):
        processes.append(subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--name", name,
                                           "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    yield address
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=30)


def test_client_killed_mid_run_then_rerun_on_an_external_cluster(prepared, external_cluster, tmp_path, cli):
    url, factory, image_set = prepared
    env = {**os.environ, **SMALL_SHARDS, "DEFECTSCAN_CLUSTER__SHARDS_IN_FLIGHT_PER_WORKER": "1"}
    client = subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", url, "inspect", "--model", "threshold",
                               "--imageset", str(image_set.id), "--scheduler", external_cluster, "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    recorded = 0
    while time.monotonic() < deadline and client.poll() is None:
        with factory() as session:
            recorded = session.scalar(select(func.count()).select_from(Inspection))
        if recorded:
            break
        time.sleep(0.05)
    assert client.poll() is None, client.stdout.read().decode()
    client.send_signal(signal.SIGKILL)
    client.wait()
    with factory() as session:
        first_run = session.scalars(select(JobRun)).one()
        assert first_run.status == "running"  # killed: it could not say otherwise
        done_before = session.scalar(select(func.count()).select_from(Inspection))
    assert 0 < done_before < 64 and done_before % 8 == 0

    result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", str(image_set.id),
                 "--scheduler", external_cluster, "--no-progress", env=SMALL_SHARDS)
    assert result.exit_code == 0, result.output
    assert f"64 images: {64 - done_before} inspected" in result.output
    rows, defects = _table(factory)
    assert [r[1] for r in rows] == list(range(64))
    assert {r[1] for r in rows if r[2] == "fail"} == set(DEFECTS)
    assert len(defects) == len(DEFECTS)


def test_gpu_workers_get_a_gpu_resource_and_tasks_ask_for_it(cli, prepared, monkeypatch):
    """No GPU here: CUDA_VISIBLE_DEVICES makes the local cluster believe in one, which exercises the
    resource wiring (workers advertise GPU=1, inference tasks require it); TensorFlow then runs on the CPU."""
    from defectscan.config import load_settings
    from defectscan.pipeline.cluster import connect, count_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert count_gpus() == 1
    with connect(load_settings(environ={}).cluster) as (client, info):
        assert info.gpu and info.n_workers == 1
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
        assert resources == [{"GPU": 1}]
        # TensorFlow's memory arena must not pause an inference worker (it would wait forever)
        import dask

        paused = client.run(lambda: dask.config.get("distributed.worker.memory.pause"))
        assert list(paused.values()) == [False]
        # nor sample every thread's stack every 10 ms (3-7 % of a CPU worker's bfloat16 throughput)
        profiled = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        assert list(profiled.values()) == [False]
    url, factory, image_set = prepared
    result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", str(image_set.id), "--no-progress", env=SMALL_SHARDS)
    assert result.exit_code == 0, result.output
    assert "Dask: 1 worker (GPU)" in result.output
    # TensorFlow's own CUDA lines stay quiet; defectscan says in one line what that means.
    assert "was given a GPU, but TensorFlow there finds none (no NVIDIA driver, or a CPU-only build): it inspects on the CPU" in result.output
    assert "64 inspected" in result.output


def test_each_gpu_worker_sees_only_its_own_device_and_the_worker_count_is_honoured(monkeypatch):
    """Two "GPUs" (3 and 5, as CUDA_VISIBLE_DEVICES names them): a worker per device, each process seeing only
    its own; --workers 1 takes the first; asking for more workers than GPUs is refused with the reason."""
    from defectscan.config import load_settings
    from defectscan.errors import DefectscanError
    from defectscan.pipeline.cluster import connect

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    settings = load_settings(environ={}).cluster
    with connect(settings) as (client, info):
        assert info.gpu and info.n_workers == 2
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()))
        assert sorted(device for device, _ in seen.values()) == ["3", "5"]
        assert len({pid for _, pid in seen.values()} | {os.getpid()}) == 3  # separate worker processes
        assert [w["resources"] for w in client.scheduler_info()["workers"].values()] == [{"GPU": 1}, {"GPU": 1}]
        # memory_limit "auto": the machine's memory shared by the two, as a CPU LocalCluster shares it
        from distributed.system import MEMORY_LIMIT

        assert [w["memory_limit"] for w in client.scheduler_info()["workers"].values()] == [MEMORY_LIMIT // 2] * 2
    with connect(settings, n_workers=1) as (client, info):
        assert list(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values()) == ["3"]
    with pytest.raises(DefectscanError, match=r"--workers\) 3: a local cluster runs one worker per GPU and this machine shows 2 \(3, 5\)"):
        with connect(settings, n_workers=3):
            pass


def test_workers_with_a_scheduler_is_refused_not_ignored():
    from defectscan.config import load_settings
    from defectscan.errors import DefectscanError
    from defectscan.pipeline.cluster import connect

    settings = load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": "tcp://127.0.0.1:1"}).cluster
    with pytest.raises(DefectscanError, match=r"^--workers sizes a local cluster; the scheduler at tcp://127.0.0.1:1 runs the workers"):
        with connect(settings, n_workers=2):
            pass


def test_a_scheduler_that_accepts_connections_and_never_answers_is_a_one_line_error_in_bounded_time(monkeypatch):
    """distributed's timeout covers the TCP connection, not the handshake: a hung scheduler held a nightly run (and its lock) for ever."""
    import socket

    from defectscan.config import load_settings
    from defectscan.errors import DefectscanError
    from defectscan.pipeline import cluster

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel accepts; nothing ever answers
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setattr(cluster, "HANDSHAKE_GRACE_S", 1.0)
        began = time.monotonic()
        with pytest.raises(DefectscanError, match=f"^cannot connect to the Dask scheduler at {address}: it accepted the connection but did "
                                                  "not answer within 3 s"):
            with cluster.connect(load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": address}).cluster, timeout=2):
                pass
        assert time.monotonic() - began < 10


def test_scheduler_settings_that_cannot_work_are_one_line_errors(tmp_path):
    from defectscan.config import load_settings
    from defectscan.errors import ConfigError, DefectscanError
    from defectscan.pipeline.cluster import connect

    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("not read: refused before")
    tls = {f"DEFECTSCAN_CLUSTER__TLS__{k}_FILE": str(tmp_path / f"{k.lower()}.pem") for k in ("CA", "CERT", "KEY")}
    settings = load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": "tcp://127.0.0.1:1", **tls}).cluster
    with pytest.raises(DefectscanError, match="cluster.tls is set but cluster.scheduler tcp://127.0.0.1:1 is not a tls:// address"):
        with connect(settings):
            pass
    # An env-file line left empty quietly ran a local cluster instead of the plant's.
    with pytest.raises(ConfigError, match="DEFECTSCAN_CLUSTER__SCHEDULER: key 'cluster.scheduler' has value '': expected `local` or a scheduler address"):
        load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": ""})
    assert load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": "local"}).cluster.scheduler is None
    assert load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": "dask-scheduler:8786"}).cluster.scheduler == "tcp://dask-scheduler:8786"
    # Kubernetes' service links of a Service named defectscan-scheduler are not settings.
    links = {"DEFECTSCAN_SCHEDULER_SERVICE_HOST": "10.96.0.12", "DEFECTSCAN_SCHEDULER_PORT": "tcp://10.96.0.12:8786",
             "DEFECTSCAN_SCHEDULER_PORT_8786_TCP_ADDR": "10.96.0.12", "DEFECTSCAN_SCHEDULER_SERVICE_PORT_TLS_COMM": "8786",
             "DEFECTSCAN_SERVICE_HOST": "10.96.0.13", "DEFECTSCAN_PORT": "tcp://10.96.0.13:80"}  # a Service named defectscan
    assert load_settings(environ=links).cluster.scheduler is None


def test_sigterm_marks_the_run_interrupted_and_a_rerun_completes(prepared, external_cluster, cli):
    url, factory, image_set = prepared
    env = {**os.environ, **SMALL_SHARDS, "DEFECTSCAN_CLUSTER__SHARDS_IN_FLIGHT_PER_WORKER": "1"}
    client = subprocess.Popen([sys.executable, "-m", "defectscan", "--database-url", url, "inspect", "--model", "threshold",
                               "--imageset", str(image_set.id), "--scheduler", external_cluster, "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and client.poll() is None:
        with factory() as session:
            if session.scalar(select(func.count()).select_from(Inspection)):
                break
        time.sleep(0.05)
    client.send_signal(signal.SIGTERM)
    output = client.communicate(timeout=60)[0].decode()
    assert client.returncode == 143, output
    assert "Stopped by signal SIGTERM; a rerun continues where this one stopped." in output
    assert "Aborted!" not in output and "Traceback" not in output
    with factory() as session:
        run = session.scalars(select(JobRun)).one()
        assert run.status == "interrupted", output
        assert run.finished_at is not None
        done_before = session.scalar(select(func.count()).select_from(Inspection))
    result = cli("--database-url", url, "inspect", "--model", "threshold", "--imageset", str(image_set.id),
                 "--scheduler", external_cluster, "--no-progress", env=SMALL_SHARDS)
    assert result.exit_code == 0, result.output
    assert f"64 images: {64 - done_before} inspected" in result.output


def test_images_not_written_yet_make_inspect_partial_and_are_inspected_once_they_are(prepared, cluster, tmp_path):
    """`inspect` said "succeeded" (exit 0) for a set still waiting for frames, and never inspected them when they came."""
    from defectscan.cli.inspect import describe_summary
    from defectscan.config import load_settings
    from defectscan.pipeline.by_name import run_inspect

    _, factory, _ = prepared
    store = write_stack(tmp_path / "L9.zarr", square_images(6, defects={4: (10, 10, 6)}))
    chunk = store / "images" / "c" / "4" / "0" / "0"
    written = chunk.read_bytes()
    chunk.unlink()  # the camera has not written frame 4 yet
    image_set = register(factory, store)
    assert image_set.n_images == 5
    settings = load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": cluster.scheduler.address})
    run = lambda: run_inspect(factory, settings, "threshold", [str(store)], echo=lambda line: None)  # noqa: E731
    first = run()
    assert first.exit_code == 3 and "partial, 5 images: 5 inspected (0 failed)" in describe_summary(first)
    assert first.errors[0].startswith(f"image set {image_set.id} ({store}): 1 image(s) not written yet (positions 4) are not inspected")
    assert f"imagesets give-up-missing {image_set.id} --reason TEXT" in first.errors[0]
    chunk.write_bytes(written)
    second = run()
    assert second.exit_code == 0 and "succeeded, 6 images: 1 inspected (1 failed), 0 errors, 5 already done" in describe_summary(second)
    with factory() as session:
        assert [run.status for run in session.scalars(select(JobRun).order_by(JobRun.id))][-2:] == ["partial", "succeeded"]


def test_a_local_cluster_listens_on_this_machine_only(monkeypatch):
    """A scheduler runs what it is sent: the GPU cluster's ports (without dask-cuda) were open on every interface."""
    from defectscan.config import load_settings
    from defectscan.pipeline.cluster import connect

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the one-worker-per-GPU cluster; its workers need no device to start
    with connect(load_settings(environ={}).cluster, n_workers=1) as (client, info):
        addresses = [client.scheduler_info()["address"], *client.scheduler_info()["workers"]]
        assert all(address.startswith("tcp://127.0.0.1:") for address in addresses), addresses
        assert info.dashboard.startswith("http://127.0.0.1:")


def test_a_scheduler_that_answers_after_the_run_gave_up_leaves_no_client_behind(monkeypatch):
    """The connecting thread went on: a late answer made a Client nobody closed, the process's default client."""
    import threading

    import distributed

    from defectscan.errors import DefectscanError
    from defectscan.pipeline import cluster

    answer, closed = threading.Event(), []

    class LateClient:
        def __init__(self, *args, **kwargs):
            answer.wait(10)

        def close(self):
            closed.append(self)

    monkeypatch.setattr(distributed, "Client", LateClient)
    monkeypatch.setattr(cluster, "HANDSHAKE_GRACE_S", 0.1)
    with pytest.raises(DefectscanError, match="did not answer within 0.3 s"):
        cluster._client_within("tcp://127.0.0.1:1", None, 0.2)
    answer.set()
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(closed) == 1

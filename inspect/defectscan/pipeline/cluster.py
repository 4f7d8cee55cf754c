"""Connect to the Dask cluster that runs inspections, or start a local one.

The client process never imports TensorFlow: workers are separate (spawned) processes that
load it themselves, so the client stays small and fork-safety never comes up.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from defectscan.config import ClusterSettings, TLSSettings
from defectscan.errors import DefectscanError
from defectscan.logs import quiet_libraries
from defectscan.native_logs import quiet_stderr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    n_workers: int
    # Inference tasks ask for resources={"GPU": 1} when the workers advertise GPUs.
    gpu: bool
    dashboard: str | None
    # What the user should know about the workers, one line each (a GPU asked for but not usable).
    warnings: tuple[str, ...] = ()


def tensorflow_gpus() -> int:
    """GPUs TensorFlow can use in this (worker) process; its own start-up lines stay quiet."""
    from defectscan.native_logs import quiet_tensorflow_startup

    quiet_tensorflow_startup()
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def jax_gpus() -> int:
    """GPUs JAX can use in this (worker) process (TensorFlow stays unimported)."""
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        return 0


def gpu_warnings(client, workers: dict, runtime: str = "tensorflow") -> tuple[str, ...]:
    """One line per worker that advertises a GPU its runtime cannot use (no driver, no CUDA build): it runs on the CPU."""
    gpu_workers = [address for address, w in workers.items() if w.get("resources", {}).get("GPU")]
    if not gpu_workers:
        return ()
    found = client.run(jax_gpus if runtime == "jax" else tensorflow_gpus, workers=gpu_workers)
    name = "JAX" if runtime == "jax" else "TensorFlow"
    return tuple(
        f"worker {address} was given a GPU, but {name} there finds none (no NVIDIA driver, or a CPU-only build): it inspects on the CPU"
        for address, n in sorted(found.items()) if n == 0
    )


# Dask worker settings for inference workers (local clusters get them here; `dask worker` processes
# of a deployment get them from the environment, see docs/deploy.md). Memory: TensorFlow keeps its
# arena, which Dask counts as unmanaged memory that never goes down, so a worker paused for it would
# wait forever. Profile: the statistical profiler samples every thread's stack every 10 ms; on a
# CPU the model already fills it cost 2 ms of CPU per 512x512 image, 3-7 % of bfloat16 throughput
# end to end (docs/gpu.md); the dashboard's profile page stays empty.
WORKER_CONFIG = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.profile.enabled": False,
}


def gpu_ids() -> list[str]:
    """The NVIDIA GPUs this machine lets us use, as CUDA device ids (CUDA_VISIBLE_DEVICES, else nvidia-smi), without TensorFlow."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def count_gpus() -> int:
    return len(gpu_ids())


def security(tls: TLSSettings):
    if not tls.enabled:
        return None
    from distributed.security import Security

    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if not path.is_file():
            raise DefectscanError(f"cluster.tls.{name}: {path} does not exist")
    return Security(
        tls_ca_file=str(tls.ca_file),
        tls_client_cert=str(tls.cert_file),
        tls_client_key=str(tls.key_file),
        tls_worker_cert=str(tls.cert_file),
        tls_worker_key=str(tls.key_file),
        tls_scheduler_cert=str(tls.cert_file),
        tls_scheduler_key=str(tls.key_file),
        require_encryption=True,
    )


def _local_cluster(settings: ClusterSettings, n_workers: int | None, runtime: str = "tensorflow"):
    # Only the nanny's restart at `terminate` stays on of Dask's memory management (WORKER_CONFIG).
    import dask

    with dask.config.set(WORKER_CONFIG):
        return _start_local_cluster(settings, n_workers, runtime)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with its stderr off the terminal (not under DEBUG).

    The local cluster's processes register semaphores with it; when the client is killed (SIGKILL,
    an evicted pod) the tracker cleans them up itself and then warns "There appear to be 12 leaked
    semaphore objects" on the terminal, about nothing the user can act on.
    """
    if log.isEnabledFor(logging.DEBUG):
        return
    from multiprocessing import resource_tracker

    with quiet_stderr():
        resource_tracker.ensure_running()


def _start_local_cluster(settings: ClusterSettings, n_workers: int | None, runtime: str = "tensorflow"):
    _quiet_resource_tracker()
    devices = gpu_ids()
    sec = security(settings.tls)
    protocol = {"protocol": "tls", "security": sec} if sec is not None else {}
    if devices:
        return _gpu_cluster(settings, devices, n_workers or settings.n_workers, protocol, runtime)
    from distributed import LocalCluster

    cores = os.cpu_count() or 1
    workers = n_workers or settings.n_workers or max(1, cores // 2)
    threads = max(1, cores // workers)
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=settings.threads_per_worker,
        processes=True,
        memory_limit=settings.memory_limit,
        # On this machine only: a scheduler runs what it is sent, and the plant's network should not reach it.
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        env=_worker_env(threads, runtime),
        silence_logs=_worker_log_level(),
        **protocol,
    )


def _per_worker_memory(memory_limit: str | int, n_workers: int) -> str | int:
    """"auto" as LocalCluster means it, the machine's memory shared between the workers: a Nanny on its own
    would take memory x threads / cores, a sixteenth of the machine for a one-thread worker on 16 cores."""
    if memory_limit != "auto":
        return memory_limit
    from distributed.system import MEMORY_LIMIT

    return MEMORY_LIMIT // n_workers


def _worker_log_level() -> int:
    """The workers' own housekeeping lines stay out of the user's terminal (see defectscan.logs), unless under DEBUG."""
    return logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR


def _worker_env(threads: int, runtime: str = "tensorflow") -> dict[str, str]:
    # TensorFlow sizes its thread pools from the machine: share the cores between workers instead.
    env = {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_BACKEND": runtime}
    if runtime == "jax":
        # JAX takes 75 % of a GPU's memory up front otherwise: a worker takes what its batches need.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _gpu_cluster(settings: ClusterSettings, devices: list[str], n_workers: int | None, protocol: dict, runtime: str):
    """One worker per GPU, each seeing only its own device (CUDA_VISIBLE_DEVICES): without it every
    worker's TensorFlow would take GPU 0. dask-cuda does the same when installed; the settings are
    honoured on both paths."""
    if n_workers is not None and n_workers > len(devices):
        raise DefectscanError(
            f"cluster.n_workers (or --workers) {n_workers}: a local cluster runs one worker per GPU and this machine shows "
            f"{len(devices)} ({', '.join(devices)}); give at most {len(devices)}, or CUDA_VISIBLE_DEVICES to choose which"
        )
    devices = devices[: n_workers or len(devices)]
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    memory_limit = _per_worker_memory(settings.memory_limit, len(devices))
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None:
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), n_workers=len(devices), threads_per_worker=settings.threads_per_worker,
                                memory_limit=memory_limit, resources={"GPU": 1}, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                env=_worker_env(threads, runtime), silence_logs=_worker_log_level(), **protocol)
    from distributed import Nanny, Scheduler, SpecCluster

    security_options = {"security": protocol["security"]} if protocol else {}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "protocol": protocol.get("protocol", "tcp"),
                                               **security_options}}
    workers = {
        f"gpu{device}": {"cls": Nanny, "options": {
            "host": "127.0.0.1", "nthreads": settings.threads_per_worker, "memory_limit": memory_limit, "resources": {"GPU": 1},
            "env": {**_worker_env(threads, runtime), "CUDA_VISIBLE_DEVICES": device}, "protocol": protocol.get("protocol", "tcp"),
            "silence_logs": _worker_log_level(), **security_options,
        }}
        for device in devices
    }
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=_worker_log_level())


def _check_scheme(settings: ClusterSettings) -> None:
    """TLS on both sides or neither: a tls:// scheduler without certificates, or a tcp:// one with them, failed inside distributed."""
    tls = settings.scheduler.startswith("tls://")
    if tls and not settings.tls.enabled:
        raise DefectscanError(
            f"cluster.scheduler {settings.scheduler} uses TLS but cluster.tls is not set: give ca_file, cert_file and key_file "
            "(DEFECTSCAN_CLUSTER__TLS__CA_FILE, ..._CERT_FILE, ..._KEY_FILE, or the job's cluster.tls)"
        )
    if settings.tls.enabled and not tls:
        raise DefectscanError(f"cluster.tls is set but cluster.scheduler {settings.scheduler} is not a tls:// address: "
                              "give tls://host:port, or leave cluster.tls out for an unencrypted scheduler")


def _client_within(address: str, tls, timeout: float):
    """A Client of the scheduler at `address`, or a one-line error within `timeout` (and a few seconds): distributed's
    own timeout covers the TCP connection, not the handshake after it, so a scheduler that accepts connections and
    never answers (hung, stopped) held a nightly run, and its job's lock, for ever."""
    import threading

    from distributed import Client

    from defectscan import interrupts

    made: dict[str, object] = {}
    lock = threading.Lock()

    def make() -> None:
        try:
            client = Client(address, security=tls, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            made["error"] = exc
            return
        with lock:
            if not made.get("abandoned"):
                made["client"] = client
                return
        client.close()  # answered after the caller gave up: it would otherwise live on as the default client

    def give_up() -> None:
        with lock:
            made["abandoned"] = True
            client = made.pop("client", None)
        if client is not None:
            client.close()

    thread = threading.Thread(target=make, name="dask-connect", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout + HANDSHAKE_GRACE_S
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            interrupts.check()
    except BaseException:
        give_up()
        raise
    with lock:
        late = thread.is_alive() and "client" not in made and "error" not in made
        if late:
            made["abandoned"] = True
    if late:
        raise DefectscanError(f"cannot connect to the Dask scheduler at {address}: it accepted the connection but did not answer "
                              f"within {timeout + HANDSHAKE_GRACE_S:g} s (a hung or stopped scheduler?)")
    error = made.get("error")
    if isinstance(error, (OSError, TimeoutError)):
        raise DefectscanError(f"cannot connect to the Dask scheduler at {address}: {error}") from None
    if error is not None:
        raise error
    return made["client"]


# Beyond the connect timeout, for the scheduler's answer to the handshake.
HANDSHAKE_GRACE_S = 10.0


@contextmanager
def connect(
    settings: ClusterSettings, *, n_workers: int | None = None, timeout: float = 30, runtime: str = "tensorflow",
) -> Iterator[tuple[object, ClusterInfo]]:
    """A distributed Client on the configured scheduler, or on a local cluster started for the run (its workers
    on `runtime`, inspection.runtime)."""
    from distributed import Client

    quiet_libraries()
    cluster = None
    try:
        if settings.scheduler:
            if n_workers is not None:
                raise DefectscanError(f"--workers sizes a local cluster; the scheduler at {settings.scheduler} runs the workers "
                                      "its cluster started: leave --workers out")
            _check_scheme(settings)
            client = _client_within(settings.scheduler, security(settings.tls), timeout)
        else:
            cluster = _local_cluster(settings, n_workers, runtime)
            client = Client(cluster, timeout=timeout)
        with client:
            workers = client.scheduler_info()["workers"]
            if not workers:
                try:
                    client.wait_for_workers(1, timeout=timeout)
                except Exception as exc:  # distributed's WorkerStartTimeoutError (a TimeoutError in some versions)
                    if "Timeout" not in type(exc).__name__:
                        raise
                    raise DefectscanError(f"the Dask scheduler at {settings.scheduler or 'the local cluster'} has no workers after "
                                          f"{timeout:g} s: start them (or check that they reach it)") from None
                workers = client.scheduler_info()["workers"]
            gpu = any(w.get("resources", {}).get("GPU") for w in workers.values())
            info = ClusterInfo(n_workers=len(workers), gpu=gpu, dashboard=client.dashboard_link, warnings=gpu_warnings(client, workers, runtime))
            # The commands print this line themselves; at INFO a cron log held it twice.
            log.debug("Dask cluster: %d workers%s, dashboard %s", info.n_workers, " with GPUs" if gpu else "", info.dashboard)
            yield client, info
    finally:
        if cluster is not None:
            cluster.close()

"""Real pieces for the jobs tests: throwaway TLS certificates, a TLS `dask scheduler` + `dask worker`, job specs, CLI subprocesses.

Run as a script it takes a job's lock in a process of its own:
    python tests/jobs_helpers.py hold DATABASE_URL JOB        prints "held", keeps the lock until stdin closes
    python tests/jobs_helpers.py race DATABASE_URL JOB DIR    when DIR/go appears tries once: prints "won" or "busy"
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

CLUSTER_START_S = 90


REPO = Path(__file__).resolve().parent.parent
MAKE_CERTS = REPO / "deploy" / "tls" / "make-certs.sh"


def make_tls(directory: Path) -> dict[str, Path]:
    """A throwaway CA and one certificate for 127.0.0.1/localhost, made by the deploy script the targets use."""
    subprocess.run(["/bin/sh", str(MAKE_CERTS), str(directory), "localhost", "127.0.0.1"], check=True, capture_output=True)
    return {"ca_file": directory / "ca.crt", "cert_file": directory / "tls.crt", "key_file": directory / "tls.key"}


def tls_environment(tls: dict[str, Path], scheduler: str) -> dict[str, str]:
    return {
        "DEFECTSCAN_CLUSTER__SCHEDULER": scheduler,
        "DEFECTSCAN_CLUSTER__TLS__CA_FILE": str(tls["ca_file"]),
        "DEFECTSCAN_CLUSTER__TLS__CERT_FILE": str(tls["cert_file"]),
        "DEFECTSCAN_CLUSTER__TLS__KEY_FILE": str(tls["key_file"]),
    }


def _dask() -> str:
    return str(Path(sys.executable).parent / "dask")


@contextmanager
def tls_cluster(directory: Path, tls: dict[str, Path]):
    """`dask scheduler` and one `dask worker` (separate processes), TLS only; yields the scheduler address."""
    scheduler_file = directory / "scheduler.json"
    tls_args = ["--tls-ca-file", str(tls["ca_file"]), "--tls-cert", str(tls["cert_file"]), "--tls-key", str(tls["key_file"])]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    logs = open(directory / "cluster.log", "w")  # noqa: SIM115 -- closed below
    scheduler = subprocess.Popen(
        [_dask(), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file), *tls_args],
        stdout=logs, stderr=subprocess.STDOUT, env=env,
    )
    worker = None
    try:
        deadline = time.monotonic() + CLUSTER_START_S
        while not scheduler_file.exists():
            if scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {(directory / 'cluster.log').read_text()[-2000:]}")
            time.sleep(0.1)
        import json

        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [_dask(), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB", *tls_args],
            stdout=logs, stderr=subprocess.STDOUT, env=env,
        )
        yield address
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
        for process in (worker, scheduler):
            if process is not None:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
        logs.close()


def write_spec(jobs_dir: Path, name: str, **fields) -> Path:
    jobs_dir.mkdir(parents=True, exist_ok=True)
    data = {"name": name, "schedule": "*/10 * * * *", **fields}
    path = jobs_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def defectscan(database_url: str, *args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """`python -m defectscan --database-url URL ARGS...` as a real process."""
    command = [sys.executable, "-m", "defectscan", "--database-url", database_url, *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEFECTSCAN_") or k.startswith("DEFECTSCAN_TEST_")}
    full_env.update({"TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, **popen)


def hold_lock_process(database_url: str, job: str) -> subprocess.Popen:
    """Another process that takes the job's lock and holds it until its stdin closes."""
    process = subprocess.Popen([sys.executable, __file__, "hold", database_url, job], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    if line != "held":
        process.kill()
        raise RuntimeError(f"lock holder did not take the lock: {line!r}")
    return process


def _hold(database_url: str, job: str) -> None:
    from defectscan.db.session import make_engine
    from defectscan.jobs.lock import acquire

    engine = make_engine(database_url)
    handle = acquire(engine, job, stale_after=300)
    print("held", flush=True)
    sys.stdin.read()
    handle.release()
    engine.dispose()


def _race(database_url: str, job: str, barrier: str) -> None:
    from defectscan.db.session import make_engine
    from defectscan.jobs.lock import AlreadyRunning, acquire

    engine = make_engine(database_url)
    with engine.connect():
        pass  # connected before the start line, so the race is between the inserts
    folder = Path(barrier)
    (folder / f"ready-{os.getpid()}").touch()
    while not (folder / "go").exists():
        time.sleep(0.001)
    try:
        handle = acquire(engine, job, stale_after=300)
    except AlreadyRunning:
        print("busy", flush=True)
    else:
        print("won", flush=True)
        # Held until every racer has tried: none may find it released and win too.
        while not (folder / "done").exists():
            time.sleep(0.01)
        handle.release()
    engine.dispose()


def race(database_url: str, job: str, n: int, barrier: Path) -> list[str]:
    """`n` processes, each connected and waiting at a start line, try to take the lock at once; their answers."""
    barrier.mkdir(parents=True, exist_ok=True)
    racers = [
        subprocess.Popen([sys.executable, __file__, "race", database_url, job, str(barrier)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < n:
        if time.monotonic() > deadline or any(r.poll() is not None for r in racers):
            raise RuntimeError(f"racers did not get ready: {[r.communicate() for r in racers if r.poll() is not None]}")
        time.sleep(0.01)
    (barrier / "go").touch()
    answers: list[str | None] = [None] * n
    while None in answers and time.monotonic() < deadline:
        for i, racer in enumerate(racers):
            if answers[i] is None:
                answers[i] = racer.stdout.readline().strip()
        time.sleep(0.01)
    (barrier / "done").touch()
    for racer in racers:
        _, err = racer.communicate(timeout=30)
        if racer.returncode:
            raise RuntimeError(err)
    return answers


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        _hold(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "race":
        _race(sys.argv[2], sys.argv[3], sys.argv[4])

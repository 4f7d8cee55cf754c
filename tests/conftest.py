"""Shared fixtures: isolated settings, real SQLite and PostgreSQL databases, a CLI runner.

PostgreSQL tests use the server named by DEFECTSCAN_TEST_POSTGRES_URL (`.ci/run` always sets
it). Without it, a throwaway cluster is started for the run with `.ci/postgres` where PostgreSQL's
server binaries are installed (and stopped after it); elsewhere they are skipped with one line
saying how to get them, except under CI=true, where a missing server is an error.
"""

from __future__ import annotations

import getpass
import glob
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from db_helpers import create_database, drop_database

POSTGRES_ENV = "DEFECTSCAN_TEST_POSTGRES_URL"


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true", help="also run tests marked large (slow)")


def pytest_configure(config):
    # The developer's own settings must not reach any test, session-scoped fixtures included.
    for name in list(os.environ):
        if name.startswith("DEFECTSCAN_") and not name.startswith("DEFECTSCAN_TEST_"):
            del os.environ[name]


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large test: run with --run-large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path_factory, monkeypatch):
    """No test reads the developer's settings or writes to their data directory."""
    for name in list(os.environ):
        if name.startswith("DEFECTSCAN_") and not name.startswith("DEFECTSCAN_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


REPO = Path(__file__).resolve().parent.parent
THROWAWAY_POSTGRES = REPO / ".ci" / "postgres"
_postgres_note: list[str] = []


def _postgres_binaries() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")) and (os.geteuid() == 0 or getpass.getuser() == "postgres")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """The server of DEFECTSCAN_TEST_POSTGRES_URL; else a throwaway cluster started here (.ci/postgres) when
    PostgreSQL's server binaries are installed, stopped at the end; else the PostgreSQL tests are skipped."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        yield url
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run must start PostgreSQL")
    if not _postgres_binaries():
        _postgres_note.append(
            "PostgreSQL tests skipped: no PostgreSQL server here. Install it (Debian: apt-get install postgresql) and run make test "
            f"as root, or point {POSTGRES_ENV} at a server"
        )
        pytest.skip(_postgres_note[-1])
    already_running = (Path(os.environ.get("DEFECTSCAN_TEST_PG_DIR", "/tmp/defectscan-pg")) / "data" / "postmaster.pid").exists()
    started = subprocess.run([str(THROWAWAY_POSTGRES)], capture_output=True, text=True, check=False)
    if started.returncode != 0:
        _postgres_note.append(f"PostgreSQL tests skipped: .ci/postgres could not start a cluster: {started.stderr.strip().splitlines()[-1:]}")
        pytest.skip(_postgres_note[-1])
    if already_running:
        _postgres_note.append("PostgreSQL: the throwaway cluster of .ci/postgres was already running; it was used and left running")
        yield started.stdout.strip()
        return
    _postgres_note.append("PostgreSQL: a throwaway cluster was started for this run (.ci/postgres) and stopped after it")
    yield started.stdout.strip()
    subprocess.run([str(THROWAWAY_POSTGRES), "--stop"], capture_output=True, check=False)


def pytest_terminal_summary(terminalreporter):
    for line in dict.fromkeys(_postgres_note):
        terminalreporter.write_line(line)


@pytest.fixture
def postgres_url(postgres_server_url):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    url = create_database(postgres_server_url)
    yield url
    drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'defectscan.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def migrated_url(database_url):
    """A database with the current schema."""
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine

    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    return database_url


@pytest.fixture
def session(migrated_url):
    """A session on a fresh database with the current schema (SQLite and PostgreSQL)."""
    from defectscan.db.session import make_engine, session_factory

    engine = make_engine(migrated_url)
    with session_factory(engine)() as session:
        yield session
    engine.dispose()


@pytest.fixture
def factory(migrated_url):
    """A sessionmaker on a fresh database with the current schema (SQLite and PostgreSQL)."""
    from defectscan.db.session import make_engine, session_factory

    engine = make_engine(migrated_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def cluster():
    """A real Dask LocalCluster with one worker process, shared by the tests that only need one."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local, Client(local) as client:
        yield client


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _shared_database(what: str, helpers: str, backend: str):
    """A session fixture: the database `helpers`.populate(url, folder) writes once on `backend`, then only read."""

    @pytest.fixture(scope="session")
    def database(request, tmp_path_factory):
        import importlib

        populate = importlib.import_module(helpers).populate
        root = tmp_path_factory.mktemp(f"{what}-{backend}")
        if backend == "sqlite":
            return populate(f"sqlite:///{root / (what + '.sqlite')}", root)
        url = create_database(request.getfixturevalue("postgres_server_url"))
        request.session.config.add_cleanup(lambda: drop_database(url))
        return populate(url, root)

    return database


# queries_helpers' pipeline results and report_helpers' five lots, each written once per backend.
results_sqlite = _shared_database("results", "queries_helpers", "sqlite")
results_postgres = _shared_database("results", "queries_helpers", "postgres")
sqlite_report_db = _shared_database("report", "report_helpers", "sqlite")  # the HTML/browser tests: rendering is backend-free
postgres_report_db = _shared_database("report", "report_helpers", "postgres")


@pytest.fixture(scope="session", params=BACKENDS)
def results_db(request):
    """The pipeline results on SQLite and on PostgreSQL (each test using it runs on both)."""
    return request.getfixturevalue(f"results_{request.param}")


@pytest.fixture(scope="session", params=BACKENDS)
def report_db(request):
    """The report lots on SQLite and on PostgreSQL (each test using it runs on both)."""
    return request.getfixturevalue(f"{request.param}_report_db")


@pytest.fixture
def cli():
    """Run `defectscan ARGS...` in-process; returns click's Result (output, exit_code)."""
    from defectscan.cli import main

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None):
        return CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)

    return run

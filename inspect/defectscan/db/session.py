"""Engines and sessions for the results database (SQLite embedded default, PostgreSQL in production)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from defectscan.errors import DatabaseError, first_line
from defectscan.secrets import mask_secrets

log = logging.getLogger(__name__)


def normalize_url(url: str | URL) -> URL:
    """Pin the drivers defectscan ships with: psycopg 3 for PostgreSQL."""
    url = make_url(url)
    if url.get_backend_name() == "postgresql" and url.get_driver_name() != "psycopg":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite" and url.database and url.database.startswith("~"):
        # The driver would open a folder named "~" in the working directory, where the checks looked in $HOME.
        url = url.set(database=str(Path(url.database).expanduser()))
    return url


def display_url(url: str | URL) -> str:
    """The URL as it may be printed or logged: password masked, also one given as `?password=`."""
    return mask_secrets(make_url(url).render_as_string(hide_password=True))


def missing_sqlite_file(url: str | URL) -> Path | None:
    """The SQLite file a URL names, when it is not there (None for one that is, or another database)."""
    url = normalize_url(url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = Path(url.database).expanduser()
    return None if path.exists() else path


def require_existing(url: str | URL) -> None:
    """A SQLite file that is not there is said so, not created: reading commands on a mistyped path
    would otherwise leave an empty database (and its folders) behind. `db upgrade` creates it."""
    path = missing_sqlite_file(url)
    if path is not None:
        raise DatabaseError(f"no database at {path}: run `defectscan db upgrade` to create it (or check --database-url)")


def make_engine(url: str | URL) -> Engine:
    url = normalize_url(url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True)


def _sqlite_engine(url: URL) -> Engine:
    path = None
    if url.database and url.database != ":memory:":
        path = Path(url.database).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create the directory for SQLite database {path}: {exc.strerror}") from None
    if path is not None and path.is_file() and not os.access(path.parent, os.W_OK):
        # A WAL database needs its -shm file beside it, which a read-only folder (a read-only mount,
        # an archive copy) cannot hold: open it immutable, so QA can still query it; writes say read-only.
        wal = path.with_name(path.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            # Immutable reads ignore the -wal: commits not yet checkpointed into the file would be missing.
            raise DatabaseError(f"{path}: its folder is read-only and its -wal file holds {wal.stat().st_size} bytes of commits not yet "
                                "in the database file, which a read-only open would not show: open it where it can be written, "
                                "or copy it with its -wal and -shm files to a writable folder")
        return _read_only_sqlite_engine(url, path)
    # Several processes (job runner, CLI queries) share the file: wait for locks instead of failing.
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    return engine


def _read_only_sqlite_engine(url: URL, path: Path) -> Engine:
    import sqlite3

    log.info("%s: its folder is read-only, the database is opened read-only", path)
    target = f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"
    return create_engine(url, creator=lambda: sqlite3.connect(target, uri=True, timeout=30, check_same_thread=False))


def is_read_only_error(exc: BaseException) -> bool:
    """SQLite's "attempt to write a readonly database", PostgreSQL's read-only transaction (SQLSTATE 25006)."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) == "25006" or "readonly database" in str(orig) or "read-only" in str(orig)


def database_error(exc: DBAPIError, what: str) -> DatabaseError:
    """One line for a driver error (password masked): read-only says so, anything else gives the driver's first line."""
    reason = first_line(exc.orig if exc.orig is not None else exc)
    if is_read_only_error(exc):
        return DatabaseError(f"{what}: the database is read-only ({reason}); commands that only read results still work")
    return DatabaseError(f"{what}: {reason}")


def check_connection(engine: Engine) -> None:
    """Connect once, turning driver errors into one line without the password."""
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = first_line(exc.orig if exc.orig is not None else exc)
        raise DatabaseError(f"cannot connect to database {display_url(engine.url)}: {reason}") from None


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)

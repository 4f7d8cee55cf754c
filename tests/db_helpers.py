"""Throwaway databases and raw reads: the one way tests make a PostgreSQL database and look at rows.

`create_database(server)` makes an empty database (or a copy of `template`) on a PostgreSQL server
and returns its URL; `drop_database(url)` removes it, and does nothing once the server itself is
gone (the throwaway cluster conftest started may be stopped before session-scoped cleanups run).
`query(url, sql)` reads rows with plain SQL, independently of defectscan's own queries; the rows
read by column name (`row.verdict`).
"""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError


def _admin(url: str):
    return create_engine(make_url(url).set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT")


def create_database(server_url: str, *, template: str | None = None) -> str:
    """A new database on the server of `server_url` (empty, or a copy of database `template`); its URL."""
    name = f"{template}_copy_{uuid.uuid4().hex[:8]}" if template else f"defectscan_test_{uuid.uuid4().hex[:12]}"
    admin = _admin(server_url)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    finally:
        admin.dispose()
    return make_url(server_url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    admin = _admin(url)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    except OperationalError:
        pass  # the server is stopped already, and the database with it
    finally:
        admin.dispose()


def query(url: str, sql: str, **params):
    """Rows of a raw SQL query: the tests' independent view of what is stored."""
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg") if url.startswith("postgresql") else url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).all()
    finally:
        engine.dispose()

"""Schema migrations with Alembic: upgrade, current revision, history, and the version check
every command runs before it touches the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine

from defectscan.db.session import check_connection, display_url
from defectscan.errors import DatabaseError
from defectscan.paths import MIGRATIONS_DIR


@dataclass(frozen=True)
class SchemaState:
    url: str
    current: str | None
    head: str

    @property
    def is_current(self) -> bool:
        return self.current == self.head


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # env.py uses this connection rather than opening its own.
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    check_connection(engine)
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            yield connection
        return
    with engine.connect() as connection:
        # SQLite alters most things by copying a table and dropping the old one; with foreign keys on,
        # the drop cascades (every inspection of a copied `models`) or sets NULL (every inspection's
        # job run when `job_runs` is copied). Off while migrating (a PRAGMA that only takes outside a
        # transaction), and the references checked before the commit instead.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
        # Python's sqlite3 runs CREATE/ALTER/DROP outside any transaction unless one is open, so a failed
        # or interrupted migration left half a schema that every later upgrade tripped over: the
        # transaction is opened by hand (BEGIN IMMEDIATE: no other writer in between) and holds the DDL.
        dbapi_connection = connection.connection.dbapi_connection
        dbapi_connection.isolation_level = None
        try:
            with connection.begin():
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                yield connection
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise DatabaseError(f"{display_url(engine.url)}: after the migration {len(broken)} rows have references that do "
                                        f"not resolve (first: table {broken[0][0]}, row {broken[0][1]}; they may have been there "
                                        "before it); nothing was changed")
        finally:
            dbapi_connection.isolation_level = ""
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def schema_state(engine: Engine) -> SchemaState:
    """Where the database's schema stands against this code's migrations."""
    scripts = _scripts()
    check_connection(engine)
    with engine.connect() as connection:
        heads = MigrationContext.configure(connection).get_current_heads()
    head = scripts.get_current_head()
    for revision in heads:
        try:
            known = scripts.get_revision(revision)
        except CommandError:
            known = None
        if known is None:
            raise DatabaseError(
                f"database {display_url(engine.url)} has schema revision '{revision}', which this version of "
                f"defectscan does not know (it knows up to '{head}'): a newer defectscan upgraded it (upgrade "
                "defectscan rather than the database), or it is not a defectscan database"
            )
    return SchemaState(url=display_url(engine.url), current=heads[0] if heads else None, head=head)


def upgrade(engine: Engine, revision: str = "head") -> tuple[SchemaState, SchemaState]:
    """Bring the schema up to `revision`; a database already there is left untouched (but for rollups to fill)."""
    before = schema_state(engine)
    _check_upgradable(engine, before, revision)
    if revision == "head" and before.is_current:
        with engine.begin() as connection:  # nothing to migrate: no table copies, no reference check over every row
            _fill_rollups(connection)
        return before, before
    with migration_connection(engine) as connection:
        try:
            command.upgrade(alembic_config(connection), revision)
        except CommandError as exc:
            raise DatabaseError(f"cannot upgrade {display_url(engine.url)} to '{revision}': {exc}") from None
        if MigrationContext.configure(connection).get_current_heads() == (before.head,):
            _fill_rollups(connection)
    return before, schema_state(engine)


def _check_upgradable(engine: Engine, before: SchemaState, revision: str) -> None:
    """Refuse what `upgrade` would do silently wrong: install defectscan's tables beside another application's,
    or "upgrade" to a revision below the current one (Alembic does nothing and says so in no way)."""
    from sqlalchemy import inspect

    url = display_url(engine.url)
    known = [script.revision for script in _scripts().walk_revisions()]
    if revision != "head" and revision not in known:
        # Alembic's own forms (base, -1, an empty one) went through: `base` said "already at 0003", an empty one failed an assertion.
        raise DatabaseError(f"--revision {revision!r}: expected head or one of this defectscan's schema revisions ({', '.join(known)})")
    if before.current is None:
        others = sorted(set(inspect(engine).get_table_names()) - {"alembic_version"})
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise DatabaseError(f"{url} holds tables ({shown}) but no defectscan schema revision: not a defectscan "
                                "database; give defectscan a database of its own")
        return
    if revision not in ("head", before.current):
        below = {script.revision for script in _scripts().walk_revisions(base="base", head=before.current)} - {before.current}
        if revision in below:
            raise DatabaseError(f"{url} is at revision '{before.current}', above '{revision}': db upgrade does not downgrade")


def _fill_rollups(connection: Connection) -> None:
    """Rollups that a migration created empty are counted here, in the upgrade's transaction, once the schema
    is the one this code's models describe (a migration that used them would break when they change)."""
    from sqlalchemy.orm import Session

    from defectscan.db.reviews import fill_review_daily

    session = Session(bind=connection)
    fill_review_daily(session)
    session.flush()


def require_current(engine: Engine) -> None:
    """Refuse to work on a schema that is behind or ahead of this code."""
    state = schema_state(engine)
    if state.current is None:
        raise DatabaseError(f"database {state.url} has no defectscan schema yet: run `defectscan db upgrade`")
    if not state.is_current:
        raise DatabaseError(
            f"database {state.url} is at schema revision '{state.current}', this defectscan needs '{state.head}': "
            "run `defectscan db upgrade`"
        )


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, message) from the newest to the first."""
    return [
        (script.revision, script.down_revision if isinstance(script.down_revision, str) else None, script.doc or "")
        for script in _scripts().walk_revisions()
    ]

"""`defectscan db`: create and upgrade the results database schema."""

from __future__ import annotations

import click

from defectscan.cli.app import AppContext, pass_app


@click.group("db")
def db() -> None:
    """Create, upgrade and inspect the results database schema.

    \b
    Example:
        defectscan db upgrade
    """


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target schema revision.")
@pass_app
def upgrade_command(app: AppContext, revision: str) -> None:
    """Create the schema, or bring it up to date; a current database is left as it is.

    \b
    Example:
        defectscan db upgrade
        DEFECTSCAN_DATABASE_URL=postgresql://qa@db/defectscan defectscan db upgrade
    """
    from defectscan.db.migrate import upgrade

    before, after = upgrade(app.engine, revision)
    if before.current == after.current:
        click.echo(f"{after.url}: already at revision {after.current}, nothing to do")
    else:
        click.echo(f"{after.url}: upgraded from {before.current or 'empty'} to {after.current}")


@db.command("current")
@pass_app
def current_command(app: AppContext) -> None:
    """Show the database's schema revision and whether it is up to date.

    \b
    Example:
        defectscan db current
    """
    from defectscan.db.migrate import schema_state
    from defectscan.db.session import display_url, missing_sqlite_file

    url = app.settings.resolved_database_url
    if missing_sqlite_file(url) is not None:  # looked at, not created
        click.echo(f"{display_url(url)}: - no database file yet, so no schema yet: run `defectscan db upgrade`")
        return
    state = schema_state(app.engine)
    if state.current is None:
        status = "no schema yet: run `defectscan db upgrade`"
    elif state.is_current:
        status = "(head)"
    else:
        status = f"behind head {state.head}: run `defectscan db upgrade`"
    click.echo(f"{state.url}: {state.current or '-'} {status}")


@db.command("history")
def history_command() -> None:
    """List the schema revisions this version knows, newest first.

    \b
    Example:
        defectscan db history
    """
    from defectscan.db.migrate import history

    for revision, down, message in history():
        click.echo(f"{down or '<base>'} -> {revision}: {message.strip()}")

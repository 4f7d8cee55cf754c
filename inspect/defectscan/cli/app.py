"""The `defectscan` root group, the per-invocation context and the error style shared by all commands.

Command modules import heavy libraries (TensorFlow, Dask, Zarr) inside their functions, so
`defectscan --help` and the database commands start quickly.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import cached_property, update_wrapper
from pathlib import Path

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from defectscan import __version__
from defectscan.config import Settings, load_settings
from defectscan.errors import DefectscanError, first_line
from defectscan.exitcodes import EXIT_SIGINT, EXIT_SIGPIPE
from defectscan.interrupts import Interrupted
from defectscan.logs import configure_logging
from defectscan.native_logs import quiet_tensorflow_startup


class AppContext:
    """What a command needs from the global flags: settings, and the database opened on demand."""

    def __init__(self, ctx: click.Context, config_file: Path | None, database_url: str | None, log_level: str | None):
        self._ctx = ctx
        self._config_file = config_file
        self._overrides = {
            "database_url": (database_url, "--database-url"),
            "log_level": (log_level, "--log-level"),
        }

    @cached_property
    def settings(self) -> Settings:
        settings = load_settings(self._config_file, overrides=self._overrides)
        configure_logging(settings.log_level)
        return settings

    def settings_with(self, **flags: tuple[object, str]) -> Settings:
        """Settings with a command's own flags as the top layer: section__key=(value, "--flag")."""
        return load_settings(self._config_file, overrides={**self._overrides, **flags})

    @cached_property
    def engine(self) -> Engine:
        """An engine on the configured database, without any schema check (for `db` commands)."""
        from defectscan.db.session import make_engine

        engine = make_engine(self.settings.resolved_database_url)
        self._ctx.call_on_close(engine.dispose)
        return engine

    def session(self) -> Session:
        """A session on a database whose schema matches this code (checked once per command)."""
        from defectscan.db.migrate import require_current
        from defectscan.db.session import require_existing, session_factory

        if "_checked" not in self.__dict__:
            require_existing(self.settings.resolved_database_url)
            require_current(self.engine)
            self.__dict__["_checked"] = True
        return session_factory(self.engine)()


def pass_app(f):
    """Decorator: call the command with the AppContext as its first argument."""

    @click.pass_context
    def new_func(ctx: click.Context, *args, **kwargs):
        return ctx.invoke(f, ctx.find_object(AppContext), *args, **kwargs)

    return update_wrapper(new_func, f)


class DefectscanGroup(click.Group):
    """Turns user errors into one `Error: ...` line and exit status 1 (usage errors stay 2)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Registration order follows the data path; alphabetical order would scatter it.
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DefectscanError as exc:
            raise click.ClickException(str(exc)) from None
        except DBAPIError as exc:
            from defectscan.db.session import database_error

            raise click.ClickException(str(database_error(exc, "database error"))) from None
        except Interrupted as exc:
            # Not click's "Aborted!" and status 1: schedulers read 143 (SIGTERM) and 130 (SIGINT) as "stopped".
            click.echo(f"Stopped by {exc}; a rerun continues where this one stopped.", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Stopped by SIGINT.", err=True)
            ctx.exit(EXIT_SIGINT)
        except BrokenPipeError:
            # The reader went away (`defectscan ... | head`): quiet, with the status SIGPIPE would have given.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_SIGPIPE)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            # A bug or a failure nobody foresaw: one line for the user, the traceback on request.
            if logging.getLogger("defectscan").isEnabledFor(logging.DEBUG):
                raise
            text = first_line(exc)
            named = text if text.startswith(f"{type(exc).__name__}:") else f"{type(exc).__name__}: {text}"
            raise click.ClickException(f"{named} (rerun with --log-level DEBUG for the traceback)") from None


@click.group(cls=DefectscanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="defectscan")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DEFECTSCAN_CONFIG",
    help="YAML settings file layered over configs/defaults.yaml (env: DEFECTSCAN_CONFIG).",
)
@click.option("--database-url", metavar="URL", help="Results database, e.g. postgresql://user@host/defectscan.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, database_url: str | None, log_level: str | None) -> None:
    """defectscan: inspect product images for defects in batch, and query the results.

    Settings come from configs/defaults.yaml, then --config FILE, then DEFECTSCAN_*
    environment variables, then these flags.

    \b
    Example:
        defectscan db upgrade
        defectscan --database-url postgresql://qa@db/defectscan db current
    """
    # Before any command can import TensorFlow; the settings' log level (DEBUG) can still undo it.
    quiet_tensorflow_startup(quiet=(log_level or "").upper() != "DEBUG")
    ctx.obj = AppContext(ctx, config_file, database_url, log_level.upper() if log_level else None)

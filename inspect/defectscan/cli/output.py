"""Output shared by the listing commands: `--format table|csv|json|ndjson`, `--limit`/`--offset`.

Columns keep their names and order in every format, so scripts can rely on them; times are ISO
8601 UTC. A table goes to a terminal by default; piped output defaults to CSV.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

import click

from defectscan.db.schema import MAX_ROW_ID

# A count of rows on the command line (a --limit): bounded so that a query's offset + limit + 1 stays a BIGINT.
ROW_COUNT = click.IntRange(min=1, max=MAX_ROW_ID // 2)
# A database row id on the command line: BIGINT's range (past it SQLite raised OverflowError, naming nothing).
ROW_ID = click.IntRange(min=1, max=MAX_ROW_ID)

FORMATS = ("table", "csv", "json", "ndjson")


def output_options(f: Callable) -> Callable:
    """Adds `--format`; the command receives `fmt`, resolved (table on a terminal, csv otherwise)."""

    @click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default=None,
        help="Output format (default: table on a terminal, csv when piped). Columns are stable for scripts.",
    )
    @wraps(f)
    def wrapper(*args, fmt: str | None, **kwargs):
        return f(*args, fmt=fmt or default_format(), **kwargs)

    return wrapper


def limit_options(default: int = 50) -> Callable:
    """Adds `--limit` and `--offset` (pagination: the next page starts at offset + limit)."""

    def decorate(f: Callable) -> Callable:
        # Bounded so that offset + limit + 1 stays a BIGINT (past it the driver raised OverflowError).
        f = click.option("--offset", type=click.IntRange(min=0, max=MAX_ROW_ID // 2), default=0, show_default=True,
                         help="Skip this many rows first.")(f)
        return click.option("--limit", type=ROW_COUNT, default=default, show_default=True,
                            help="Most rows to print.")(f)

    return decorate


def default_format() -> str:
    return "table" if sys.stdout.isatty() else "csv"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def print_rows(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: str,
    *,
    empty: str,
    more_hint: str | None = None,
    title: str | None = None,
) -> None:
    """Print rows in `fmt`; `empty` is printed (to stderr for machine formats) when there are none.

    `more_hint` says how to get the next page; a table prints it under the rows, the machine
    formats on stderr so that stdout stays parseable.
    """
    if not rows:
        click.echo(empty, err=fmt != "table")
        if fmt == "json":
            click.echo("[]")
        elif fmt == "csv":
            _csv([], columns)
        return
    if fmt == "table":
        _table(rows, columns, title)
    elif fmt == "csv":
        _csv(rows, columns)
    elif fmt == "json":
        click.echo(json.dumps([{c: row.get(c) for c in columns} for row in rows], indent=2))
    else:
        for row in rows:
            click.echo(json.dumps({c: row.get(c) for c in columns}))
    if more_hint:
        click.echo(more_hint, err=fmt != "table")


def print_record(record: dict[str, Any], fmt: str, *, title: str | None = None) -> None:
    """One object: a two-column field/value table, or JSON/NDJSON/CSV (one row) for scripts."""
    if fmt == "json":
        click.echo(json.dumps(record, indent=2))
    elif fmt == "ndjson":
        click.echo(json.dumps(record))
    elif fmt == "csv":
        _csv([record], list(record))
    else:
        _table([{"field": k, "value": _text(v)} for k, v in record.items() if not isinstance(v, list)], ["field", "value"], title)


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    stream = sys.stdout
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_text(row.get(c)) if isinstance(row.get(c), list | dict) else ("" if row.get(c) is None else row.get(c)) for c in columns])
    stream.flush()


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # No vertical rules: columns stay easy to copy and to cut with awk.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        numeric = all(isinstance(row.get(column), int | float) or row.get(column) is None for row in rows)
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    from rich.text import Text

    for row in rows:
        # Text, not markup: a lot named L[b]042 or a note "[left edge]" is shown as it is.
        table.add_row(*(Text(_text(row.get(c))) for c in columns))
    # A wide fixed width when not a terminal keeps rows unwrapped in files and pipes.
    stream = sys.stdout
    console = Console(file=stream, width=None if stream.isatty() else 200, highlight=False, soft_wrap=False)
    console.print(table)

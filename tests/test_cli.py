"""The command line: groups, help with examples, error style and exit codes, db commands."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from sqlalchemy.engine import make_url

from defectscan import __version__
from defectscan.cli import main
from defectscan.db.migrate import history

# The newest revision: the tests follow new migrations without a literal to update.
HEAD = history()[0][0]

GROUPS = ["db", "data", "ingest", "imagesets", "train", "evaluate", "models", "inspect", "jobs", "defects", "images", "lots", "review", "report"]


def _all_commands(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _all_commands(sub, (*path, name))


def test_help_lists_the_command_groups_in_data_path_order(cli):
    result = cli("--help")
    assert result.exit_code == 0
    commands = result.output.split("Commands:\n")[1].splitlines()
    listed = [line.split()[0] for line in commands if line.startswith("  ") and not line.startswith("   ")]
    assert listed == GROUPS
    for option in ("--config", "--database-url", "--version"):
        assert option in result.output


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"defectscan, version {__version__}"


@pytest.mark.parametrize("path", [path for path, _ in _all_commands(main)], ids=lambda p: " ".join(p) or "defectscan")
def test_every_command_has_help_ending_with_an_example(path):
    command = main
    for name in path:
        command = command.commands[name]
    text = (command.help or "").strip()
    assert text, f"`defectscan {' '.join(path)}` has no help"
    last_paragraph = text.split("\n\n")[-1]
    assert "Example:" in last_paragraph, f"`defectscan {' '.join(path)}` help does not end with an example"
    examples = [line.strip() for line in last_paragraph.split("Example:", 1)[1].splitlines() if line.strip()]
    assert examples and all("defectscan " in line for line in examples)


def test_usage_error_exits_2(cli):
    result = cli("db", "no-such-command")
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_bad_setting_is_one_line_without_traceback(cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("log_level: 7\n")
    result = cli("--config", str(config), "db", "current")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {config}: key 'log_level' has value 7")
    assert "Traceback" not in result.output


def test_unreachable_database_is_one_line_and_hides_the_password(cli):
    result = cli("--database-url", "postgresql://qa:hunter2@127.0.0.1:9/defectscan", "db", "current")
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot connect to database postgresql://qa:***@127.0.0.1:9/defectscan: ")
    assert result.output.count("\n") == 1
    assert "hunter2" not in result.output



def test_db_upgrade_current_history_on_both_backends(cli, database_url):
    result = cli("--database-url", database_url, "db", "current")
    assert result.exit_code == 0, result.output
    assert "no schema yet" in result.output

    result = cli("--database-url", database_url, "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert f"upgraded from empty to {HEAD}" in result.output

    result = cli("--database-url", database_url, "db", "upgrade")
    assert f"already at revision {HEAD}, nothing to do" in result.output

    result = cli("--database-url", database_url, "db", "current")
    assert result.exit_code == 0
    assert result.output.strip().endswith(f"{HEAD} (head)")
    password = make_url(database_url).password
    if password:
        assert f":{password}@" not in result.output
        assert ":***@" in result.output

    result = cli("--database-url", database_url, "db", "history")
    assert result.output.strip().splitlines() == ["0006 -> 0007: model precision", "0005 -> 0006: review lists in time order", "0004 -> 0005: review_daily: QA's figures per image set, model and capture day", "0003 -> 0004: reviews, model stage history and comparisons", "0002 -> 0003: run status abandoned", "0001 -> 0002: model operating point", "<base> -> 0001: initial schema"]


def test_database_url_from_environment(cli, database_url):
    result = cli("db", "upgrade", env={"DEFECTSCAN_DATABASE_URL": database_url})
    assert result.exit_code == 0, result.output
    result = cli("db", "current", env={"DEFECTSCAN_DATABASE_URL": database_url})
    assert f"{HEAD} (head)" in result.output


def test_default_database_is_sqlite_under_the_data_dir(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    result = cli("db", "upgrade")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "defectscan" / "defectscan.sqlite").is_file()
    assert f"sqlite:///{tmp_path}/defectscan/defectscan.sqlite" in result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "defectscan", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"defectscan, version {__version__}"


def test_one_line_errors_take_tensorflows_own_message_not_its_traceback_header():
    from defectscan.errors import first_line

    graph_error = TypeError('in user code:\n\n    File "/x/train.py", line 3, in step  *\n        return f(x)\n\n    TypeError: cannot add str and int\n')
    assert first_line(graph_error) == "TypeError: cannot add str and int"
    assert first_line(ValueError("bad value\nsecond line")) == "bad value"
    assert first_line(ValueError("")) == ""
    assert first_line(ValueError("postgresql://u:secret@h/db unreachable")).count("secret") == 0

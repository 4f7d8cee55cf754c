"""Every `defectscan ...` example in the README, docs/ and the commands' help parses against the real CLI:
the command exists, its options exist, values are of the accepted kinds. (Files the examples name are
the user's own, so a missing one is not an error here; the commands themselves run in their own tests.)"""

from __future__ import annotations

import re
import shlex

import click
import pytest

from defectscan.cli import main
from defectscan.paths import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _shell_lines(text: str):
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()


def _command(line: str) -> list[str] | None:
    """The arguments after `defectscan` in a shell line (env assignments, comments, pipes and redirects dropped)."""
    line = line.split(" #", 1)[0].strip()
    if not re.match(r"(?:[A-Z_][A-Z0-9_]*=\S+\s+)*defectscan\s", line):
        return None
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]
    if not words or words[0] != "defectscan":
        return None
    args = []
    for word in words[1:]:
        if word in ("|", ">", ">>", "&&", ";", "2>&1"):
            break
        args.append(word)
    return args


def _examples():
    for doc in DOCS:
        for line in _shell_lines(doc.read_text()):
            args = _command(line)
            if args is not None:
                yield pytest.param(args, id=f"{doc.name}: defectscan {' '.join(args)}"[:120])
    stack = [((), main)]
    while stack:
        path, command = stack.pop()
        text = (command.help or "").split("Example:", 1)
        for line in text[1].splitlines() if len(text) == 2 else []:
            args = _command(line.strip())
            if args is not None:
                yield pytest.param(args, id=f"help of {' '.join(path) or 'defectscan'}: {' '.join(args)}"[:120])
        if isinstance(command, click.Group):
            stack += [((*path, name), sub) for name, sub in command.commands.items()]


def _parse(args: list[str]) -> None:
    """Parse like click would before running, without running anything."""
    ctx = main.make_context("defectscan", list(args))
    command, rest = main, ctx.protected_args + ctx.args
    while isinstance(command, click.Group) and rest:
        name, sub, rest = command.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
        command, rest = sub, (ctx.protected_args + ctx.args if isinstance(sub, click.Group) else ctx.args)
    assert not isinstance(command, click.Group) or not rest, f"incomplete command: {args}"


@pytest.mark.filterwarnings("ignore:'protected_args' is deprecated")  # click 8's way to see a group's remaining words
@pytest.mark.parametrize("args", list(_examples()))
def test_documented_command_parses(args):
    try:
        _parse(args)
    except FileNotFoundError:
        pass  # an example names the user's own files; checking they exist is not the point here
    except click.UsageError as exc:
        if "does not exist" in exc.format_message():
            return
        pytest.fail(f"`defectscan {shlex.join(args)}` does not parse: {exc.format_message()}")


def test_the_docs_have_examples():
    assert len(list(_examples())) > 50

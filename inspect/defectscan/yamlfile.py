"""The YAML files defectscan reads (settings, training recipes, job specs, model metadata): one reader, one set of errors.

Each error names the file, the line where the parser stopped, and what the file should have held.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from defectscan.errors import DefectscanError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe YAML 1.1, with 1e3 and 2.5E-4 read as numbers, as YAML 1.2 and JSON read them: YAML 1.1 wants
    a dot in a float, so `steps: 1e3` was the text '1e3' and refused as no number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """One YAML value or document, read as every defectscan file is (settings, recipes, specs, --set values)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def read_text(path: Path, what: str, error: type[DefectscanError]) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; expected a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        # A file saved as UTF-16 (Windows Notepad) or a binary one: name it, rather than fail the listing of every other.
        raise error(f"{path}: cannot read {what}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x}); save it as UTF-8") from None


def parse_mapping(text: str, path: Path, contents: str, error: type[DefectscanError]) -> dict[str, Any]:
    """The top-level mapping of a YAML (or JSON) text; an empty file is an empty mapping."""
    try:
        # JSON is YAML, but PyYAML's YAML 1.1 reads JSON's 1e-07 as a string: a .json file is read as JSON.
        data = json.loads(text) if Path(path).suffix == ".json" and text.strip() else load_yaml(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} line {exc.lineno}: not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {contents} at the top level, got {type(data).__name__}")
    return data


def read_mapping(path: Path, *, what: str, contents: str, error: type[DefectscanError]) -> dict[str, Any]:
    """read_text + parse_mapping: e.g. what="settings file", contents="settings"."""
    return parse_mapping(read_text(path, what, error), path, contents, error)


class Section(BaseModel):
    """A section of one of these files: unknown keys refused, no true/false (or YAML's yes/no/on/off) taken
    as a number (pydantic would read `steps: true` as 1 step), no empty text taken as a path."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = _kinds(cls.model_fields[info.field_name].annotation) if info.field_name is not None else set()
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("expected a number, not a yes/no value")
        if isinstance(value, str) and not value.strip() and Path in kinds:
            # pydantic reads "" as Path("."): an empty DEFECTSCAN_DATA_DIR put the database in the working folder.
            raise ValueError("expected a path, got an empty value")
        return value


def _kinds(annotation: Any) -> set[Any]:
    """The types a field takes: {int} for `int`, {int, NoneType} for `int | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set(typing.get_args(annotation))
    return {annotation}

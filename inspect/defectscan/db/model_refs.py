"""Model references: one grammar and one meaning wherever a command takes --model or a job names its model.

    NAME            the version of NAME registered last (the same as NAME:latest)
    NAME:VERSION    that version
    NAME:STAGE      the version of NAME in that stage registered last (staging, production, archived)
    NAME:*          every version of NAME; only where results are selected (lots, images, defects, report)

A job spec that names no version runs NAME:production (jobs/spec.py): what nobody promoted runs nowhere.
A version may not be named `latest`, `*` or after a stage, so a reference never has two readings.
`demo` stands for the shipped demo model's name in every command, and bare for its production
version (what `inspect --model demo` and the demo job run), so results are selected as they were made.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from defectscan.db.schema import MODEL_STAGES, Model
from defectscan.errors import DataError, ModelError, suggest

LATEST = "latest"
EVERY = "*"
# Words that select a version rather than name one.
SELECTORS = (LATEST, EVERY, *MODEL_STAGES)
ONE_VERSION = "NAME, NAME:VERSION or NAME:STAGE"
GRAMMAR = "NAME, NAME:VERSION, NAME:STAGE or NAME:*"
DEMO_ALIAS = "demo"


@dataclass(frozen=True)
class ModelReference:
    name: str
    # A version name, `latest`, a stage, or `*`.
    selector: str = LATEST

    @property
    def every(self) -> bool:
        return self.selector == EVERY

    def __str__(self) -> str:
        return self.name if self.selector == LATEST else f"{self.name}:{self.selector}"


def parse(text: str) -> ModelReference:
    name, _, selector = str(text).strip().partition(":")
    if not name or (":" in text and not selector):
        raise ModelError(f"model reference {text!r}: expected {GRAMMAR}")
    return ModelReference(name, selector or LATEST)


def expand_alias(text: str) -> str:
    """`demo` -> the demo model's production version, `demo:X` -> its X; any other reference as it is."""
    name, colon, selector = str(text).strip().partition(":")
    if name != DEMO_ALIAS:
        return str(text)
    return f"{demo_name()}:{selector if colon else 'production'}"


def model_name(text: str) -> str:
    """A model NAME as commands about all of a name's versions take it (`demo`: the demo model's name); a
    NAME:VERSION there is refused by name rather than matching nothing."""
    name = str(text).strip()
    if name == DEMO_ALIAS:
        return demo_name()
    if ":" in name:
        raise ModelError(f"{text!r}: expected a model NAME, e.g. {name.partition(':')[0] or 'line3'} (this command is about all its versions)")
    return name


@functools.cache
def demo_name() -> str:
    """The name the shipped demo model is registered under (its metadata file's)."""
    from defectscan.paths import DEMO_METADATA

    return json.loads(DEMO_METADATA.read_text())["name"]


def version_text(value):
    """A version written as a number in YAML or `--set` (`version: 3`) is the name "3"; anything else as given."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def check_version_name(version: str) -> None:
    """Registration refuses version names that would read as a selector."""
    if version in SELECTORS or ":" in version:
        raise ModelError(f"version {version!r} would read as a selector in a model reference ({', '.join(SELECTORS)}); choose another name")


def check_model_name(name: str) -> None:
    """Registration refuses model names no reference could name: NAME:VERSION splits at the first ':', and
    spaces around a name are lost on a command line."""
    if ":" in name or name != name.strip() or not name:
        raise ModelError(f"model name {name!r} cannot be named in a reference NAME:VERSION (no ':' and no leading or "
                         "trailing spaces); choose another name")


def resolve(session: Session, reference: str | ModelReference) -> Model:
    """The one registered version a reference names (commands that run or show one model)."""
    ref = parse(expand_alias(reference)) if isinstance(reference, str) else reference
    if ref.every:
        raise ModelError(f"model reference {ref}: names every version of {ref.name}; give one ({ONE_VERSION})")
    query = select(Model).where(Model.name == ref.name)
    if ref.selector in MODEL_STAGES:
        query = query.where(Model.stage == ref.selector)
    elif ref.selector != LATEST:
        query = query.where(Model.version == ref.selector)
    row = session.scalars(query.order_by(Model.id.desc())).first()
    if row is None:
        versions = session.execute(select(Model.name, Model.version, Model.stage).order_by(Model.name, Model.id)).all()
        known = ", ".join(f"{n}:{v} ({s})" for n, v, s in versions) or "none registered"
        hint = ""
        if ref.selector == "production" and any(n == ref.name for n, _, _ in versions):
            hint = f"; promote one (defectscan models promote {ref.name}:VERSION)"
        raise ModelError(f"no model {ref} in the registry; known: {known}{hint}")
    return row


def matching_ids(session: Session, reference: str) -> list[int]:
    """Ids of the versions a reference selects results of (every version for NAME:*); unknown ones are named with close matches."""
    try:
        ref = parse(expand_alias(reference))
        if ref.every:
            ids = list(session.scalars(select(Model.id).where(Model.name == ref.name)))
        else:
            ids = [resolve(session, ref).id]
    except ModelError:
        ids = []
    if not ids:
        known = sorted(f"{n}:{v}" for n, v in session.execute(select(Model.name, Model.version)))
        names = sorted({k.split(":")[0] for k in known})
        raise DataError(f"unknown model {reference!r}: expected {GRAMMAR} of a registered model{suggest(reference, known + names)}")
    return ids

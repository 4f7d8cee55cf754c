"""Job specs: one YAML file per scheduled factory job, validated into `JobSpec`.

A spec says what to inspect (a glob of Zarr stores, or a filter over registered image sets),
with which model, on which cluster, and the inspection settings that differ from the
defaults. It never holds a secret: specs live in git, so the database URL and TLS keys come
from the environment or files (a URL with a password in it is refused). Every error names the
file, the line, the key, the value and what is accepted.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from defectscan.config import NULL, InspectionSettings, Settings, check_scheduler, load_settings
from defectscan.errors import ConfigError, DefectscanError
from defectscan.secrets import mask_secrets
from defectscan.times import parse_iso
from defectscan.yamlfile import Section, parse_mapping, read_text

SPEC_SUFFIX = ".yaml"
# A Kubernetes CronJob name holds at most 52 characters; "defectscan-" is prepended to job names.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,39}[a-z0-9])?$")
_SINCE = re.compile(r"^(?P<n>\d+)(?P<unit>[mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Keys that hold secrets or connection details of the deployment, not of a job.
# What a job runs when its spec names no version: a stage (db/schema.MODEL_STAGES), not `latest`.
DEFAULT_MODEL_SELECTOR = "production"
_DEPLOYMENT_KEYS = {"database_url", "password", "secret", "token", "key_pem", "cert_pem"}


class SpecError(ConfigError):
    """A job spec is missing, malformed, or has a key or value that is not accepted."""


class _Part(Section):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Part):
    """Where the job finds its image sets: stores to discover, and/or a filter over registered sets."""

    # A path or fsspec URL glob of Zarr stores; relative paths are relative to the spec's folder.
    glob: str | None = None
    array: str = "images"
    lot: str | None = None
    line: str | None = None
    product: str | None = None
    # Only image sets acquired in this window: 30m, 12h, 7d, 2w, or an ISO 8601 time.
    since: str | None = None

    @field_validator("since", mode="before")
    @classmethod
    def _since_as_text(cls, value):
        # `since: 2026-01-31` unquoted is a YAML date: the documented ISO form, taken as such.
        return value.isoformat() if isinstance(value, dt.date) else value

    @field_validator("since")
    @classmethod
    def _since(cls, value: str | None) -> str | None:
        if value is not None:
            since_time(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> SourceSpec:
        if not any((self.glob, self.lot, self.line, self.product, self.since)):
            raise ValueError("give a glob of Zarr stores, or at least one of lot, line, product, since to filter registered image sets")
        return self


class ModelSpec(_Part):
    name: str = Field(min_length=1)
    # A registered version, a stage, or `latest` (db/model_refs.py). Jobs default to the version in
    # production, so a newly registered version runs nowhere until someone promotes it (model/stages.py).
    # `model: NAME:VERSION` is the short form; a bare `model: NAME` takes this default too.
    version: str = DEFAULT_MODEL_SELECTOR
    # The older spelling of `version: STAGE`.
    stage: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        from defectscan.db.model_refs import version_text

        return version_text(value)

    @field_validator("stage")
    @classmethod
    def _stage(cls, value: str | None) -> str | None:
        from defectscan.db.schema import MODEL_STAGES

        if value is not None and value not in MODEL_STAGES:
            raise ValueError(f"expected one of {', '.join(MODEL_STAGES)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _version_or_stage(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("stage") is not None:
            # `version: latest` with a stage was the documented form before jobs defaulted to a stage.
            if "version" in value and str(value["version"]) not in ("latest", value["stage"]):
                raise ValueError("give a version or a stage, not both")
            value = {**value, "version": value["stage"]}
        return value

    @property
    def reference(self) -> str:
        """The model reference this names (db/model_refs.py)."""
        from defectscan.db.model_refs import ModelReference

        return str(ModelReference(self.name, self.version))


class TLSSpec(_Part):
    ca_file: Path
    cert_file: Path
    key_file: Path


class ClusterSpec(_Part):
    # `local` starts a local cluster for the run; tls://host:8786 uses a running scheduler.
    scheduler: str | None = None
    n_workers: int | None = Field(default=None, ge=1)
    tls: TLSSpec | None = None

    @field_validator("scheduler")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return check_scheduler(value)


class RetrySpec(_Part):
    # Database writes and connections are retried this many times, backing off exponentially.
    attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=0.5, gt=0, le=60)


class LockSpec(_Part):
    # A runner refreshes its lock every stale_after_s / 5 seconds; a lock older than this belongs
    # to a runner that died and is taken over.
    stale_after_s: float = Field(default=300, ge=5)


class JobSpec(_Part):
    name: str
    schedule: str
    timezone: str = "UTC"
    description: str | None = None
    source: SourceSpec
    model: ModelSpec
    # Any key of the `inspection` settings section: threshold, min_defect_area, fail_score, batch_size, ...
    inspection: dict[str, Any] = Field(default_factory=dict)
    cluster: ClusterSpec = ClusterSpec()
    # Shards in flight at once; default: workers x cluster.shards_in_flight_per_worker.
    max_in_flight: int | None = Field(default=None, ge=1)
    retries: RetrySpec = RetrySpec()
    lock: LockSpec = LockSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("expected lower-case letters, digits and '-', at most 41 characters, starting and ending with a letter or digit")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        check_cron(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("expected an IANA time zone such as UTC or Europe/Berlin") from None
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        # `model: demo`, `model: tinyunet-dagm:3` or `model: line3:latest`
        if isinstance(value, str):
            from defectscan.db.model_refs import parse

            try:
                ref = parse(value)
            except DefectscanError as exc:
                raise ValueError(str(exc)) from None
            return {"name": ref.name, "version": ref.selector} if ":" in value else {"name": ref.name}
        return value

    @field_validator("inspection")
    @classmethod
    def _inspection_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(InspectionSettings.model_fields))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(InspectionSettings.model_fields))}")
        return value

    def setting_overrides(self, source: str) -> dict[str, tuple[Any, str]]:
        """The spec's settings as the top layer of load_settings / AppContext.settings_with: key -> (value, source)."""
        overrides: dict[str, tuple[Any, str]] = {}
        for key, value in self.inspection.items():
            # `threshold: null` in a spec means the model's own operating point, over a site config's value.
            overrides[f"inspection__{key}"] = (NULL if value is None else value, f"{source}: inspection.{key}")
        if self.cluster.scheduler not in (None, "local"):
            overrides["cluster__scheduler"] = (self.cluster.scheduler, f"{source}: cluster.scheduler")
        if self.cluster.n_workers is not None:
            overrides["cluster__n_workers"] = (self.cluster.n_workers, f"{source}: cluster.n_workers")
        if self.cluster.tls is not None:
            for name in ("ca_file", "cert_file", "key_file"):
                overrides[f"cluster__tls__{name}"] = (str(getattr(self.cluster.tls, name)), f"{source}: cluster.tls.{name}")
        return overrides

    def apply_to(self, settings: Settings) -> Settings:
        """`cluster.scheduler: local` forces a local cluster even where the environment names a scheduler."""
        if self.cluster.scheduler == "local":
            return settings.model_copy(update={"cluster": settings.cluster.model_copy(update={"scheduler": None})})
        return settings


def check_cron(expression: str) -> None:
    """A five-field cron expression (minute hour day-of-month month day-of-week), or ValueError."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"expected a cron expression of 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}; e.g. '*/30 * * * *'"
        )
    from croniter import croniter

    # Standard cron only: croniter's extensions (L, #, ?, W) mean nothing to crontab, systemd or Kubernetes.
    if not all(_STANDARD_FIELD.fullmatch(field) for field in fields) or not croniter.is_valid(expression):
        raise ValueError("not a valid cron expression; fields: minute 0-59, hour 0-23, day-of-month 1-31, month 1-12, day-of-week 0-6 (Sun=0)"
                         "; numbers, names (jan, mon), *, ranges a-b, lists a,b and steps /n")
    _check_ranges(fields)
    try:
        croniter(expression, dt.datetime(2026, 1, 1)).get_next(dt.datetime)
    except Exception:  # croniter's CroniterBadDateError: e.g. 30 February
        raise ValueError("the schedule never fires (no such date in any year, e.g. 30 February)") from None


_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 6))
_NAMED = {**{m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
          **{d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}}


def _check_ranges(fields: list[str]) -> None:
    """What croniter takes and Kubernetes' parser (robfig/cron) refuses or systemd reads otherwise: day-of-week 7,
    a range that wraps (22-2, fri-mon), a step of 0."""
    for field, (name, low, high) in zip(fields, _FIELDS, strict=True):
        for term in field.lower().split(","):
            span, _, step = term.partition("/")
            if step and int(step) == 0:
                raise ValueError(f"{name} '{term}': a step must be at least 1")
            if span == "*":
                continue
            first, _, last = span.partition("-")
            start, end = (_NAMED[v] if v in _NAMED else int(v) for v in (first, last or first))
            if not (low <= start <= high and low <= end <= high):
                raise ValueError(f"{name} '{span}' is outside {low}-{high}" + (" (Sunday is 0)" if name == "day-of-week" else ""))
            if start > end:
                raise ValueError(f"{name} range '{span}' runs backwards, which Kubernetes refuses; write it as two, e.g. 22-23,0-2")


_VALUE = rf"([0-9]+|{'|'.join(_NAMED)})"
_TERM = rf"(\*|{_VALUE}(-{_VALUE})?)(/[0-9]+)?"
_STANDARD_FIELD = re.compile(rf"{_TERM}(,{_TERM})*", re.IGNORECASE)


def next_run(spec: JobSpec, after: dt.datetime) -> dt.datetime:
    """The next scheduled time after `after`, in UTC."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    local = after.astimezone(ZoneInfo(spec.timezone))
    return croniter(spec.schedule, local).get_next(dt.datetime).astimezone(dt.UTC)


def since_time(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """`7d` -> seven days before now; an ISO 8601 time as given (UTC when it has no offset)."""
    match = _SINCE.match(value.strip())
    now = now or dt.datetime.now(dt.UTC)
    if match:
        try:
            return now - dt.timedelta(**{_UNITS[match["unit"]]: int(match["n"])})
        except OverflowError:
            raise ValueError(f"window {value.strip()} reaches before the year 1") from None
    try:
        return parse_iso(value)
    except ValueError:
        raise ValueError("expected a window such as 30m, 12h, 7d, 2w, or an ISO 8601 time such as 2026-01-31T06:00Z") from None


# ---- reading specs ----------------------------------------------------------------------------------


def spec_path(jobs_dir: Path, name: str) -> Path:
    return jobs_dir / f"{name}{SPEC_SUFFIX}"


def list_spec_files(jobs_dir: Path) -> list[Path]:
    if not jobs_dir.is_dir():
        raise SpecError(f"{jobs_dir}: no such jobs folder (give one with --jobs-dir)")
    return sorted(p for p in jobs_dir.glob(f"*{SPEC_SUFFIX}") if p.is_file())


def find_spec(jobs_dir: Path, name: str) -> Path:
    path = spec_path(jobs_dir, name)
    if not path.is_file():
        known = ", ".join(p.stem for p in list_spec_files(jobs_dir)) or "none"
        raise SpecError(f"no job '{name}': {path} does not exist; jobs in {jobs_dir}: {known}")
    return path


def load_spec(path: Path) -> JobSpec:
    """Read and validate one spec file; SpecError names the file, line, key, value and what is accepted."""
    text = read_text(path, "job spec", SpecError)
    data = parse_mapping(text, path, "job settings", SpecError)
    node = yaml.compose(text)
    lines = _key_lines(node)
    _refuse_secrets(path, data, lines)
    data.setdefault("name", path.stem)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(path, exc, lines)) from None
    if spec.name != path.stem:
        raise SpecError(f"{path}{_at(lines, ('name',))}: key 'name' has value {spec.name!r}: expected the file's name without .yaml, {path.stem!r}")
    try:
        # The settings layers check the inspection values (ranges, whole batches, ...), naming this file.
        load_settings(environ={}, overrides={k.replace("__", "."): v for k, v in spec.setting_overrides(str(path)).items()})
    except ConfigError as exc:
        raise SpecError(_with_lines(str(exc), str(path), lines)) from None
    return spec


def load_all(jobs_dir: Path) -> list[tuple[Path, JobSpec | SpecError]]:
    """Every spec of the folder; a bad one is returned as its error so the others still list."""
    found: list[tuple[Path, JobSpec | SpecError]] = []
    for path in list_spec_files(jobs_dir):
        try:
            found.append((path, load_spec(path)))
        except SpecError as exc:
            found.append((path, exc))
    return found


def resolve_glob(spec_file: Path, pattern: str) -> str:
    """Expand $VARIABLES and ~; a relative local pattern is relative to the spec's folder."""
    missing = [name for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", pattern) if name not in os.environ]
    if missing:
        raise SpecError(f"{spec_file}: key 'source.glob' has value {pattern!r}: environment variable {missing[0]} is not set")
    expanded = os.path.expanduser(os.path.expandvars(pattern))
    if "://" in expanded or os.path.isabs(expanded):
        return expanded
    return str(spec_file.resolve().parent / expanded)


def _refuse_secrets(path: Path, data: Any, lines: dict[tuple[str, ...], int], where: tuple[str, ...] = ()) -> None:
    """Specs are checked into git: a password, a key or a database URL in one is refused before anything else."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = (*where, str(key))
            if str(key).lower() in _DEPLOYMENT_KEYS:
                dotted = ".".join(here)
                raise SpecError(
                    f"{path}{_at(lines, here)}: key '{dotted}' does not belong in a job spec, which is checked into git: "
                    "give the database URL with DEFECTSCAN_DATABASE_URL or a --config file outside the repository, "
                    "and TLS keys as files (cluster.tls.*_file)"
                )
            _refuse_secrets(path, value, lines, here)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _refuse_secrets(path, value, lines, (*where, str(i)))
    elif isinstance(data, str):
        dotted = ".".join(where)
        if mask_secrets(data) != data:
            raise SpecError(
                f"{path}{_at(lines, where)}: key '{dotted}' has value {mask_secrets(data)!r}: it contains a password; job specs are "
                "checked into git, so credentials come from the environment (e.g. DEFECTSCAN_DATABASE_URL) or a file such as ~/.pgpass"
            )
        if "-----BEGIN" in data:
            raise SpecError(
                f"{path}{_at(lines, where)}: key '{dotted}' holds PEM key or certificate text; give the path of the file instead (cluster.tls.*_file)"
            )


def _key_lines(node: yaml.Node | None, where: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """1-based line of every key path in the document, for messages."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = (*where, str(key.value))
            lines[here] = key.start_mark.line + 1
            lines.update(_key_lines(value, here))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            here = (*where, str(i))
            lines[here] = value.start_mark.line + 1
            lines.update(_key_lines(value, here))
    return lines


def _at(lines: dict[tuple[str, ...], int], where: tuple[str, ...]) -> str:
    for n in range(len(where), 0, -1):
        if where[:n] in lines:
            return f" line {lines[where[:n]]}"
    return ""


def _describe(path: Path, exc: ValidationError, lines: dict[tuple[str, ...], int]) -> str:
    messages = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        dotted = ".".join(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            messages.append(f"{path}{_at(lines, loc)}: unknown key '{dotted}'; accepted keys: {', '.join(_accepted(loc[:-1]))}")
        elif error["type"] == "missing":
            messages.append(f"{path}: key '{dotted}' is missing; {_what(loc)}")
        elif isinstance(error.get("input"), dict):
            messages.append(f"{path}{_at(lines, loc)}: section '{dotted or 'top level'}': {message}")
        else:
            value = error.get("input")
            shown = mask_secrets(value) if isinstance(value, str) else value
            messages.append(f"{path}{_at(lines, loc)}: key '{dotted}' has value {shown!r}: {message}")
    return "; ".join(messages)


def _accepted(parent: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in parent:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)


def _what(loc: tuple[str, ...]) -> str:
    examples = {
        ("schedule",): "expected a cron expression such as '0 2 * * *'",
        ("source",): "expected a mapping with glob (Zarr stores to discover) or lot/line/product/since",
        ("model",): "expected a model name (e.g. demo), name:version, or a mapping with name and version",
        ("model", "name"): "expected a registered model name",
    }
    return examples.get(loc, "this key is required")


def _with_lines(message: str, source: str, lines: dict[tuple[str, ...], int]) -> str:
    """Settings errors say `<file>: inspection.key: key 'inspection.key' ...`: keep one file prefix, add the line."""

    def replace(match: re.Match[str]) -> str:
        dotted = match["key"]
        return f"{source}{_at(lines, tuple(dotted.split('.')))}: "

    return re.sub(re.escape(source) + r": (?P<key>[\w.]+): ", replace, message)


def describe_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as plain data, as stored with each run (job_runs.spec)."""
    return spec.model_dump(mode="json", exclude_none=True)


__all__ = [
    "JobSpec",
    "SpecError",
    "check_cron",
    "describe_spec",
    "find_spec",
    "list_spec_files",
    "load_all",
    "load_spec",
    "next_run",
    "resolve_glob",
    "since_time",
]
